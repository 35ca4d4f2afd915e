"""Causal linear attention kernels: feature maps, chunked training form, recurrent decoding form.

Linear attention replaces softmax(q.k) with a positive kernel phi(q).phi(k), so the causal output

    out_i = sum_{j<=i} (phi(q_i) . phi(k_j)) v_j  /  sum_{j<=i} phi(q_i) . phi(k_j)

can be computed from two running sums, S = sum phi(k_j)^T v_j and z = sum phi(k_j), instead of an N x N matrix.

Three forms compute exactly the same function:
- `quadratic_linear_attention`: the documented reference; materialises the masked N x N weights (tests only).
- `causal_linear_attention`: the training form; quadratic inside chunks of `chunk_size` tokens, the running sums
  across chunks. Time O(N * M * D + N * chunk * (M + D)), memory O(N), where M is the mapped feature size.
- `linear_attention_step`: the recurrent form for decoding, one token at a time against a `LinearAttentionState`.

The model's linear mixers (`mswa.model.LinearAttention`, and the linear branch of the parallel hybrid) call them
through `mswa.model.cached_linear_attention`, which continues them across the calls of a decoding cache.

All three accumulate in fp32 (fp64 stays fp64) whatever the input dtype, with autocast turned off inside, and
return the input dtype. The denominator is clamped at `eps`, so a query whose weights all underflow gets a
zero output rather than inf/NaN; both feature maps are positive, so the clamp never changes a healthy row.
"""

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_EPS = 1e-6


def elu_feature_map(x: Tensor) -> Tensor:
    """elu(x) + 1 (Katharopoulos et al., 2020): positive, same size as x."""
    return F.elu(x) + 1


def taylor_feature_map(x: Tensor) -> Tensor:
    """Second-order Taylor map of Based (Arora et al., 2024): [1, x', x' (x) x' / sqrt(2)] with x' = x / F**(1/4).

    Then phi(q) . phi(k) = 1 + t + t^2 / 2 with t = q.k / sqrt(F): the Taylor expansion of exp(t), at softmax's
    usual 1/sqrt(d) temperature. It equals ((t + 1)^2 + 1) / 2 >= 1/2, so every weight is positive and a query's
    denominator is at least half the number of keys it sees. The full outer product (F^2 terms, not the F(F+1)/2
    unique ones) keeps the identity a plain dot product; the map has 1 + F + F^2 features, so F stays small (~16).
    """
    scaled = x * x.shape[-1] ** -0.25
    pairs = (scaled.unsqueeze(-1) * scaled.unsqueeze(-2)).flatten(-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(scaled[..., :1]), scaled, pairs], dim=-1)


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {"elu": elu_feature_map, "taylor": taylor_feature_map}


def mapped_feature_dim(feature_map: str, feature_dim: int) -> int:
    """Size of phi(x) for an x of `feature_dim` features."""
    _check_feature_map(feature_map)
    return feature_dim if feature_map == "elu" else 1 + feature_dim + feature_dim**2


@dataclass
class LinearAttentionState:
    """Running sums of the keys seen so far: kv = sum phi(k)^T v (B, H, M, D), key_sum = sum phi(k) (B, H, M).

    Held in the accumulation dtype (fp32, or fp64 for fp64 inputs).
    """

    kv: Tensor
    key_sum: Tensor

    @classmethod
    def from_prefix(
        cls, k: Tensor, v: Tensor, feature_map: str = "elu", before: "LinearAttentionState | None" = None
    ) -> "LinearAttentionState":
        """The state after keys k (B, H, N, F) and values v (B, H, N, D), which follow the state `before` (None:
        the start): prefill a prompt, then decode by steps."""
        _check_inputs(k, k, v, feature_map, DEFAULT_EPS)
        with _accumulating(k):
            k_feat = FEATURE_MAPS[feature_map](_accum(k))
            kv, key_sum = k_feat.transpose(-1, -2) @ _accum(v), k_feat.sum(-2)
            if before is not None:
                _check_state(before, tuple(kv.shape), feature_map)
                kv, key_sum = before.kv + kv, before.key_sum + key_sum
            return cls(kv=kv, key_sum=key_sum)


def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    feature_map: str = "elu",
    chunk_size: int = 64,
    eps: float = DEFAULT_EPS,
    state: LinearAttentionState | None = None,
) -> Tensor:
    """Causal linear attention in chunked form. q, k: (B, H, N, F) before the feature map; v: (B, H, N, D);
    `state`: the running sums of the keys before q's first token (None: q starts the sequence).

    Returns (B, H, N, D) in v's dtype. No tensor grows faster than N: the largest are the in-chunk weights
    (B, H, N, chunk_size), the mapped features (B, H, N, M) and the per-chunk states (B, H, N / chunk_size, M, D).
    """
    _check_inputs(q, k, v, feature_map, eps)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int; use e.g. chunk_size=64.")
    seq_len = q.shape[-2]
    with _accumulating(q):
        phi = FEATURE_MAPS[feature_map]
        q_feat, k_feat, values = phi(_accum(q)), phi(_accum(k)), _accum(v)
        # Zero padding at the end: padded keys have zero features and padded queries are dropped, so no real
        # output changes.
        pad = -seq_len % chunk_size
        q_chunks, k_chunks, v_chunks = (
            F.pad(t, (0, 0, 0, pad)).unflatten(-2, (-1, chunk_size)) for t in (q_feat, k_feat, values)
        )  # (B, H, chunks, chunk_size, M or D)

        # Inside a chunk: masked quadratic weights.
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
        weights = (q_chunks @ k_chunks.transpose(-1, -2)).masked_fill(~causal, 0)
        numer = weights @ v_chunks
        denom = weights.sum(-1)

        # Across chunks: the running sums of all earlier chunks.
        kv_before = _exclusive_cumsum(k_chunks.transpose(-1, -2) @ v_chunks, dim=2)  # (B, H, chunks, M, D)
        key_sum_before = _exclusive_cumsum(k_chunks.sum(-2), dim=2)  # (B, H, chunks, M)
        if state is not None:
            _check_state(state, (*q_feat.shape[:2], q_feat.shape[-1], values.shape[-1]), feature_map)
            kv_before, key_sum_before = kv_before + state.kv.unsqueeze(2), key_sum_before + state.key_sum.unsqueeze(2)
        numer = numer + q_chunks @ kv_before
        denom = denom + (q_chunks @ key_sum_before.unsqueeze(-1)).squeeze(-1)

        out = _normalise(numer, denom, eps).flatten(2, 3)[:, :, :seq_len]
    return out.to(v.dtype)


