"""FlexAttention backend: one fused kernel per layer, a mask_mod reading a per-head window tensor.

On CUDA it trains (forward and backward). On CPU PyTorch compiles only its forward, so asking for
gradients there is refused with a pointer to the `blocked` backend.

float64 runs FlexAttention's unfused implementation, which computes in float64 but holds the N x N
scores: the fused kernels accumulate in float32 on CUDA (Triton) and refuse float64 on CPU, so they
cannot give float64 results. float64 is for checking against the reference, not for training.
"""

import warnings
from functools import cache, lru_cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's default tile; the BlockMask is described in these tiles
_compiled_flex = None


def flex_available(device):
    """Whether torch.compile can build the flex kernel for `device` (CUDA needs Triton)."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return device.type == "cpu"


def flex_window_attention(q, k, v, windows):
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        if torch.is_grad_enabled():
            raise ValueError(
                "backend='flex' cannot compute gradients on CPU (PyTorch compiles only its forward there); "
                "use backend='blocked' to train on CPU, or call it under torch.no_grad()."
            )
        q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses requires_grad inputs on CPU even under no_grad
    unfused = q.dtype == torch.float64
    if not unfused and not flex_available(q.device):
        raise ValueError(f"backend='flex' needs torch.compile support on {q.device.type} (Triton for CUDA); use backend='blocked'.")
    block_mask = window_block_mask(q.shape[2], tuple(windows), q.device)
    kernel = _unfused_flex if unfused else _compile_once()
    return kernel(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _compile_once():
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _unfused_flex(q, k, v, **options):
    _warn_unfused_once()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # said once above
        return flex_attention(q, k, v, **options)


@cache
def _warn_unfused_once():
    warnings.warn(
        "backend='flex' in float64 runs FlexAttention's unfused implementation (N x N scores in memory): "
        "its fused kernels compute in float32. Use float32 for speed, or backend='blocked' for O(N*W) float64.",
        stacklevel=4,
    )


@lru_cache(maxsize=16)
def window_block_mask(n, windows, device):
    """BlockMask for per-head windows at length n, built from tile-level bounds (never N x N)."""
    limits = torch.tensor([n if w is None else min(w, n) for w in windows], device=device)

    def mask_mod(batch, head, q_idx, kv_idx):
        lag = q_idx - kv_idx
        return (lag >= 0) & (lag < limits[head])

    partial, full = _tile_visibility(n, limits)
    return BlockMask.from_kv_blocks(
        *_kv_block_lists(partial), *_kv_block_lists(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(n, n)
    )


def _tile_visibility(n, limits):
    """(H, tiles, tiles) bools: tiles with some visible pairs (partial), and tiles with all visible (full)."""
    first = torch.arange(0, n, BLOCK, device=limits.device)
    last = (first + BLOCK).clamp(max=n) - 1
    lag_low, lag_high = first[:, None] - last[None, :], last[:, None] - first[None, :]
    window = limits[:, None, None]
    some = (lag_high >= 0) & (lag_low < window)
    complete = first + BLOCK <= n  # a tile cut by the sequence end keeps mask_mod applied
    every = (lag_low >= 0) & (lag_high < window) & complete[:, None] & complete[None, :]
    return some & ~every, every


def _kv_block_lists(tiles):
    """Tile bools (H, q tiles, kv tiles) -> (counts, kv tile indices with the selected ones first)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~tiles).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts[None], indices[None]
