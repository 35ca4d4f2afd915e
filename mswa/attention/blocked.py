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

With the native kernels (`mswa.native`, CPU, hard windows), the chunk loops are C++ on a pool of threads that
wait blocked, running the same operations without Python's lock, and fp32 bands of windows up to `DIRECT_WINDOW`
skip the blocks: each query scores only its own keys (`mswa/native/direct_band.cpp`), its probabilities stored
as (positions, W).

Grouped-query k/v rows are repeated per query head in the layout and summed back in the backward.
Half-precision inputs are computed in fp32 (the layout copy converts them) and the output cast back,
as fused SDPA does inside. Heads with no window (None, or W >= N) run fused causal SDPA instead.
"""

import contextlib
import contextvars
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mswa import native


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
    if q.shape[0] == 0:  # no sequences: an empty output, its gradients (empty) still reaching the inputs
        return q.new_zeros(*q.shape[:3], v.shape[-1]) + 0 * (q.sum() + k.sum() + v.sum())
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
        # the products run in the dtype chosen here, on the workers of `_for_each_chunk` or of the native loop
        native_loop = _native_loop(q, plan)
        with torch.autocast(q.device.type, enabled=False), _workers_only(q, native_loop) as workers:
            return _BandAttention._forward(ctx, q, k, v, plan, spans, workers, native_loop)

    @staticmethod
    def backward(ctx, grad_out):
        native_loop = _native_loop(grad_out, ctx.plan)
        with torch.autocast(grad_out.device.type, enabled=False), _workers_only(grad_out, native_loop) as workers:
            return _BandAttention._backward(ctx, grad_out, workers, native_loop)

    @staticmethod
    def _forward(ctx, q, k, v, plan, spans, workers, native_loop):
        dtype = _compute_dtype(q.dtype)
        q_rows = _to_rows(q, plan.heads, plan, dtype, front=0)
        k_rows, v_rows = (_to_rows(x, plan.kv_heads, plan, dtype, plan.front) for x in (k, v))
        out_rows = torch.empty_like(q_rows)
        scale = q.shape[-1] ** -0.5
        direct = tuple(_direct(band, dtype, native_loop) for band in plan.bands)
        probs = [
            q_rows.new_empty(band.rows * plan.n_padded, band.window)
            if is_direct
            else q_rows.new_empty(band.rows * plan.n_padded // band.block, band.block, band.span)
            for band, is_direct in zip(plan.bands, direct)
        ]
        views = [(*_band_views(band, plan, q_rows, k_rows, v_rows), _blocks(out_rows, band, plan)) for band in plan.bands]
        masks = [_band_mask(band.window, band.block, dtype, q.device) for band in plan.bands]
        softs = [_soft_mask(spans, band, plan, dtype) if spans is not None else None for band in plan.bands]

        if native_loop is not None:
            before_starts = [_before_start_mask(band.block, band.reach, dtype, q.device) for band in plan.bands]
            args = (probs, *map(list, zip(*views)), masks, before_starts, *_band_sizes(plan), plan.n_padded)
            native_loop.band_forward(*args, _chunk_table(plan, _scores_per_chunk(q_rows), workers, direct), scale, workers)

        def forward_chunk(item, worker):  # a chunk's scores stay in cache from product to softmax to product
            b, chunk = item
            (queries, keys, values, out), band = views[b], plan.bands[b]
            scores = probs[b][chunk.blocks]
            torch.baddbmm(masks[b], queries[chunk.blocks], keys[chunk.blocks].mT, alpha=scale, out=scores)
            _mask_before_row_start(scores, band, chunk)
            if softs[b] is not None:
                _per_row(scores, chunk).add_(softs[b].log_mask[_chunk_rows(band, plan, chunk), None])
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            torch.bmm(scores, values[chunk.blocks], out=out[chunk.blocks])

        if native_loop is None:
            _for_each_chunk(plan, q_rows, forward_chunk)
        spans = spans.detach() if spans is not None else q_rows.new_empty(0)
        ctx.save_for_backward(q_rows, k_rows, v_rows, spans, *probs)  # tensors only here: saved-tensor hooks see them all
        ctx.plan, ctx.scale, ctx.direct = plan, scale, direct
        ctx.dtypes, ctx.shapes = (q.dtype, k.dtype), (q.shape, k.shape)
        return _from_rows(out_rows, plan, front=0).to(q.dtype)

    @staticmethod
    def _backward(ctx, grad_out, workers, native_loop):
        q_rows, k_rows, v_rows, spans, *probs = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        learned = plan.ramp is not None
        grad_spans = torch.zeros(len(plan.heads), dtype=q_rows.dtype, device=q_rows.device) if learned else None
        grad_out_rows = _to_rows(grad_out, range(len(plan.heads)), plan, q_rows.dtype, front=0)
        grad_q = torch.empty_like(q_rows)
        # key and value gradients of neighbouring chunks overlap: each worker adds into its own buffers,
        # which it zeroes when it takes its first chunk (in parallel, and not at all for an idle worker)
        grad_k, grad_v = ([torch.empty_like(k_rows) for _ in range(workers)] for _ in range(2))
        started = [False] * workers
        views = [
            (*_band_views(band, plan, q_rows, k_rows, v_rows), _blocks(grad_out_rows, band, plan), _blocks(grad_q, band, plan))
            for band in plan.bands
        ]
        softs = [_soft_mask(spans, band, plan, q_rows.dtype) if learned else None for band in plan.bands]
        span_terms = []  # (band, rows, their span gradients) per chunk: pieces of one row may run at once, so summed after

        def backward_chunk(item, worker):
            if not started[worker]:
                grad_k[worker].zero_()
                grad_v[worker].zero_()
                started[worker] = True
            b, chunk = item
            (queries, keys, values, grad_blocks, grad_queries), band, prob = views[b], plan.bands[b], probs[b]
            blocks, first_key = chunk.blocks, _first_key_row(band, plan) + chunk.blocks.start * band.block
            _accumulate_tiles(grad_v[worker], prob[blocks], grad_blocks[blocks], first_key, band, alpha=1.0)
            grad_scores = torch.bmm(grad_blocks[blocks], values[blocks].mT)
            torch.ops.aten._softmax_backward_data.out(grad_scores, prob[blocks], -1, prob.dtype, grad_input=grad_scores)
            if softs[b] is not None:  # d score / d z = d log m / d z, on the ramp only
                rows = _chunk_rows(band, plan, chunk)
                span_terms.append((b, rows, (_per_row(grad_scores, chunk) * softs[b].slope[rows, None]).sum((1, 2, 3))))
            grad_queries[blocks].baddbmm_(grad_scores, keys[blocks], beta=0, alpha=scale)
            _accumulate_tiles(grad_k[worker], grad_scores, queries[blocks], first_key, band, alpha=scale)

        if native_loop is None:
            _for_each_chunk(plan, q_rows, backward_chunk)
            grad_k, grad_v = (_summed([grads[w] for w in range(workers) if started[w]]) for grads in (grad_k, grad_v))
        else:  # the native loop sums the workers' buffers into one of them itself
            first_keys = [_first_key_row(band, plan) for band in plan.bands]
            args = (probs, *map(list, zip(*views)), grad_k, grad_v, *_band_sizes(plan), first_keys, plan.n_padded)
            table = _chunk_table(plan, _scores_per_chunk(q_rows), workers, ctx.direct)
            total = native_loop.band_backward(*args, table, scale, workers)
            grad_k, grad_v = grad_k[total], grad_v[total]
        for b, rows, term in span_terms:
            softs[b].grad_rows[rows] += term
        for soft in softs:
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


# Bands of windows up to this attend directly with the native loops, not in blocks: a block's span wastes most of
# its products on a small window, and its products are too small for the GEMM library to run well. Measured per
# band (2 heads, head_dim 64, 4k, one thread, fwd+bwd, interleaved): direct against blocked 4.7 vs 12.0 ms at W 8,
# 9.7 vs 18.7 at W 32, 15.2 vs 22.1 at W 64, a tie at W 128 (21.0 vs 20.7), slower from W 256 (51 vs 34).
DIRECT_WINDOW = 64
DIRECT_PIECE = 256  # positions per direct chunk at least


def _native_loop(x, plan):
    """The native chunk loops (`mswa.native`) for hard windows on the CPU, where they could be built; else None
    (learned spans and GPUs take the Python loop)."""
    return native.kernel() if x.device.type == "cpu" and plan.ramp is None else None


def _workers_for(rows):
    """CPU threads that take chunks in parallel (torch's thread count); 1 on a GPU, whose kernels are queued."""
    return 1 if rows.device.type != "cpu" else _Workers.threads_here.get(torch.get_num_threads())


@contextlib.contextmanager
def _workers_only(x, native_loop=None):
    """Yields the kernel's worker count. With several CPU threads, what the kernel runs outside its workers
    (small fills, views) runs on this thread alone, opening no OpenMP parallel region: a team that has
    finished one spins for milliseconds waiting for the next, burning the CPU that the workers (and any
    other process) need. With the native loop, the layout copies and gradient sums run here too: shared out
    to the Python pool, whose threads take turns on Python's lock, they took longer than alone (mswa's
    layers at 1k, two threads: 0.648 of one thread's time with them shared, 0.615 without). torch's thread
    count is back afterwards."""
    threads = _workers_for(x)
    if threads == 1:
        yield 1
        return
    token = _Workers.threads_here.set(1 if native_loop is not None else threads)
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)
        _Workers.threads_here.reset(token)


