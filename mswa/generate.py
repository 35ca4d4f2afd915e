"""Incremental decoding for `mswa.model.LanguageModel`: per-head bounded KV caches, linear states, sampling.

A head with window W sees itself and the W - 1 keys before it, so that is all it needs: the heads of a
layer that share a window share one `KVStore`, a ring buffer of W keys and values written at position % W
(a new token writes its key first, over the one that has just left its window, and then attends to the ring
where it lies: no reordering copy); full-attention heads keep a growing store; linear-attention
layers carry their running sums (`LinearAttentionState`). The cache of a windowed model is therefore
sum over heads of W x 2 x head_dim x element size per layer, whatever the context length
(`cache_bytes` is that closed form), and a decoding step costs O(sum of windows), not O(context).

Decoding goes through the model's own forward, so the projections, rotary positions and mixing are one
code path: `model(prompt, cache)` runs the prompt through the training kernel (`window_attention`) and
leaves each group its last W keys; `model(tokens, cache)` then continues from `cache.seen`: one token at a
time against the rings, a chunk of tokens through `attend_past`. `generate` samples with it: greedy (temperature 0),
temperature, top-k, top-p and a seed.

The Hugging Face per-head cache (`mswa.hf.patch.window_cache`) keeps its keys in the same `KVStore`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mswa import native
from mswa.attention.linear import mapped_feature_dim
from mswa.rules import POSITIVE, POSITIVE_OR_NULL, RATE, Rule, check_value, is_number
from mswa.windows import Window

# One sequence's token attends to all of a layer's rings in one masked call (every head scores every ring slot of the
# layer, then keeps its own) while heads x slots of the layer stays within this; above it, and for several
# sequences (whose rings lie group by group, not sequence by sequence), one call per window group. A call costs a
# fixed ~10-20 us on CPU, which dominates small rings; the masked call's wasted scores grow with the heads and the
# slots. Measured (README: Performance) at the decoding benchmark's shape, 8 heads, one sequence: one call is faster
# up to 480 slots (mswa's four shallow layers), slower at 1920.
ONE_CALL_SCORES = 4096
# A call for one query per (sequence, head) goes through fused SDPA below this many (sequence, head, key) triples and
# through two batched products and a softmax from it: CPU SDPA's single-query path pays a few us per (sequence,
# head) whatever its keys, which dominates at large batches (SWA's layer at 16 sequences x 8 heads x 128 keys: 370
# us against 570, interleaved in the model), while for small calls its one call beats three (README: Performance).
PRODUCTS_FROM_KEYS = 4096


class KVStore:
    """Keys and values (batch, heads, slots, head_dim) of one head group: every one (limit None) or, as a ring
    buffer, the last `limit` (a window's W for decoding here; W - 1 in the Hugging Face cache). Slots are allocated
    on first use: `reserve` of them (at most `limit`), growing by doubling when a sequence outgrows it."""

    def __init__(self, limit: int | None, reserve: int = 0):
        self.limit, self.reserve, self.count = limit, reserve, 0  # count: tokens seen (stored or not)
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def stored(self) -> int:
        return self.count if self.limit is None else min(self.count, self.limit)

    def nbytes(self) -> int:
        """Bytes of the tensors held (measured, not computed from the windows)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values that queries at k's positions may see, in position order (the stored ones, then
        k, v themselves); then keeps k, v."""
        if self.limit is None:
            self.append(k, v)
            return self.keys[:, :, : self.count], self.values[:, :, : self.count]
        keys, values = (torch.cat([*self._in_order(held), new], dim=2) for held, new in ((self.keys, k), (self.values, v)))
        self.append(k, v)
        return keys, values

    def visible(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values where they lie (a view, in ring order: attention is order-free once rotary
        positions are applied)."""
        if self.stored == self.keys.shape[2]:  # a full ring (most steps): no slicing
            return self.keys, self.values
        return self.keys[:, :, : self.stored], self.values[:, :, : self.stored]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys and values (batch, heads, n, head_dim) of the next n positions (a ring: the last `limit`)."""
        n = k.shape[2]
        keep = n if self.limit is None else min(n, self.limit)
        first = self.count + n - keep  # position of the first kept token
        self._allocate(k, first + keep if self.limit is None else min(first + keep, self.limit))
        slot = first if self.limit is None else first % max(self.limit, 1)
        run = min(keep, self.keys.shape[2] - slot)  # up to the end of the buffer; a ring wraps the rest to its start
        for held, new in ((self.keys, k), (self.values, v)):
            held[:, :, slot : slot + run] = new[:, :, n - keep : n - keep + run]
            if keep > run:
                held[:, :, : keep - run] = new[:, :, n - keep + run :]
        self.count += n

    def apply(self, function) -> None:
        """Replace the held tensors by `function(tensor)` (batch selection and reordering in generate)."""
        if self.keys is not None:
            self.keys, self.values = function(self.keys), function(self.values)

    def _allocate(self, like: torch.Tensor, slots: int) -> None:
        size = 0 if self.keys is None else self.keys.shape[2]
        if self.keys is not None and slots <= size:
            return
        capacity = max(slots, self.reserve, 2 * size)
        capacity = capacity if self.limit is None else min(capacity, self.limit)
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        old = (self.keys, self.values)
        self.keys, self.values = like.new_empty(shape), like.new_empty(shape)
        if old[0] is not None:  # before a ring fills, slot = position: a plain copy keeps the layout
            self.keys[:, :, :size], self.values[:, :, :size] = old

    def _in_order(self, held: torch.Tensor | None) -> list[torch.Tensor]:
        """A ring's stored entries in position order, as one or two slices."""
        if held is None or self.limit == 0:
            return []
        if self.count <= self.limit:
            return [held[:, :, : self.count]]
        oldest = self.count % self.limit
        return [held[:, :, oldest:], held[:, :, :oldest]]


