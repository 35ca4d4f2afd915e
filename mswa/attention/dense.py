"""Reference kernels: full causal SDPA, and SDPA over an explicit (1, H, N, N) window mask (O(N^2))."""

import torch
import torch.nn.functional as F


def causal_attention(q, k, v):
    """Fused full causal attention (the full-attention baseline); k/v may have fewer heads than q."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def window_mask(n, windows, device):
    """(1, H, N, N) bool mask, True where query i may see key j: 0 <= i - j < window (None = no limit)."""
    position = torch.arange(n, device=device, dtype=torch.int32)
    lag = position[:, None] - position[None, :]
    limits = torch.tensor([n if w is None else w for w in windows], device=device, dtype=torch.int32)
    # A 4-D mask keeps SDPA on its fused CPU kernel; a 3-D one falls back to the unfused math path.
    return ((lag >= 0) & (lag < limits[:, None, None])).unsqueeze(0)


def expand_kv_heads(x, n_head):
    """Repeat grouped-query k/v heads so kv head h // (H // Hkv) serves q head h."""
    return x.repeat_interleave(n_head // x.shape[1], dim=1)


def dense_window_attention(q, k, v, windows):
    """The reference: every head's window as one dense boolean mask, one SDPA call."""
    n_head = q.shape[1]
    mask = window_mask(q.shape[2], windows, q.device)
    return F.scaled_dot_product_attention(q, expand_kv_heads(k, n_head), expand_kv_heads(v, n_head), attn_mask=mask)
