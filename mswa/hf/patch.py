"""Multi-scale window attention inside a pretrained Hugging Face causal LM (Llama, Mistral, Qwen2...).

`apply_window_attention(model, windows)` gives every layer's attention its own per-head windows,
computed by `mswa.attention.window_attention`; the weights are untouched and `.remove()` restores
the model. Window convention: W means query i sees keys j with 0 <= i - j < W, which is exactly
Hugging Face's `sliding_window=W`.

How it plugs in: transformers' Llama-family attention modules call whatever function the config's
`_attn_implementation` names in `ALL_ATTENTION_FUNCTIONS`, after RoPE and the KV-cache update. We
register "mswa" there (the attention) and in `ALL_MASK_ATTENTION_FUNCTIONS` (the mask builder, which
returns only a key-padding mask, never an N x N one, so memory stays O(N * W)).

Three paths inside the attention function:
- no cache, no padding (training, scoring, prefill): `window_attention`, O(N * W);
- with a KV cache (decoding): the queries are the last positions of the keys; each head sees the
  keys inside its window of its own query position (`mswa.generate.attend_past`: one SDPA, masked
  unless every key is visible, over at most `max window + queries - 1` keys);
- padded batches (left padding in batched `generate`): the same masked SDPA, padding keys masked.
  Its mask is queries x keys, so a padded long prefill costs O(N^2) memory; unpadded inputs never do.

`window_cache(model)` is the per-head cache for `generate(..., cache=window_cache(model))`: in every
layer the k/v heads are grouped by the window they must serve (the largest of their query heads' windows
under grouped-query attention), and each group keeps only its own W - 1 past keys and values in a ring
buffer (`mswa.generate.KVStore`); heads with a full-causal query head keep everything. So `generate`
memory is bounded by the windows, per head, not by the sequence.

While patched, the model's own sliding-window settings (`config.sliding_window`, `layer_types`) are
cleared, since our windows replace them; `.remove()` restores them, so remove before `save_pretrained`
to save the original config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, prepare_padding_mask

from mswa.attention import check_backend, window_attention
from mswa.generate import KVStore, attend_past, window_groups
from mswa.windows import Window, fraction_to_tokens, validate_window_table

IMPLEMENTATION = "mswa"

__all__ = [
    "IMPLEMENTATION",
    "PerHeadWindowLayer",
    "WindowAttentionHandle",
    "apply_window_attention",
    "hf_base_model",
    "remove_window_attention",
    "resolve_windows",
    "window_cache",
    "patched_windows",
]


@dataclass
class WindowAttentionHandle:
    """What `apply_window_attention` changed; `.remove()` (or leaving the `with` block) undoes it."""

    model: torch.nn.Module
    windows: tuple[tuple[Window, ...], ...]
    backend: str
    previous_implementation: str
    saved_attributes: list[tuple[object, str, object]] = field(default_factory=list)

    def remove(self) -> None:
        remove_window_attention(self.model)

    def __enter__(self) -> WindowAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_window_attention(model, windows, *, seq_len: int | None = None, backend: str = "auto") -> WindowAttentionHandle:
    """Make every attention layer of `model` windowed; returns a handle whose `.remove()` undoes it.

    `windows`: a per-layer list of per-head windows (a `WindowSchedule` works too), or one value for
    every head. A window is an int >= 1 (tokens), None (full causal), or a float in (0, 1]: a
    fraction of `seq_len`, as the MSWA authors give windows (0.25 at seq_len=4096 -> 1024 tokens).
    Calling it again on a patched model replaces the windows; `.remove()` still restores the original.
    """
    hf_model = hf_base_model(model)
    config = hf_model.config.get_text_config()
    attentions = _attention_modules(hf_model)
    table = resolve_windows(windows, len(attentions), config.num_attention_heads, seq_len=seq_len)
    check_backend(backend)
    _check_attention_modules(attentions, config)
    handle = getattr(hf_model, "_mswa_handle", None)
    if handle is None:
        handle = WindowAttentionHandle(hf_model, table, backend, hf_model.config._attn_implementation)
        _switch_to_window_attention(hf_model, config, handle.saved_attributes)
        hf_model._mswa_handle = handle
    handle.windows, handle.backend = table, backend
    for attention, layer_windows in zip(attentions, table):
        attention.mswa_windows, attention.mswa_backend = layer_windows, backend
    return handle


def remove_window_attention(model) -> None:
    """Undo `apply_window_attention`: original attention implementation and config values back."""
    hf_model = hf_base_model(model)
    handle = getattr(hf_model, "_mswa_handle", None)
    if handle is None:
        raise ValueError("this model has no window attention to remove: apply_window_attention was not called on it.")
    for attention in _attention_modules(hf_model):
        del attention.mswa_windows, attention.mswa_backend
    for owner, name, value in reversed(handle.saved_attributes):
        setattr(owner, name, value)
    hf_model.set_attn_implementation(handle.previous_implementation)
    del hf_model._mswa_handle


def patched_windows(model) -> tuple[tuple[Window, ...], ...] | None:
    """The per-layer, per-head windows `model` currently runs with, or None if it is not patched."""
    handle = getattr(hf_base_model(model), "_mswa_handle", None)
    return None if handle is None else handle.windows


def window_cache(model) -> Cache:
    """The per-head KV cache for `generate(..., cache=window_cache(model))` on a patched model: one
    `PerHeadWindowLayer` per layer, in which each k/v head keeps the largest window - 1 of the query
    heads it serves (everything when one of them is full causal)."""
    windows = patched_windows(model)
    if windows is None:
        raise ValueError("window_cache needs a patched model: call apply_window_attention(model, windows) first.")
    config = hf_base_model(model).config.get_text_config()
    return Cache(layers=[PerHeadWindowLayer(kv_head_windows(layer, config.num_key_value_heads)) for layer in windows])


def kv_head_windows(windows, n_kv_head: int) -> list[Window]:
    """The window each k/v head must serve: the largest of its query heads' (grouped-query attention:
    query head h uses k/v head h // (heads / kv heads)); None when one of them is full causal."""
    per_kv = len(windows) // n_kv_head
    served = [windows[i * per_kv : (i + 1) * per_kv] for i in range(n_kv_head)]
    return [None if None in group else max(group) for group in served]