def _for_each_chunk(plan, rows, work):
    """work((band index, chunk), worker) for every chunk of every band. With several CPU threads, each of
    `_Workers` takes the next chunk when done with one and runs its products single-threaded: no
    synchronisation between one product and the next (torch's own parallelism splits every product
    evenly between its threads and waits for the slowest at every one, so a thread descheduled by
    another process stalled them all), and one that is descheduled delays only its own chunk. Chunks are
    cut small enough that every thread gets several, largest first."""
    _in_parallel(rows, _chunk_items(plan, _scores_per_chunk(rows), _workers_for(rows)), work)


def _chunk_items(plan, per_chunk, workers):
    """(band index, chunk) for every chunk of every band, largest first, each about `per_chunk` scores
    and smaller where needed to give each of `workers` several."""
    if workers > 1:
        total = sum(band.rows * plan.n_padded * band.span for band in plan.bands)
        per_chunk = min(per_chunk, max(1, total // (4 * workers)))
    items = [(b, chunk) for b, band in enumerate(plan.bands) for chunk in _chunks(band, plan, per_chunk)]
    items.sort(key=lambda item: -(item[1].blocks.stop - item[1].blocks.start) * plan.bands[item[0]].span)
    return items


@lru_cache(maxsize=64)  # built in Python: ~0.1 ms a layer, once per shape
def _chunk_table(plan, scores_per_chunk, workers, direct):
    """The chunks as the native loops read them, largest first: (chunks, 6) int64 rows of (kind, band, start,
    end, layout rows, first block's index in its row). Kind 0: `_chunk_items`' blocks of the blocked bands;
    kind 1: pieces of the positions of the direct bands, several per worker."""
    table = []  # (scores computed, row)
    for b, chunk in _chunk_items(plan, scores_per_chunk, workers):
        if not direct[b]:
            start, end, band = chunk.blocks.start, chunk.blocks.stop, plan.bands[b]
            table.append(((end - start) * band.block * band.span, (0, b, start, end, chunk.rows, chunk.first_in_row)))
    for b, band in enumerate(plan.bands):
        if direct[b]:
            positions = band.rows * plan.n_padded
            piece = max(DIRECT_PIECE, math.ceil(positions / (4 * workers)))
            for start in range(0, positions, piece):
                end = min(start + piece, positions)
                table.append(((end - start) * band.window, (1, b, start, end, 0, 0)))
    table.sort(key=lambda item: -item[0])
    return torch.tensor([row for _, row in table], dtype=torch.int64)


def _band_sizes(plan):
    """Each band's window, reach and block size, as lists for the native loops."""
    return [band.window for band in plan.bands], [band.reach for band in plan.bands], [band.block for band in plan.bands]


def _direct(band, dtype, native_loop):
    """Whether a band's queries attend directly to their own keys (`mswa/native/direct_band.cpp`): small windows,
    fp32, with the native loops."""
    return native_loop is not None and dtype == torch.float32 and band.window <= DIRECT_WINDOW


def _in_parallel(like, items, work):
    """work(item, worker) for every item: on `_Workers` with several CPU threads (see `_for_each_chunk`), else
    here, in order, as worker 0."""
    workers = _workers_for(like)
    if workers == 1:
        for item in items:
            work(item, 0)
    else:
        _Workers.get(workers).run(items, work)


def _summed(buffers):
    """The first buffer plus the others, added in row pieces shared out to the workers."""
    first, others = buffers[0], buffers[1:]

    def add_others(rows, worker):
        for other in others:
            first[rows].add_(other[rows])

    if others:
        size = math.ceil(len(first) / 8)
        _in_parallel(first, [slice(start, start + size) for start in range(0, len(first), size)], add_others)
    return first


class _Workers:
    """A pool of threads for `_for_each_chunk`, each running torch single-threaded, numbered 0.. so that
    each can own accumulation buffers."""

    _pool = None
    threads_here = contextvars.ContextVar("threads_here", default=None)  # the workers wanted while in `_workers_only`

    @classmethod
    def get(cls, threads):
        if cls._pool is None or cls._pool.threads != threads:
            if cls._pool is not None:
                cls._pool._executor.shutdown(wait=False)
            cls._pool = cls(threads)
        return cls._pool

    @classmethod
    def forget(cls):
        """In a forked child the pool's threads do not exist: it starts its own when needed."""
        cls._pool = None

    def __init__(self, threads):
        self.threads, self._numbers, self._local = threads, itertools.count(), threading.local()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="mswa-blocked", initializer=self._start)

    def _start(self):
        self._local.number = next(self._numbers)
        torch.set_num_threads(1)  # this thread's OpenMP and MKL settings (`_workers_only` restores the default)

    def run(self, items, work):
        """work(item, worker number) for every item; each worker takes the next item when done with one."""
        queue, lock = iter(items), threading.Lock()
        inference = torch.is_inference_mode_enabled()  # per thread, like grad mode: the caller's holds here too

        def take_items():
            with torch.inference_mode(inference), torch.no_grad():  # no product here is differentiated
                while True:
                    with lock:
                        item = next(queue, None)
                    if item is None:
                        return
                    work(item, self._local.number)

        for future in [self._executor.submit(take_items) for _ in range(self.threads)]:
            future.result()


os.register_at_fork(after_in_child=_Workers.forget)


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
    if heads == list(range(x.shape[1])) and _workers_for(x) == 1:
        positions.copy_(x.transpose(0, 1))  # one copy, not one per head
    else:  # heads in band order, k/v heads repeated per query head, or heads shared out to the workers
        _in_parallel(x, list(enumerate(heads)), lambda item, worker: positions[item[0]].copy_(x[:, item[1]]))
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
