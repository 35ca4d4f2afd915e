"""Tiny Hugging Face model helpers: random prompts, greedy decoding, and a reference attention that
masks each head's window explicitly, independent of the patch (mswa.hf) it checks. Import after
``pytest.importorskip("transformers")``."""

import torch
from transformers import AttentionInterface

VOCAB = 300
N = 40  # not a multiple of any kernel block


def tokens(batch=2, length=N):
    return torch.randint(3, VOCAB, (batch, length))


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def greedy_generate(model, prompt, steps, **kwargs):
    out = model.generate(
        prompt,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=2,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


_REFERENCE_WINDOWS = {}


def _reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    """Eager attention, head h of layer l seeing keys j with 0 <= i - j < window (None: j <= i)."""
    windows = _REFERENCE_WINDOWS[module.layer_idx]
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = query @ key.transpose(2, 3) * scaling
    i = torch.arange(query.shape[2])[:, None]
    j = torch.arange(key.shape[2])[None, :]
    for head, window in enumerate(windows):
        hidden = (j > i) if window is None else (j > i) | (i - j >= window)
        scores[:, head] = scores[:, head].masked_fill(hidden, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2), None


AttentionInterface.register("test_window_reference", _reference_attention)


def reference_logits(model, windows, ids):
    _REFERENCE_WINDOWS.clear()
    _REFERENCE_WINDOWS.update(enumerate(windows))
    previous = model.config._attn_implementation
    model.set_attn_implementation("test_window_reference")
    try:
        return logits(model, ids)
    finally:
        model.set_attn_implementation(previous)
