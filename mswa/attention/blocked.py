"""Exact sliding-window attention in O(N*W) time and memory, built on fused SDPA calls.

Heads that share a window form a group. A group's queries are cut into blocks of `block` queries;
the block starting at query s sees keys [s - W + 1, s + block - 1], a span of block + W - 1 keys.
Those spans are overlapping strided views of the key tensor (no copy), so all blocks of a group go
through ONE SDPA call, "blocks" playing the role of SDPA's head axis, with one small (block, span)
band mask shared by every block. The first queries, whose span would reach before position 0, are
a small dense problem of their own (a second call, fewer than W - 1 + block queries).

Memory traffic matters as much as FLOPs on CPU, so tensors are rearranged once per layer into a
heads-major (H, B, N', D) layout, N' padded to a multiple of the block sizes: every group, head
region and block grid is then a view, and each gradient is assembled with one buffer.
"""

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


def block_size_for(window):
    """Query block size for a window. A block computes block + W - 1 keys per query to use W, so
    small blocks waste less work, but tiny ones make inefficient matmuls. Tuned on a 2-core CPU,
    fp32 forward+backward, head_dim 32 and 64, W from 16 to 1024, timings interleaved (differences
    under ~5% were noise there). Powers of two keep padding below the largest block."""
    return 32 if window < 64 else 64 if window < 512 else 128


def blocked_window_attention(q, k, v, windows, block_size=None):
    """Window attention per group of equal-window heads; `block_size=None` picks `block_size_for(W)`."""
    n_head, n = q.shape[1], q.shape[2]
    groups = _window_groups(windows, n)
    blocks = [None if window is None else block_size or block_size_for(window) for window, _ in groups]
    n_padded = _round_up(n, math.lcm(*filter(None, blocks)))
    order = [h for _, heads in groups for h in heads]
    kv_order = [h // (n_head // k.shape[1]) for h in order]
    q, k, v = _heads_major(q, order, n_padded), _heads_major(k, kv_order, n_padded), _heads_major(v, kv_order, n_padded)
    sizes = [len(heads) for _, heads in groups]
    outputs = [
        _group_attention(*xs, window, block)
        for xs, (window, _), block in zip(zip(q.split(sizes), k.split(sizes), v.split(sizes)), groups, blocks)
    ]
    out = (torch.cat(outputs) if len(outputs) > 1 else outputs[0])[:, :, :n]
    if order != sorted(order):
        out = out.index_select(0, torch.tensor(order, device=out.device).argsort())
    return out.transpose(0, 1)


def _window_groups(windows, n):
    """[(window, [heads])] in order of first appearance; window None (full causal) also for W >= N."""
    groups = {}
    for head, window in enumerate(windows):
        groups.setdefault(None if window is None or window >= n else window, []).append(head)
    return list(groups.items())


def _round_up(n, multiple):
    return multiple * math.ceil(n / multiple)


def _heads_major(x, heads, n_padded):
    """x (B, Hx, N, D) -> (len(heads), B, n_padded, D) contiguous, zero rows after N; free when
    B = 1, heads = all in order and N = n_padded."""
    if heads != list(range(x.shape[1])):
        x = x.index_select(1, torch.tensor(heads, device=x.device))
    x = x.transpose(0, 1)
    if n_padded > x.shape[2]:
        x = F.pad(x, (0, 0, 0, n_padded - x.shape[2]))
    return x.contiguous()


def _group_attention(q, k, v, window, block):
    """One window group, (G, B, N', D) heads-major; padded rows at the end never reach real queries."""
    heads, batch, n, dim = q.shape
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # Queries before `start` have spans reaching before key 0; they form a small dense band.
    start = min(n, block * math.ceil((window - 1) / block))
    if start == n:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_band_mask(window, n, n, q.dtype, q.device))
    count, span = (n - start) // block, block + window - 1
    q_head, q_body = q.split([start, n - start], dim=2)
    (k_head, k_spans), (v_head, v_spans) = (_HeadAndSpans.apply(x.flatten(0, 1), start, span, block) for x in (k, v))
    mask = _band_mask(window, block, span, q.dtype, q.device)
    body = F.scaled_dot_product_attention(q_body.reshape(-1, count, block, dim), k_spans, v_spans, attn_mask=mask)
    if not start:
        return body.view(heads, batch, n, dim)
    head_mask = _band_mask(window, start, start, q.dtype, q.device)
    head = F.scaled_dot_product_attention(
        q_head, k_head.view(heads, batch, start, dim), v_head.view(heads, batch, start, dim), attn_mask=head_mask
    )
    return torch.cat([head, body.view(heads, batch, n - start, dim)], dim=2)


@lru_cache(maxsize=128)
def _band_mask(window, n_query, n_key, dtype, device):
    """(1, 1, n_query, n_key) additive mask; the queries are the last n_query positions of the keys.
    Additive float (not bool) so SDPA does not convert it on every call."""
    lag = torch.arange(n_query, device=device)[:, None] + (n_key - n_query) - torch.arange(n_key, device=device)
    visible = (lag >= 0) & (lag < window)
    return torch.zeros(n_query, n_key, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))[None, None]


class _HeadAndSpans(torch.autograd.Function):
    """x (R, N', D) -> (x[:, :start], spans (R, count, span, D)), where spans[:, j] are the keys of
    query block j after `start`: x[:, start + j*step - (span - step) :][:span].

    Both are views. Backward builds x's gradient in one buffer: the head part plus the spans folded
    back with ceil(span / step) strided adds (the generic unfold backward is much slower)."""

    @staticmethod
    def forward(ctx, x, start, span, step):
        ctx.start, ctx.step, ctx.first = start, step, start - (span - step)
        return x[:, :start], x[:, ctx.first :].unfold(1, span, step).transpose(2, 3)

    @staticmethod
    def backward(ctx, grad_head, grad_spans):
        rows, count, span, dim = grad_spans.shape
        step, pieces = ctx.step, math.ceil(span / ctx.step)
        grad = grad_spans.new_zeros(rows, ctx.first + (count + pieces - 1) * step, dim)
        if grad_head is not None:
            grad[:, : ctx.start] += grad_head
        folded = grad[:, ctx.first :].view(rows, count + pieces - 1, step, dim)
        for piece in range(pieces):
            width = min(step, span - piece * step)
            folded[:, piece : piece + count, :width] += grad_spans[:, :, piece * step : piece * step + width]
        return grad[:, : ctx.first + (count - 1) * step + span], None, None, None