def linear_attention_step(
    q_t: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    state: LinearAttentionState | None = None,
    feature_map: str = "elu",
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, LinearAttentionState]:
    """One decoding step. q_t, k_t: (B, H, F); v_t: (B, H, D); state None starts an empty sequence.

    Returns the output (B, H, D) for this token (which sees itself) and the new state; the old state is not
    modified, so the step is differentiable and can be branched.
    """
    if q_t.dim() != 3 or k_t.dim() != 3 or v_t.dim() != 3:
        raise ValueError(
            f"q_t, k_t, v_t must be 3-D (batch, heads, dim), one token; got {q_t.dim()}-D, {k_t.dim()}-D, "
            f"{v_t.dim()}-D. For a whole sequence use causal_linear_attention."
        )
    _check_inputs(q_t.unsqueeze(-2), k_t.unsqueeze(-2), v_t.unsqueeze(-2), feature_map, eps)
    with _accumulating(q_t):
        phi = FEATURE_MAPS[feature_map]
        q_feat, k_feat, value = phi(_accum(q_t)), phi(_accum(k_t)), _accum(v_t)
        if state is None:
            state = LinearAttentionState(kv=q_feat.new_zeros(*q_feat.shape, value.shape[-1]), key_sum=q_feat.new_zeros(q_feat.shape))
        _check_state(state, (*q_feat.shape, value.shape[-1]), feature_map)
        state = LinearAttentionState(kv=state.kv + k_feat.unsqueeze(-1) * value.unsqueeze(-2), key_sum=state.key_sum + k_feat)
        numer = (q_feat.unsqueeze(-2) @ state.kv).squeeze(-2)
        denom = (q_feat * state.key_sum).sum(-1)
        out = _normalise(numer, denom, eps)
    return out.to(v_t.dtype), state


def quadratic_linear_attention(q: Tensor, k: Tensor, v: Tensor, feature_map: str = "elu", eps: float = DEFAULT_EPS) -> Tensor:
    """The reference: phi(Q) phi(K)^T materialised (B, H, N, N), causally masked, row-normalised. O(N^2) memory."""
    _check_inputs(q, k, v, feature_map, eps)
    seq_len = q.shape[-2]
    with _accumulating(q):
        phi = FEATURE_MAPS[feature_map]
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
        weights = (phi(_accum(q)) @ phi(_accum(k)).transpose(-1, -2)).masked_fill(~causal, 0)
        out = _normalise(weights @ _accum(v), weights.sum(-1), eps)
    return out.to(v.dtype)


def _accum(x: Tensor) -> Tensor:
    """x in the accumulation dtype: fp32 for half/bf16/fp32, fp64 for fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _accumulating(x: Tensor) -> AbstractContextManager:
    """Turn autocast off so a mixed-precision caller cannot push the running sums back to half precision.

    Devices without autocast (e.g. "meta", used for shape and size checks) cannot be inside an autocast region.
    """
    if not torch.amp.is_autocast_available(x.device.type):
        return nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """Sum of the entries strictly before each index along dim (shift, then cumsum: no cancellation)."""
    shifted = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
    return shifted.cumsum(dim)


def _normalise(numer: Tensor, denom: Tensor, eps: float) -> Tensor:
    return numer / denom.clamp_min(eps).unsqueeze(-1)


def _check_feature_map(feature_map: str) -> None:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map={feature_map!r} is unknown; use one of {sorted(FEATURE_MAPS)}.")


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps={eps!r} must be > 0 so the denominator clamp keeps outputs finite; use e.g. 1e-6.")


def _check_state(state: LinearAttentionState, expected_kv: tuple, feature_map: str) -> None:
    if tuple(state.kv.shape) != tuple(expected_kv) or tuple(state.key_sum.shape) != tuple(expected_kv[:-1]):
        raise ValueError(
            f"state.kv has shape {tuple(state.kv.shape)} but feature_map={feature_map!r} with these inputs "
            f"needs {tuple(expected_kv)}; pass the state made with the same feature map and sizes, or state=None."
        )


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, feature_map: str, eps: float) -> None:
    _check_feature_map(feature_map)
    _check_eps(eps)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (batch, heads, seq, dim); got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D.")
    if q.shape != k.shape:
        raise ValueError(f"q shape {tuple(q.shape)} != k shape {tuple(k.shape)}; both are (B, H, N, feature_dim).")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} does not match q's (batch, heads, seq) {tuple(q.shape[:3])}.")
    if q.shape[-2] < 1:
        raise ValueError("the sequence is empty (q.shape[-2] == 0); pass at least one token.")
    if not (q.dtype == k.dtype == v.dtype and q.is_floating_point()):
        raise ValueError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}.")