class PerHeadWindowLayer(CacheLayerMixin):
    """One layer of `window_cache`: k/v heads that serve the same window share a `KVStore` of W - 1 slots.

    `update` returns the keys and values the new queries may see, in position order and right-aligned:
    a group with a smaller window fills only the last columns (the others are zeros, which the attention
    masks out by window). Sizes for the mask are those of the whole sequence (offset 0), as for a dynamic
    cache, so every layer's padding mask lines up with its keys from the right."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, kv_windows: Sequence[Window]):
        super().__init__()
        self.kv_windows = list(kv_windows)
        self.reset()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        parts = [(heads, *store.extend(key_states[:, heads], value_states[:, heads])) for heads, store in self.groups]
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        length = max(keys.shape[2] for _, keys, _ in parts)
        shape = (*key_states.shape[:2], length, key_states.shape[3])
        all_keys, all_values = key_states.new_zeros(shape), value_states.new_zeros(shape)
        for heads, keys, values in parts:
            all_keys[:, heads, length - keys.shape[2] :] = keys
            all_values[:, heads, length - values.shape[2] :] = values
        return all_keys, all_values

    def nbytes(self) -> int:
        """Bytes of the keys and values held (measured from the tensors)."""
        return sum(store.nbytes() for _, store in self.groups)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.groups = [(heads, KVStore(None if w is None else w - 1)) for w, heads in window_groups(self.kv_windows)]
        self.seen, self.is_initialized = 0, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for _, store in self.groups:
            store.apply(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for _, store in self.groups:
            store.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "window_cache keeps only each window's last keys, so it cannot be cropped (assisted or speculative "
            "decoding); use the default cache for those."
        )


def resolve_windows(windows, n_layer: int, n_head: int, *, seq_len: int | None = None) -> tuple[tuple[Window, ...], ...]:
    """Windows as a (n_layer x n_head) tuple of ints >= 1 or None, fractions of `seq_len` turned into tokens.
    One value (a window or a fraction) serves every head."""
    table = getattr(windows, "windows", windows)  # a WindowSchedule carries its table in .windows
    if table is None or isinstance(table, (int, float)):
        table = [[table] * n_head for _ in range(n_layer)]
    if _is_sequence(table):
        table = [_fractions_in_tokens(row, f"windows[{layer}]", seq_len) for layer, row in enumerate(table)]
    return validate_window_table(table, n_layer, n_head, key="windows")


def _fractions_in_tokens(row, key: str, seq_len: int | None):
    """A row with its float windows (fractions of seq_len) in tokens; anything else is left to validate_window_table."""
    if not _is_sequence(row):
        return row
    return [fraction_to_tokens(w, seq_len, key=f"{key}[{head}]") if isinstance(w, float) else w for head, w in enumerate(row)]


def _is_sequence(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def hf_base_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention_modules(hf_model) -> list[torch.nn.Module]:
    layers = getattr(hf_model.get_decoder(), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(hf_model).__name__} has no decoder `layers[i].self_attn`: window attention supports Llama-family causal LMs."
        )
    return [layer.self_attn for layer in layers]


def _check_attention_modules(attentions, config) -> None:
    for attention in attentions:
        if not all(hasattr(attention, name) for name in ("scaling", "head_dim", "layer_idx")):
            raise ValueError(
                f"{type(attention).__name__} lacks scaling/head_dim/layer_idx: window attention supports Llama-family attention."
            )
        head_dim = attention.head_dim
        if not math.isclose(attention.scaling, head_dim**-0.5, rel_tol=1e-6):
            raise ValueError(
                f"{type(attention).__name__} scales scores by {attention.scaling}, not 1/sqrt(head_dim={head_dim}); "
                "window_attention supports only the standard scale."
            )
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"config.attention_dropout={config.attention_dropout}: window attention has no attention dropout; set it to 0.0.")


def _switch_to_window_attention(hf_model, config, saved: list) -> None:
    """Point the model at the "mswa" functions and silence its own sliding windows (ours replace them;
    left on, the model would build sliding masks and a cache that forgets keys our windows still see)."""
    hf_model.set_attn_implementation(IMPLEMENTATION)
    if hf_model.config._attn_implementation != IMPLEMENTATION:  # transformers only warns for such models
        raise ValueError(
            f"{type(hf_model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so window attention cannot be plugged in."
        )
    _save_and_set(saved, config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        _save_and_set(saved, config, "layer_types", ["full_attention"] * len(layer_types))
    for module in hf_model.modules():
        if getattr(module, "has_sliding_layers", False):
            _save_and_set(saved, module, "has_sliding_layers", False)


def _save_and_set(saved: list, owner, name: str, value) -> None:
    if hasattr(owner, name):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)


def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **_):
    """Mask builder for "mswa": only the (batch, positions) key-padding mask, None when nothing is padded.

    The attention function applies the windows itself; anything else the model asks for (packed
    sequences, extra and/or masks) is refused rather than dropped."""
    if mask_function is not causal_mask_function:
        raise ValueError(
            "window attention supports plain causal masks plus padding; this call asked for another mask "
            "(packed sequences in position_ids, or custom mask functions): give one sequence per row."
        )
    if int(q_offset) + q_length != kv_offset + kv_length:
        raise ValueError(
            "window attention needs the queries to be the newest keys (a dynamic cache); a static cache is not supported: "
            "use the default cache or window_cache(model)."
        )
    if attention_mask is None:
        return None
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, : kv_offset + kv_length]
    return None if bool(padding.all()) else padding


def _window_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """transformers attention interface: q (B, H, Nq, D), k/v (B, Hkv, Nk, D) after the cache update;
    returns (B, Nq, H, D) and no attention weights."""
    windows = getattr(module, "mswa_windows", None)
    if windows is None:
        raise ValueError(f"{type(module).__name__} (layer {module.layer_idx}) has no windows: use apply_window_attention(model, windows).")
    if dropout:
        raise ValueError(f"attention dropout={dropout}: window attention has none; set config.attention_dropout=0.0.")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"window attention takes a 2-D padding mask, got a {attention_mask.dim()}-D attention mask.")
    if attention_mask is None and query.shape[2] == key.shape[2]:
        out = window_attention(query, key, value, windows, backend=module.mswa_backend)
    else:
        out = attend_past(query, key, value, windows, attention_mask)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, _window_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, _padding_mask)
