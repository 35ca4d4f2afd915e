"""Exact sliding-window attention in O(N*W) time and memory, from batched matrix multiplies.

Heads that share a window W form a band. A band's queries are cut into blocks of B queries; block j
sees the `reach` keys before it (W - 1 rounded up to a multiple of B) plus its own B keys: a span of
reach + B keys, whose (B, span) scores are masked to the window with one small mask shared by every
block. The spans of consecutive blocks overlap, so they are strided views of the keys, not copies.

Layout: every tensor is rearranged once into flat rows, heads-major ((head, batch) rows of N'
positions, N' padded to a multiple of the blocks), keys and values after `front` zero rows, so that
the blocks of ALL rows of a band form one batch of matrix products with a single batch stride. The
first blocks of a row then see the end of the previous row (or the zero front) where positions
before 0 would be; those scores are masked too.

A band's blocks go in chunks of about 4 MB of scores, so that scores stay in cache from one
product through the softmax to the next: per chunk, forward is one baddbmm (scores onto the mask),
one in-place softmax and one bmm. The probabilities are stored for the backward (N x span floats
per head; no recomputation), which adds each chunk's key and value gradients straight into one
buffer, span tile by span tile: tile t of every block's span is B consecutive keys, so one
in-place baddbmm per tile does it, with no copy of the spans and no fold.

Learned spans (``spans``, one real span z per head, with a ramp of width R): head h's scores get the additive
log-mask log m(d), m(d) = clamp((z + R - d) / R, 0, 1) at lag d (adaptive-span's soft mask), and the spans get
their gradients. A head's band is its current window ceil(z + R) (its cap at most): blocks beyond the span are
never computed, so the cost follows the spans, not the cap.

Grouped-query k/v rows are repeated per query head in the layout and summed back in the backward.
Half-precision inputs are computed in fp32 (the layout copy converts them) and the output cast back,
as fused SDPA does inside. Heads with no window (None, or W >= N) run fused causal SDPA instead.
"""

import math
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F


def block_size_for(window):
    """Query block size for a window. A block computes B + reach keys per query to use W, so small
    blocks waste less work, but tiny ones make inefficient matmuls. Tuned on a 2-core CPU (fp32,
    forward+backward, head_dim 64, 8 heads, N 1k-16k, timings interleaved): at W 4-16, 16 beats 32
    by 15-20% (half the span) and ties with 8; at W 32, 16 ties with 32; at W 32-64, 32 beats 64 by
    10-35%; at W 128 they tie within 5% (32 ahead from 8k); at W 256 they tie; at W 512, 64 beats 32
    by 15%; from W 1024, 128 beats 64 by ~5%."""
    return 16 if window <= 16 else 32 if window < 256 else 64 if window < 1024 else 128


class _Band(NamedTuple):
    """The heads sharing one window: `rows` (head, batch) rows of the layout from `first_row` on."""

    window: int
    block: int
    first_row: int
    rows: int

    @property
    def reach(self):
        return self.block * math.ceil((self.window - 1) / self.block)

    @property
    def span(self):
        return self.reach + self.block


class _Plan(NamedTuple):
    bands: tuple
    heads: tuple  # query heads in band order
    kv_heads: tuple  # their k/v heads
    batch: int
    n: int
    n_padded: int
    front: int  # zero rows before the keys and values: the largest reach
    ramp: float | None = None  # learned spans: the soft mask's ramp width R (None: hard windows)


