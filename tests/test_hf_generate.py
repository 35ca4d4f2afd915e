"""The per-head KV cache `window_cache` in `model.generate` of patched tiny Llama / Mistral models
(random weights, grouped-query attention: 4 query heads, 2 k/v heads).

References are independent of the cache: an eager attention with an explicit per-head window mask
over the whole generated sequence (tests/helpers/hf.py), and the cache size written out here."""

import pytest
import torch

pytest.importorskip("transformers")
from helpers.hf import VOCAB, greedy_generate, reference_logits, tokens  # noqa: E402
from mswa.hf import apply_window_attention, window_cache  # noqa: E402
from mswa.hf.tiny import tiny_model  # noqa: E402

HEAD_DIM = 64 // 4  # tiny_config: hidden 64, 4 query heads, 2 k/v heads
# Small windows, so that 10 + 30 tokens wrap every ring many times; W = 1 keeps nothing; None keeps all.
WINDOWS = {
    "windowed": [[2, 3, 1, 4], [5, 2, 3, 6]],
    "with_full_head": [[3, None, 1, 2], [6, 6, 2, 4]],
    "beyond_the_length": [[1, 60, 2, 3], [4, 4, 60, 1]],  # a ring of 59 that never fills beside wrapping ones
}


def expected_ring_bytes(windows, seen, batch=1, element_size=4):
    """Per layer, per k/v head whose ring has filled: (largest window of its two query heads - 1) keys and
    values. K/v heads serving a full-causal head, or a window longer than the sequence, have none."""
    total = 0
    for layer in windows:
        for kv_head in range(2):
            served = layer[2 * kv_head : 2 * kv_head + 2]
            if None not in served and max(served) - 1 <= seen:
                total += batch * (max(served) - 1) * 2 * HEAD_DIM * element_size
    return total


def held_bytes(cache, full_rings):
    """Bytes of the rings that have filled (full_rings), or of the stores still growing (the others)."""
    return sum(
        store.nbytes()
        for layer in cache.layers
        for _, store in layer.groups
        if (store.limit is not None and store.count >= store.limit) == full_rings
    )


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("case", sorted(WINDOWS))
def test_generate_with_the_per_head_cache_equals_one_forward_pass_past_every_wrap(family, case):
    windows = WINDOWS[case]
    model = tiny_model(family, vocab_size=VOCAB)
    apply_window_attention(model, windows)
    prompt, steps = tokens(1, 10), 30
    cache = window_cache(model)
    sequence, step_logits = greedy_generate(model, prompt, steps, cache=cache)
    expected = reference_logits(model, windows, sequence)[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(step_logits, expected, rtol=0, atol=1e-5)
    seen = sequence.shape[1] - 1  # the last token is sampled, never fed back
    assert held_bytes(cache, full_rings=True) == expected_ring_bytes(windows, seen)
    growing = sum(None in layer[i : i + 2] or max(layer[i : i + 2]) - 1 > seen for layer in windows for i in (0, 2))
    one_token = 2 * HEAD_DIM * 4
    growing_bytes = held_bytes(cache, full_rings=False)  # doubled whenever full
    assert seen * one_token * growing <= growing_bytes <= 2 * (seen - 1) * one_token * growing
    assert sum(layer.nbytes() for layer in cache.layers) == held_bytes(cache, True) + held_bytes(cache, False)


def test_each_kv_head_group_keeps_its_own_window():
    model = tiny_model("llama", vocab_size=VOCAB)
    apply_window_attention(model, [[2, 5, 1, 1], [8, 8, None, 3]])
    cache = window_cache(model)
    greedy_generate(model, tokens(1, 20), 4, cache=cache)
    kept = [[(store.limit, store.stored) for _, store in layer.groups] for layer in cache.layers]
    assert kept == [[(4, 4), (0, 0)], [(7, 7), (None, 23)]]  # k/v head 0 of layer 0 serves windows 2 and 5
    rings = [store for layer in cache.layers for _, store in layer.groups if store.limit is not None]
    assert [store.keys.shape[2] for store in rings] == [4, 0, 7]  # exactly W - 1 slots


def test_left_padded_batch_with_the_per_head_cache_generates_like_each_prompt_alone():
    windows = WINDOWS["with_full_head"]
    model = tiny_model("llama", vocab_size=VOCAB)
    apply_window_attention(model, windows)
    short, long = tokens(1, 5), tokens(1, 12)
    batch = torch.full((2, 12), 2)
    batch[0, -5:], batch[1] = short[0], long[0]
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :7] = 0
    steps = 16
    got_tokens, got_logits = greedy_generate(model, batch, steps, attention_mask=mask, cache=window_cache(model))
    for row, prompt in enumerate([short, long]):
        alone = greedy_generate(model, prompt, steps)
        torch.testing.assert_close(got_logits[row], alone[1][0], rtol=0, atol=1e-4)
        assert torch.equal(got_tokens[row, -steps:], alone[0][0, -steps:])


def test_sampling_several_sequences_per_prompt_repeats_the_cache_per_row():
    model = tiny_model("llama", vocab_size=VOCAB)
    apply_window_attention(model, WINDOWS["windowed"])
    prompt = tokens(1, 8)
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=20, num_return_sequences=3, pad_token_id=2)
    torch.manual_seed(1)
    cached = model.generate(prompt, cache=window_cache(model), **kwargs)
    torch.manual_seed(1)
    default = model.generate(prompt, **kwargs)
    assert cached.shape == (3, 20) and torch.equal(cached, default)


def test_window_cache_needs_a_patched_model():
    with pytest.raises(ValueError, match="apply_window_attention"):
        window_cache(tiny_model("llama", vocab_size=VOCAB))