def _head_list(heads: slice | torch.Tensor) -> list[int]:
    return list(range(heads.start, heads.stop)) if isinstance(heads, slice) else heads.tolist()


def window_groups(windows: Sequence[Window]) -> list[tuple[Window, slice | torch.Tensor]]:
    """(window, heads) for every distinct window, heads as a slice when contiguous (a view), else an index."""
    groups: dict[Window, list[int]] = {}
    for head, window in enumerate(windows):
        groups.setdefault(window, []).append(head)
    return [
        (window, slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else torch.tensor(heads))
        for window, heads in groups.items()
    ]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one query per (sequence, head), q (batch, heads, 1, head_dim), to every key of k and v (batch,
    heads, keys, head_dim; each sequence's heads adjacent, as the rings and stores keep them): one fused call while
    batch x heads x keys stays below `PRODUCTS_FROM_KEYS`, else two batched products and a softmax."""
    batch, heads, _, dim = q.shape
    if batch * heads * k.shape[2] < PRODUCTS_FROM_KEYS:
        return F.scaled_dot_product_attention(q, k, v)
    keys, values = k.flatten(0, 1), v.flatten(0, 1)  # views
    scores = torch.baddbmm(q.new_empty(batch * heads, 1, keys.shape[1]), q.flatten(0, 1), keys.mT, beta=0, alpha=dim**-0.5)
    torch.ops.aten._softmax.out(scores, -1, False, out=scores)
    return torch.bmm(scores, values).view(batch, heads, 1, values.shape[-1])


def attend_past(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Sequence[Window], key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention for queries that are the newest q.shape[2] of the k.shape[2] keys (decoding; grouped-query k/v
    allowed): head h sees the keys within `windows[h]` of its query (one window: every head; None: all).

    `key_padding` (batch, >= keys) marks real keys, its last columns aligned with k; a padding query still sees
    itself, so its (ignored) row stays finite. Only the keys some window can reach are used."""
    n_query, n_key = q.shape[2], k.shape[2]
    if None not in windows:
        n_key = min(n_key, max(windows) + n_query - 1)
        k, v = k[:, :, -n_key:], v[:, :, -n_key:]
    gqa = q.shape[1] != k.shape[1]
    if n_query == 1 and key_padding is None and all(w is None or w >= n_key for w in windows):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)  # one query seeing every key: no mask
    lag = torch.arange(n_key - n_query, n_key, device=q.device)[:, None] - torch.arange(n_key, device=q.device)
    limits = torch.tensor([n_key if w is None else w for w in windows], device=q.device)
    mask = ((lag >= 0) & (lag < limits[:, None, None])).unsqueeze(0)  # (1, heads or 1, queries, keys)
    if key_padding is not None:
        mask = mask & (key_padding[:, None, None, -n_key:] | (lag == 0))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class LayerCache:
    """One layer's decoding state: a `KVStore` per window group (heads with one window share it) and, for
    linear and parallel-hybrid layers, `linear_state` (kept by `cached_linear_attention`).

    A window group's ring holds W slots, and the rings of all groups are views of one buffer per layer, each
    group's (batch, heads, W, head_dim) block contiguous: a new token writes the keys and values of every
    windowed head in one indexed copy, each over the one that has just left its window, then attends to the
    rings where they lie (no reordering copy: the W slots are exactly its window). On the CPU in fp32 with every
    head windowed, the write and the attention of every ring are one native call (`mswa.native`); else each group
    attends in its own call (`attend_one`), or, for one sequence's small rings (`ONE_CALL_SCORES`), all heads in
    one call over the whole buffer with a mask that gives each head its own ring. Chunks of several tokens attend
    in position order with a window mask."""

    def __init__(self, windows: Sequence[Window] | None, reserve: int = 0):
        windows = list(windows or [])
        self.groups = [(heads, window, KVStore(window, reserve)) for window, heads in window_groups(windows)]
        self.rings = [(_head_list(heads), window, store) for heads, window, store in self.groups if window is not None]
        ring_heads = [head for heads, _, _ in self.rings for head in heads]
        self.ring_heads = None if ring_heads == list(range(len(windows))) else torch.tensor(ring_heads)
        self.every_head_windowed = bool(self.rings) and len(self.rings) == len(self.groups)
        self.ring_keys = self.ring_values = None  # (rows, head_dim): group after group, each (batch, heads, W)
        self._first_slots = self._slot_windows = None  # per (sequence, windowed head): its ring's first row, its W
        self._rings_in_memory_order = None  # those rows ordered by first row
        self._write_slots: dict[tuple[int, ...], torch.Tensor] = {}
        self._ring_masks: dict[tuple[int, ...], torch.Tensor] = {}
        starts = [heads.start if isinstance(heads, slice) else -1 for heads, *_ in self.groups]
        # groups of consecutive heads in head order: split q, k, v and join the outputs as views, without indexing
        in_order = -1 not in starts and starts == sorted(starts)
        self.split_sizes = [heads.stop - heads.start for heads, *_ in self.groups] if in_order else None
        self.linear_state = None

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a prompt's keys and values (batch, heads, n, head_dim), each group its last W."""
        self._grow_rings(k)
        for heads, _, store in self.groups:
            store.append(k[:, heads], v[:, heads])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention outputs (batch, heads, n, head_dim) of n tokens that continue the stored ones; keeps them."""
        self._grow_rings(k)
        if q.shape[2] > 1:
            return self._attend_in_order(q, k, v)
        if self._native_step_applies(q):
            return self._native_step(q, k, v)
        self._write_rings(k, v)
        if self._in_one_call(q):
            return self._attend_rings_at_once(q)
        if self.split_sizes is None:
            out = q.new_empty(*q.shape[:3], v.shape[-1])
            for heads, _, store in self.groups:
                out[:, heads] = self._attend_store(store, q[:, heads], k, v, heads)
            return out
        queries = q.split(self.split_sizes, dim=1) if len(self.groups) > 1 else (q,)
        outs = [self._attend_store(store, group_q, k, v, heads) for (heads, _, store), group_q in zip(self.groups, queries)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    def _attend_store(store: KVStore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads) -> torch.Tensor:
        """One token against a store: a ring has it already (`_write_rings`); a full store appends its `heads` of
        k and v first."""
        if store.limit is None:
            store.append(k[:, heads], v[:, heads])
        return attend_one(q, *store.visible())

    def _native_step_applies(self, q: torch.Tensor) -> bool:
        """Whether one token goes through the native kernel: every head windowed, fp32 on the CPU, and the
        kernel built (`mswa.native`)."""
        return self.every_head_windowed and q.device.type == "cpu" and q.dtype == torch.float32 and native.kernel() is not None

    def _native_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token (batch, heads, 1, head_dim) of every sequence: one native call writes every ring and
        attends to each (sequence, head)'s filled slots where they lie (`mswa/native/ring_step.cpp`)."""
        batch, _, _, dim = q.shape
        rows = [self._ring_rows(x).contiguous() for x in (q, k, v)]
        out = native.kernel().ring_step(
            *rows,
            self.ring_keys,
            self.ring_values,
            self._first_slots,
            self._slot_windows,
            self._rings_in_memory_order,
            self._position(),
            dim**-0.5,
        )
        self._count_token()
        return self._in_head_order(out.view(batch, -1, 1, dim))

    def _in_one_call(self, q: torch.Tensor) -> bool:
        """Whether one token's heads all attend in one masked call (one sequence, several window groups, all
        windowed, few scores)."""
        several_rings = len(self.rings) > 1 and self.every_head_windowed
        return several_rings and q.shape[0] == 1 and q.shape[1] * self.ring_keys.shape[0] <= ONE_CALL_SCORES

    def _attend_rings_at_once(self, q: torch.Tensor) -> torch.Tensor:
        """One sequence's token (1, heads, 1, head_dim) over the layer's ring buffer in one call: the heads become
        the query rows of a single head that sees every slot, and a mask keeps each row to its own ring."""
        rows = q if self.ring_heads is None else q[:, self.ring_heads]
        out = F.scaled_dot_product_attention(
            rows.transpose(1, 2), self.ring_keys[None, None], self.ring_values[None, None], attn_mask=self._ring_mask()
        ).transpose(1, 2)
        return self._in_head_order(out)

    def _ring_rows(self, x: torch.Tensor) -> torch.Tensor:
        """One token's (batch, heads, 1, head_dim) rows of the windowed heads, (batch x ring heads, head_dim),
        sequence-major as the rings' slots are listed."""
        rows = x[:, :, 0] if self.ring_heads is None else x[:, self.ring_heads, 0]
        return rows.reshape(-1, rows.shape[-1])

    def _in_head_order(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs (batch, ring heads, ...) of the windowed heads, back in head order."""
        return out if self.ring_heads is None else torch.empty_like(out).index_copy_(1, self.ring_heads, out)

    def _position(self) -> int:
        return self.rings[0][2].count  # every ring has seen the same tokens

    def _count_token(self) -> None:
        for _, _, store in self.rings:
            store.count += 1

    def _ring_mask(self) -> torch.Tensor:
        """(heads in ring order, buffer slots) of one sequence: 0 on the filled slots of a head's own ring, -inf
        elsewhere; cached by the rings' fill (constant once they are full)."""
        key = tuple(store.stored for *_, store in self.rings)
        if key not in self._ring_masks:
            starts = self._first_slots.tolist()  # one sequence: a row per windowed head
            mask = self.ring_keys.new_full((len(starts), self.ring_keys.shape[0]), float("-inf"))
            stored = [store.stored for heads, _, store in self.rings for _ in heads]
            for row, (start, filled) in enumerate(zip(starts, stored)):
                mask[row, start : start + filled] = 0.0
            self._ring_masks = {key: mask}  # the fill only grows: older masks are never asked for again
        return self._ring_masks[key]

    def _grow_rings(self, like: torch.Tensor) -> None:
        """Make room in the layer's ring buffers (rows, head_dim), one for keys and one for values, for the n
        tokens of `like` (batch, heads, n, head_dim): each group's ring is a contiguous (batch, heads, slots,
        head_dim) block of them, of min(W, tokens so far) slots at least (`reserve` up front, doubling), never
        more than W."""
        if not self.rings:
            return
        seen, reserve = self.rings[0][2].count, self.rings[0][2].reserve
        old = [store.keys.shape[2] if store.keys is not None else 0 for *_, store in self.rings]
        if all(min(window, seen + like.shape[2]) <= size for (_, window, _), size in zip(self.rings, old)):
            return
        capacity = [min(window, max(seen + like.shape[2], reserve, 2 * size)) for (_, window, _), size in zip(self.rings, old)]
        batch, dim = like.shape[0], like.shape[-1]
        sizes = [batch * len(heads) * slots for (heads, *_), slots in zip(self.rings, capacity)]
        offsets = [sum(sizes[:g]) for g in range(len(self.rings))]
        # zeros, not garbage: the one-call path scores the slots not yet filled too (masked, but 0 x NaN is NaN)
        self.ring_keys, self.ring_values = like.new_zeros(sum(sizes), dim), like.new_zeros(sum(sizes), dim)
        for (heads, _, store), offset, slots, size in zip(self.rings, offsets, capacity, old):
            held = (store.keys, store.values)
            store.keys, store.values = (
                buffer[offset : offset + batch * len(heads) * slots].view(batch, len(heads), slots, dim)
                for buffer in (self.ring_keys, self.ring_values)
            )
            if size:  # a ring grows only before it fills, while slot = position: a plain copy keeps the layout
                store.keys[:, :, :size], store.values[:, :, :size] = held
        first_slots = [  # each (sequence, head)'s ring, sequence-major as `_write_rings` writes them
            (offset + (b * len(heads) + i) * slots, window)
            for b in range(batch)
            for (heads, window, _), offset, slots in zip(self.rings, offsets, capacity)
            for i in range(len(heads))
        ]
        self._first_slots, self._slot_windows = torch.tensor(first_slots, device=like.device).T.contiguous()
        self._rings_in_memory_order = self._first_slots.argsort()
        self._write_slots.clear()
        self._ring_masks.clear()

    def _write_rings(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token's keys and values (batch, heads, 1, head_dim) into every ring, in one copy each."""
        if not self.rings:
            return
        slots = self._slots_at(self._position())
        for buffer, new in ((self.ring_keys, k), (self.ring_values, v)):
            buffer.index_copy_(0, slots, self._ring_rows(new))
        self._count_token()

    def _slots_at(self, position: int) -> torch.Tensor:
        """The buffer row of each (sequence, windowed head) for a token at `position`, sequence-major: head i of a
        group of window W at position % W of its ring; cached by the positions modulo the windows."""
        key = tuple(position % window for _, window, _ in self.rings)
        if key not in self._write_slots:
            if len(self._write_slots) > 4096:  # windows with a large common multiple: keep the cache small
                self._write_slots.clear()
            self._write_slots[key] = self._first_slots + position % self._slot_windows
        return self._write_slots[key]

    def _attend_in_order(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        for heads, window, store in self.groups:
            keys, values = store.extend(k[:, heads], v[:, heads])
            out[:, heads] = attend_past(q[:, heads], keys, values, [window])
        return out

    def kv_bytes(self) -> int:
        return sum(store.nbytes() for *_, store in self.groups)

    def linear_bytes(self) -> int:
        state = self.linear_state
        return 0 if state is None else state.kv.nbytes + state.key_sum.nbytes


class DecodingCache:
    """What a `LanguageModel` needs to continue a sequence: a `LayerCache` per layer and the tokens seen.

    `reserve`: slots to allocate up front (e.g. prompt + new tokens - 1, the most a store will hold), so
    that full-attention stores never regrow; rings take at most their W."""

    def __init__(self, model, reserve: int = 0):
        self.seen = 0
        self.layers = [LayerCache(getattr(block.mixer, "windows", None), reserve) for block in model.blocks]

    def nbytes(self) -> dict[str, int]:
        """Bytes held, measured from the tensors: keys and values, linear states, and their total."""
        kv, linear = sum(layer.kv_bytes() for layer in self.layers), sum(layer.linear_bytes() for layer in self.layers)
        return {"kv": kv, "linear": linear, "total": kv + linear}


def cache_bytes(cfg, seen: int, batch: int = 1, element_size: int = 4) -> dict[str, int]:
    """The closed form of `DecodingCache.nbytes` after `seen` tokens for a model config (`ModelConfig`): per
    attention layer, sum over heads of min(seen, W) (full heads: seen) x 2 x head_dim x element size; per
    linear (or parallel) layer, the running sums heads x (M x head_dim + M) in float32, M the mapped feature size."""
    head_dim = cfg.d_model // cfg.n_head
    kv = linear = 0
    for layer in range(cfg.n_layer):
        kind = cfg.layer_mixer(layer)
        if kind in ("window", "parallel"):
            stored = sum(seen if w is None else min(seen, w) for w in cfg.layer_windows(layer))
            kv += batch * stored * 2 * head_dim * element_size
        if kind in ("linear", "parallel") and seen:
            features = mapped_feature_dim(cfg.linear_feature_map, cfg.linear_feature_dim)
            linear += batch * cfg.n_head * (features * head_dim + features) * 4
    return {"kv": kv, "linear": linear, "total": kv + linear}


# ----------------------------------------------------------------------------- sampling


SAMPLING_RULES = {  # the config's rules (mswa.rules), worded for sampling
    "max_new_tokens": Rule("an integer >= 1: ask for at least one new token", POSITIVE.ok),
    "temperature": Rule("a finite number >= 0 (0 = greedy, 1 = the model's distribution)", RATE.ok),
    "top_k": Rule("an integer >= 1, or unset to sample from every token", POSITIVE_OR_NULL.ok),
    "top_p": Rule("a number in (0, 1]: 1 keeps every token, smaller values keep the likeliest", lambda v: is_number(v) and 0 < v <= 1),
}


def check_sampling(max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0) -> None:
    """Refuse sampling settings that cannot work, in one sentence each, before any work."""
    for key, value in {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}.items():
        check_value(key, value, SAMPLING_RULES[key])


def check_prompt(cfg, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse an empty prompt, and a text longer than a learned-position model has positions for."""
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: give at least one token (a byte, or a word) to continue")
    total = prompt_tokens + max_new_tokens
    if cfg.positions == "learned" and total > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} = {total} tokens exceeds "
            f"model.max_seq_len={cfg.max_seq_len} of this learned-position model: shorten the prompt or ask for fewer tokens"
        )


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab): argmax at temperature 0, else a draw
    from softmax(logits / temperature) restricted to the top_k likeliest and to the smallest set of likeliest
    tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # of the tokens ranked above: the first token always stays
        ranked = ranked.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ranked)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
) -> torch.Tensor:
    """The prompt (batch, P) token ids followed by `max_new_tokens` sampled ones: (batch, P + max_new_tokens).

    The prompt is prefilled in one forward pass; each new token then costs one step against the cache. The
    model runs in eval mode (dropout off) and is put back as it was."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_prompt(model.cfg, prompt.shape[1], max_new_tokens)
    generator = None if seed is None else torch.Generator(prompt.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = DecodingCache(model, reserve=prompt.shape[1] + max_new_tokens - 1)
        logits = model(prompt, cache)[:, -1]
        new = []
        for step in range(max_new_tokens):
            new.append(sample_next(logits, temperature, top_k, top_p, generator))
            if step + 1 < max_new_tokens:
                logits = model(new[-1][:, None], cache)[:, -1]
    finally:
        model.train(was_training)
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1)
