"""Model FLOPs utilisation (MFU): the model's FLOPs per token, window-aware, over the machine's measured matmul rate.

Model FLOPs count what the model needs, not what a kernel happens to compute (the blocked kernel's padded
spans, or dense attention's full N x N, are not counted): a product of (m x k) by (k x n) is 2mkn; a head with
window W attends min(i + 1, W) keys at position i (a full head: i + 1, the causal triangle), each key costing
4 x head_dim (q.k and p.v); linear attention counts its recurrent form (4 x features x head_dim per head and
token). Training is forward + backward = 3 x forward. Norms, softmax and activations are left out, as in the
usual accounting (PaLM's appendix B). The rate is measured here, not read from a spec sheet: a square fp32
matmul on CPU, bf16 on a GPU (`matmul_flops_per_s`).
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

from mswa.attention.linear import mapped_feature_dim
from mswa.windows import attended_pairs


def forward_flops_per_token(cfg, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of a `ModelConfig` trained on sequences of `seq_len`: `dense` (the projections,
    MLPs and output head), `attention` (scores and mixing, window-aware; linear attention's state) and `total`."""
    d, heads = cfg.d_model, cfg.n_head
    head_dim = d // heads
    features = mapped_feature_dim(cfg.linear_feature_map, cfg.linear_feature_dim)
    dense = attention = 0.0
    for layer in range(cfg.n_layer):
        kind = cfg.layer_mixer(layer)
        dense += 2 * d * cfg.mlp_ratio * d * 2  # MLP up and down
        if kind in ("window", "parallel"):
            dense += 2 * d * 3 * d + 2 * d * d  # qkv and output projections
            pairs = sum(attended_pairs(w, seq_len) for w in cfg.layer_windows(layer))
            attention += 4 * head_dim * pairs / seq_len
        if kind == "parallel":
            dense += 2 * d * 2 * heads * cfg.linear_feature_dim  # the linear branch's q and k
        if kind == "linear":
            dense += 2 * d * (2 * heads * cfg.linear_feature_dim + d) + 2 * d * d
        if kind in ("linear", "parallel"):
            attention += 4 * heads * features * head_dim
    head_width = cfg.vocab_size if cfg.output == "softmax" else cfg.adaptive_cutoffs[0] + len(cfg.adaptive_cutoffs)
    dense += 2 * d * head_width  # the adaptive softmax: its head cluster (tails run for their targets only)
    return {"dense": dense, "attention": attention, "total": dense + attention}


def decoding_flops_per_token(cfg, seen: int) -> float:
    """Forward FLOPs of one decoding step after `seen` tokens: the new token's own share, the forward FLOPs of
    seen + 1 tokens less those of seen (its attention: min(seen + 1, W) keys per windowed head)."""

    def forward_flops(n):
        return forward_flops_per_token(cfg, n)["total"] * n if n else 0.0

    return forward_flops(seen + 1) - forward_flops(seen)


def training_flops_per_token(cfg, seq_len: int) -> float:
    """Forward + backward (twice the forward's products) FLOPs per token."""
    return 3 * forward_flops_per_token(cfg, seq_len)["total"]


def rate_dtype(device: torch.device) -> torch.dtype:
    """The dtype whose matmul rate MFU is measured against: bf16 on a GPU, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def matmul_step(device: torch.device, dtype: torch.dtype | None = None, size: int | None = None):
    """(a function running one (size x size) product, its FLOPs): what the rate is timed on. Size 1024 on CPU
    (near its peak in ~0.1 s), 8192 on a GPU; dtype `rate_dtype(device)` unless given."""
    dtype = dtype or rate_dtype(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return (lambda: a @ b), 2 * size**3


@lru_cache(maxsize=8)
def matmul_flops_per_s(device: torch.device, dtype: torch.dtype | None = None, size: int | None = None, threads: int = 0) -> float:
    """This machine's peak matmul rate in FLOP/s: the fastest of 5 timed `matmul_step`s after a warm-up, at
    torch's current thread count (`threads` keys the cache). The fastest, not the median: other work on the
    machine can only slow a step, so the fastest is the closest to what the machine can do."""
    step, flops = matmul_step(device, dtype, size)
    seconds = []
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return flops / min(seconds[1:])


def machine_matmul_rate(device: torch.device, again: bool = False) -> float:
    """`matmul_flops_per_s` at torch's current thread count: measured once per thread count and device, or,
    `again`, measured anew."""
    measure = matmul_flops_per_s.__wrapped__ if again else matmul_flops_per_s
    return measure(torch.device(device), threads=torch.get_num_threads())
