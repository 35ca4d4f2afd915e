"""`window_attention`: checks its inputs, picks a backend, and runs that kernel.

A layer whose windows are all None (or >= N) runs fused full causal SDPA whatever is asked;
`auto` is flex on CUDA (blocked when torch.compile/Triton is missing, with one warning) and
blocked on CPU and in float64.
"""

import warnings

import torch

from mswa.windows import validate_windows

from .blocked import blocked_window_attention
from .dense import causal_attention, dense_window_attention
from .flex import flex_available, flex_window_attention

BACKENDS = ("auto", "dense", "blocked", "flex")
_KERNELS = {"dense": dense_window_attention, "blocked": blocked_window_attention, "flex": flex_window_attention}
_warned_flex_fallback = False


def window_attention(q, k, v, windows, backend="auto", spans=None, ramp=None):
    """Causal attention where head h sees its last `windows[h]` keys (None = all).

    Learned spans: `spans` (a (heads,) float tensor, z >= 0, which gets gradients) and `ramp` R > 0 weight key
    lag d by the soft mask clamp((z + R - d) / R, 0, 1), an additive log-mask on the scores, within each
    head's cap `windows[h]`; only the blocked kernel takes them (`auto` picks it), and its cost follows the
    spans (mswa/attention/blocked.py).

    q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim) with heads % kv_heads
    == 0 (grouped-query: q head h uses kv head h // (heads // kv_heads)). Scale 1/sqrt(head_dim).
    Under autocast, q, k and v run in the autocast dtype, as torch's own SDPA does (fp32 RoPE on
    bf16 projections otherwise leaves q, k in fp32 and v in bf16).
    """
    q, k, v = _in_autocast_dtype(q, k, v)
    _check_tensors(q, k, v)
    windows = validate_windows(windows, q.shape[1])
    if spans is not None:
        return _learned_span_attention(q, k, v, windows, backend, spans, ramp)
    backend = resolve_backend(backend, q.device, q.dtype)
    if all(w is None or w >= q.shape[2] for w in windows):
        return causal_attention(q, k, v)
    return _KERNELS[backend](q, k, v, windows)


def _learned_span_attention(q, k, v, caps, backend, spans, ramp):
    if check_backend(backend) not in ("auto", "blocked"):
        raise ValueError(f"backend={backend!r} does not take learned spans; use backend='blocked' (or 'auto')")
    if spans.shape != (q.shape[1],) or not (isinstance(ramp, (int, float)) and ramp > 0):
        raise ValueError(f"spans must hold one span per head ({q.shape[1]}) and ramp must be > 0; got {tuple(spans.shape)}, {ramp!r}")
    return blocked_window_attention(q, k, v, caps, spans=spans, ramp=ramp)


def resolve_backend(backend, device, dtype=torch.float32):
    """The concrete backend for `backend` on `device` ('auto': flex on CUDA; blocked on CPU, and in
    float64, where flex would run unfused in O(N^2) memory)."""
    global _warned_flex_fallback
    if check_backend(backend) != "auto":
        return backend
    if device.type != "cuda" or dtype == torch.float64:
        return "blocked"
    if flex_available(device):
        return "flex"
    if not _warned_flex_fallback:
        message = "backend='auto': torch.compile/Triton is unavailable on CUDA, using backend='blocked' instead of 'flex'."
        warnings.warn(message, stacklevel=3)
        _warned_flex_fallback = True
    return "blocked"


def check_backend(backend):
    """`backend` if it is one of BACKENDS; refused in one sentence otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: choose one of {', '.join(BACKENDS)}.")
    return backend


def _in_autocast_dtype(q, k, v):
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check_tensors(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D (batch, heads, seq, head_dim); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}: they must match.")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, seq and head_dim (self-attention).")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, not divisible by the {k.shape[1]} k/v heads: use a divisor of {q.shape[1]}.")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError("q, k, v must share one dtype and one device.")