def blocked_window_attention(q, k, v, windows, block_size=None, spans=None, ramp=None):
    """Window attention per band of equal-window heads; `block_size=None` picks `block_size_for(W)`.

    With `spans` (a (heads,) float tensor, z >= 0) and `ramp` (R > 0), head h is softly masked to its span
    (see the module's notes) within its cap `windows[h]`; gradients reach `spans`."""
    n = q.shape[2]
    if spans is not None:
        windows = soft_windows(spans, ramp, windows, n)
    groups = _window_groups(windows, n, soft=spans is not None)
    causal_heads = groups.pop(None, [])
    outputs, order = [], []
    if groups:
        plan = _plan(groups, q.shape, k.shape[1], block_size, ramp if spans is not None else None)
        outputs.append(_BandAttention.apply(q, k, v, plan, spans))
        order += plan.heads
    if causal_heads:
        kv = [h // (q.shape[1] // k.shape[1]) for h in causal_heads]
        causal = F.scaled_dot_product_attention(_heads(q, causal_heads), _heads(k, kv), _heads(v, kv), is_causal=True)
        outputs.append(causal)
        order += causal_heads
    out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
    if order != sorted(order):
        out = out.index_select(1, torch.tensor(order, device=out.device).argsort())
    return out


def soft_windows(spans, ramp, caps, n):
    """Each head's hard window under its soft mask: lags d < z + R, i.e. ceil(z + R), at most its cap and N."""
    reach = torch.ceil(spans.detach().double() + ramp).clamp(min=1).tolist()
    return [int(min(r, n if cap is None else cap, n)) for r, cap in zip(reach, caps)]


def _window_groups(windows, n, soft=False):
    """{window: [heads]} in order of first appearance; window None (full causal) also for W >= N, unless the
    heads are softly masked (their scores need the mask whatever their window)."""
    groups = {}
    for head, window in enumerate(windows):
        full = window is None or (window >= n and not soft)
        groups.setdefault(None if full else min(window, n), []).append(head)
    return groups


def _heads(x, heads):
    return x if heads == list(range(x.shape[1])) else x.index_select(1, torch.tensor(heads, device=x.device))


def _plan(groups, q_shape, kv_heads, block_size, ramp=None):
    batch, n_head, n, _ = q_shape
    blocks = [block_size or block_size_for(window) for window in groups]
    n_padded = _round_up(n, math.lcm(*blocks))
    bands, heads, first_row = [], [], 0
    for (window, band_heads), block in zip(groups.items(), blocks):
        bands.append(_Band(window, block, first_row, len(band_heads) * batch))
        heads += band_heads
        first_row += bands[-1].rows
    kv = tuple(h // (n_head // kv_heads) for h in heads)
    return _Plan(tuple(bands), tuple(heads), kv, batch, n, n_padded, max(band.reach for band in bands), ramp)


def _round_up(n, multiple):
    return multiple * math.ceil(n / multiple)


class _BandAttention(torch.autograd.Function):
    """(q, k, v, plan, spans) -> the output of the plan's heads, (batch, len(plan.heads), n, head_dim); spans
    (learned, or None) softly mask each head's scores."""

    @staticmethod
    def forward(ctx, q, k, v, plan, spans):
        with torch.autocast(q.device.type, enabled=False):  # the products run in the dtype chosen here
            return _BandAttention._forward(ctx, q, k, v, plan, spans)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _BandAttention._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, q, k, v, plan, spans):
        dtype = _compute_dtype(q.dtype)
        q_rows = _to_rows(q, plan.heads, plan, dtype, front=0)
        k_rows, v_rows = (_to_rows(x, plan.kv_heads, plan, dtype, plan.front) for x in (k, v))
        out_rows = torch.empty_like(q_rows)
        scale = q.shape[-1] ** -0.5
        probs = []
        for band in plan.bands:
            queries, keys, values = _band_views(band, plan, q_rows, k_rows, v_rows)
            out = _blocks(out_rows, band, plan)
            prob = queries.new_empty(queries.shape[0], band.block, band.span)
            mask = _band_mask(band.window, band.block, dtype, q.device)
            soft = _soft_mask(spans, band, plan, dtype) if spans is not None else None
            # a chunk's scores stay in cache from product to softmax to product
            for chunk in _chunks(band, plan, _scores_per_chunk(q_rows)):
                scores = prob[chunk.blocks]
                torch.baddbmm(mask, queries[chunk.blocks], keys[chunk.blocks].mT, alpha=scale, out=scores)
                _mask_before_row_start(scores, band, chunk)
                if soft is not None:
                    _per_row(scores, chunk).add_(soft.log_mask[_chunk_rows(band, plan, chunk), None])
                torch.ops.aten._softmax.out(scores, -1, False, out=scores)
                torch.bmm(scores, values[chunk.blocks], out=out[chunk.blocks])
            probs.append(prob)
        spans = spans.detach() if spans is not None else q_rows.new_empty(0)
        ctx.save_for_backward(q_rows, k_rows, v_rows, spans, *probs)  # tensors only here: saved-tensor hooks see them all
        ctx.plan, ctx.scale = plan, scale
        ctx.dtypes, ctx.shapes = (q.dtype, k.dtype), (q.shape, k.shape)
        return _from_rows(out_rows, plan, front=0).to(q.dtype)

    @staticmethod
    def _backward(ctx, grad_out):
        q_rows, k_rows, v_rows, spans, *probs = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        learned = plan.ramp is not None
        grad_spans = torch.zeros(len(plan.heads), dtype=q_rows.dtype, device=q_rows.device) if learned else None
        grad_out_rows = _to_rows(grad_out, range(len(plan.heads)), plan, q_rows.dtype, front=0)
        grad_q, grad_k, grad_v = torch.empty_like(q_rows), torch.zeros_like(k_rows), torch.zeros_like(v_rows)
        for band, prob in zip(plan.bands, probs):
            queries, keys, values = _band_views(band, plan, q_rows, k_rows, v_rows)
            grad_blocks, grad_queries = _blocks(grad_out_rows, band, plan), _blocks(grad_q, band, plan)
            soft = _soft_mask(spans, band, plan, q_rows.dtype) if learned else None
            for chunk in _chunks(band, plan, _scores_per_chunk(q_rows)):
                blocks, first_key = chunk.blocks, _first_key_row(band, plan) + chunk.blocks.start * band.block
                _accumulate_tiles(grad_v, prob[blocks], grad_blocks[blocks], first_key, band, alpha=1.0)
                grad_scores = torch.bmm(grad_blocks[blocks], values[blocks].mT)
                torch.ops.aten._softmax_backward_data.out(grad_scores, prob[blocks], -1, prob.dtype, grad_input=grad_scores)
                if soft is not None:  # d score / d z = d log m / d z, on the ramp only
                    rows = _chunk_rows(band, plan, chunk)
                    soft.grad_rows[rows] += (_per_row(grad_scores, chunk) * soft.slope[rows, None]).sum((1, 2, 3))
                grad_queries[blocks].baddbmm_(grad_scores, keys[blocks], beta=0, alpha=scale)
                _accumulate_tiles(grad_k, grad_scores, queries[blocks], first_key, band, alpha=scale)
            if soft is not None:
                grad_spans[soft.heads] += soft.grad_rows.view(-1, plan.batch).sum(1)
        (q_shape, k_shape), (q_dtype, k_dtype) = ctx.shapes, ctx.dtypes
        return (
            _sum_heads(grad_q, plan.heads, q_shape, plan, front=0).to(q_dtype),
            _sum_heads(grad_k, plan.kv_heads, k_shape, plan, plan.front).to(k_dtype),
            _sum_heads(grad_v, plan.kv_heads, k_shape, plan, plan.front).to(k_dtype),
            None,
            grad_spans[torch.tensor(plan.heads).argsort()].to(spans.dtype) if learned else None,
        )


class _SoftMask(NamedTuple):
    """A band's learned-span mask, per (head, batch) row of the band: log m and d log m / dz at each (query, key)."""

    heads: list  # the band's heads, as positions in plan.heads
    log_mask: torch.Tensor  # (rows, block, span)
    slope: torch.Tensor  # (rows, block, span)
    grad_rows: torch.Tensor  # (rows,) the backward's sums


def _soft_mask(spans, band, plan, dtype):
    """log m(d) = log clamp((z + R - d) / R, 0, 1) and its slope in z, 1 / (z + R - d) on the ramp z < d < z + R."""
    first = band.first_row // plan.batch
    heads = list(range(first, first + band.rows // plan.batch))
    z = spans.detach()[list(plan.heads[h] for h in heads)].to(dtype)[:, None, None]
    lag = (torch.arange(band.block, device=z.device)[:, None] + band.reach - torch.arange(band.span, device=z.device)).to(dtype)
    room = z + plan.ramp - lag  # R * m before clamping
    log_mask = torch.log((room / plan.ramp).clamp(0, 1))
    slope = torch.where((lag > z) & (room > 0), 1 / room, torch.zeros_like(room))
    rows = (t.repeat_interleave(plan.batch, 0) for t in (log_mask, slope))
    return _SoftMask(heads, *rows, z.new_zeros(band.rows))


def _chunk_rows(band, plan, chunk):
    """The band rows a chunk's blocks lie in."""
    first = chunk.blocks.start // (plan.n_padded // band.block)
    return slice(first, first + chunk.rows)


def _per_row(scores, chunk):
    """A chunk's (blocks, block, span) scores as (rows, blocks per row, block, span)."""
    return scores.view(chunk.rows, -1, *scores.shape[1:])


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _to_rows(x, heads, plan, dtype, front):
    """x (batch, heads, n, dim) -> (front + len(heads) * batch * n_padded, dim): the chosen heads'
    rows, heads-major, zero elsewhere. A view when nothing needs moving (one sequence, every head in
    order, no padding), else one copy."""
    dim, heads = x.shape[-1], list(heads)
    if (
        not front
        and plan.n == plan.n_padded
        and plan.batch == 1
        and heads == list(range(x.shape[1]))
        and x.dtype == dtype
        and x.is_contiguous()
    ):
        return x.view(-1, dim)
    rows = x.new_empty(front + len(heads) * plan.batch * plan.n_padded, dim, dtype=dtype)
    rows[:front].zero_()
    rows[front:].view(len(heads), plan.batch, plan.n_padded, dim)[:, :, plan.n :].zero_()
    positions = _positions(rows, plan, front)
    if heads == list(range(x.shape[1])):
        positions.copy_(x.transpose(0, 1))  # one copy, not one per head
    else:  # heads in band order, or k/v heads repeated per query head
        for i, head in enumerate(heads):
            positions[i].copy_(x[:, head])
    return rows


def _positions(rows, plan, front):
    """The real positions of a rows buffer: (heads, batch, n, dim)."""
    return rows[front:].view(-1, plan.batch, plan.n_padded, rows.shape[-1])[:, :, : plan.n]


def _from_rows(rows, plan, front):
    """The inverse view of `_to_rows` for every head of the rows: (batch, heads, n, dim)."""
    return _positions(rows, plan, front).transpose(0, 1)


def _sum_heads(rows, heads, shape, plan, front):
    """Gradient rows -> (batch, heads, n, dim) of the input, summing rows that share a head (GQA)."""
    if list(heads) == list(range(shape[1])):
        return _from_rows(rows, plan, front)
    grad = rows.new_zeros(shape)
    positions = _positions(rows, plan, front)
    for i, head in enumerate(heads):
        grad[:, head] += positions[i]
    return grad


def _blocks(rows, band, plan):
    """The band's query blocks: (blocks, block, dim) of a rows buffer without front rows."""
    first, count = band.first_row * plan.n_padded, band.rows * plan.n_padded
    return rows[first : first + count].view(-1, band.block, rows.shape[-1])


def _spans(rows, band, plan):
    """The keys each query block sees, (blocks, span, dim): overlapping views of a buffer with front rows."""
    dim, count = rows.shape[-1], band.rows * plan.n_padded // band.block
    start = rows.storage_offset() + _first_key_row(band, plan) * dim
    return rows.as_strided((count, band.span, dim), (band.block * dim, dim, 1), start)


def _band_views(band, plan, queries, keys, values):
    """The band's query blocks, key spans and value spans."""
    return _blocks(queries, band, plan), _spans(keys, band, plan), _spans(values, band, plan)


def _first_key_row(band, plan):
    """The row of the first key of the band's first span, in a buffer with front rows."""
    return plan.front + band.first_row * plan.n_padded - band.reach


class _Chunk(NamedTuple):
    blocks: slice  # of the band's blocks
    rows: int  # whole rows, or 1 for a piece of a row
    first_in_row: int  # the index of the chunk's first block within its row


CHUNK_BYTES = 4 * 2**20


def _scores_per_chunk(rows):
    """CHUNK_BYTES in scores of the rows' dtype (read at each call: tests change CHUNK_BYTES)."""
    return CHUNK_BYTES // rows.element_size()


@lru_cache(maxsize=256)
def _chunks(band, plan, scores_per_chunk):
    """The band's blocks in chunks of about `scores_per_chunk` scores: whole rows, or pieces of one row."""
    per_row = plan.n_padded // band.block
    target = max(1, scores_per_chunk // (band.block * band.span))
    if per_row <= target:
        rows = target // per_row
        return tuple(
            _Chunk(slice(r * per_row, min(band.rows, r + rows) * per_row), min(rows, band.rows - r), 0) for r in range(0, band.rows, rows)
        )
    size = math.ceil(per_row / math.ceil(per_row / target))
    return tuple(
        _Chunk(slice(r * per_row + a, r * per_row + min(per_row, a + size)), 1, a)
        for r in range(band.rows)
        for a in range(0, per_row, size)
    )


def _accumulate_tiles(grad_rows, weights, block_values, first_key, band, alpha):
    """grad_rows[keys of each span] += alpha * weights^T @ block_values, one span tile at a time:
    tile t of every block is B consecutive keys, so each tile's sum is one in-place baddbmm (one
    per tile, not one for all: tile t of block j and tile t+1 of block j-1 are the same keys)."""
    blocks, block, dim = weights.shape[0], band.block, grad_rows.shape[-1]
    tiles = band.span // block
    start = grad_rows.storage_offset() + first_key * dim
    targets = grad_rows.as_strided((tiles, blocks, block, dim), (block * dim, block * dim, dim, 1), start)
    weight_tiles = weights.view(blocks, block, tiles, block).permute(2, 0, 3, 1)  # (tile, block, key, query)
    for target, weight in zip(targets, weight_tiles):
        target.baddbmm_(weight, block_values, alpha=alpha)


def _mask_before_row_start(scores, band, chunk):
    """The first blocks of a row see keys before position 0 (another row's, or the zero front)."""
    per_row = scores.shape[0] // chunk.rows
    early = min(band.reach // band.block - chunk.first_in_row, per_row)
    if early > 0:
        mask = _before_start_mask(band.block, band.reach, scores.dtype, scores.device)
        first = chunk.first_in_row
        scores.view(chunk.rows, per_row, band.block, band.span)[:, :early].add_(mask[first : first + early])


@lru_cache(maxsize=128)
def _band_mask(window, block, dtype, device):
    """(block, span) additive mask: query i of a block sees span key c iff 0 <= i + reach - c < W.
    Additive float: the scores are accumulated onto it."""
    band = _Band(window, block, 0, 0)
    lag = torch.arange(block, device=device)[:, None] + band.reach - torch.arange(band.span, device=device)
    visible = (lag >= 0) & (lag < window)
    return torch.zeros(block, band.span, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


@lru_cache(maxsize=128)
def _before_start_mask(block, reach, dtype, device):
    """(reach / block, 1, span) additive mask: span key c of a row's block j lies before position 0.
    Added, not filled: a broadcast add is several times faster than masked_fill_ here."""
    key = torch.arange(reach + block, device=device)
    before = key < reach - block * torch.arange(reach // block, device=device)[:, None]
    return torch.zeros(before.shape, dtype=dtype, device=device).masked_fill_(before, float("-inf"))[:, None, :]
