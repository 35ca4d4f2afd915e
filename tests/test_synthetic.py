import lzma
import math
import os

import numpy as np
import pytest

from mswa.data import synthetic
from mswa.data.synthetic import MARKERS, SyntheticSettings, generate, load

# Small vocabulary, wide jitter and short copies: many copies are ambiguous (several distances fit).
AMBIGUOUS = dict(
    n_bytes=20_000,
    n_words=20,
    n_successors=2,
    copy_distances=(4, 30, 100),
    copy_jitter=0.5,
    copy_length=6,
    copy_probability=0.05,
)


def reference_p_distance(law: str, d: int, low: int, high: int) -> float:
    """p(d) of a copy distance in [low, high]: equal, or a continuous log-uniform law on [low, high + 1) binned to integers."""
    return 1 / (high - low + 1) if law == "uniform" else math.log((d + 1) / d) / math.log((high + 1) / low)


def decode_bits(data: bytes, settings: SyntheticSettings, language) -> tuple[list[float], int]:
    """Reference: -log2 p of each event, read from the bytes alone, and the count of ambiguous copies."""
    word_ids = {w: i for i, w in enumerate(language.words)}
    n_scales = len(settings.copy_distances)
    p_word = 1 - n_scales * settings.copy_probability
    bits, previous, position, ambiguous = [], None, 0, 0
    while position < len(data):
        after_warmup = len(bits) >= settings.warmup_events
        if data[position] in MARKERS:
            assert after_warmup, f"copy marker at event {len(bits)}, inside the warm-up"
            low, high = settings.copy_ranges[MARKERS.index(data[position])]
            start, length = position + 1, settings.copy_length
            fits = [d for d in range(low, high + 1) if all(data[start + i] == data[start + i - d] for i in range(length))]
            assert fits, f"copy at byte {start} reproduces no byte span at a distance in [{low}, {high}]"
            ambiguous += len(fits) > 1
            bits.append(
                -math.log2(settings.copy_probability) - math.log2(sum(reference_p_distance(settings.copy_law, d, low, high) for d in fits))
            )
            position = start + length
        else:
            end = data.index(b" ", position)
            word = word_ids[data[position:end]]
            if previous is None:
                p = language.word_probs[word]
            else:
                favourite = sum(q for k, q in enumerate(language.successor_probs) if language.successors[previous, k] == word)
                p = settings.successor_weight * favourite + (1 - settings.successor_weight) * language.word_probs[word]
            bits.append(-math.log2(p) - (math.log2(p_word) if after_warmup else 0.0))
            previous, position = word, end + 1
    return bits, ambiguous


@pytest.mark.parametrize(
    ("successor_weight", "copy_law"), [(0.5, "uniform"), (1.0, "uniform"), (0.5, "log_uniform")]
)  # 1.0: a non-successor word would have p = 0
def test_event_bits_match_a_decoder_that_reads_only_the_bytes(successor_weight, copy_law):
    settings = SyntheticSettings(**AMBIGUOUS, successor_weight=successor_weight, copy_law=copy_law)
    sample = generate(settings)
    bits, ambiguous = decode_bits(bytes(sample.data), settings, sample.language)
    assert ambiguous > 10  # the sum over distances is really exercised
    np.testing.assert_allclose(sample.event_bits, bits, rtol=1e-12)


def test_floor_matches_the_analytic_rate_of_a_memoryless_configuration():
    # Independent words and one exact distance per scale: the expected rate has a closed form.
    settings = SyntheticSettings(n_bytes=300_000, successor_weight=0.0, copy_jitter=0.0, n_words=200)
    sample = generate(settings)
    zipf = sample.language.word_probs
    lengths = np.array([len(w) for w in sample.language.words])
    p_copy = settings.copy_probability
    p_word = 1 - len(settings.copy_distances) * p_copy
    n_scales = len(settings.copy_distances)
    type_bits = -p_word * math.log2(p_word) - n_scales * p_copy * math.log2(p_copy)
    bits_per_event = type_bits + p_word * float(-(zipf * np.log2(zipf)).sum())
    bytes_per_event = p_word * float(zipf @ (lengths + 1)) + n_scales * p_copy * (1 + settings.copy_length)
    realised = sample.event_bits.sum() / len(sample.data)
    assert realised == pytest.approx(bits_per_event / bytes_per_event, rel=0.005)


def test_generation_is_deterministic_in_the_seed():
    first, again = generate(SyntheticSettings(**AMBIGUOUS)), generate(SyntheticSettings(**AMBIGUOUS))
    other = generate(SyntheticSettings(**AMBIGUOUS, seed=1))
    np.testing.assert_array_equal(first.data, again.data)
    np.testing.assert_array_equal(first.event_bits, again.event_bits)
    assert not np.array_equal(first.data[:5000], other.data[:5000])


def test_load_returns_splits_and_a_floor_below_simple_baselines(tmp_path):
    corpus = load(str(tmp_path), n_bytes=200_000, valid_fraction=0.1, test_fraction=0.05)
    assert (corpus.name, corpus.unit, corpus.vocab_size, corpus.metric) == ("synthetic", "byte", 256, "bpc")
    assert {k: len(v) for k, v in corpus.splits.items()} == {"train": 170_000, "valid": 20_000, "test": 10_000}
    assert all(v.dtype == np.uint8 for v in corpus.splits.values())
    assert 0 < corpus.entropy_floor_bpb < 8
    everything = np.concatenate([np.asarray(corpus.splits[k]) for k in ("train", "valid", "test")])
    counts = np.bincount(everything, minlength=256)
    probs = counts[counts > 0] / counts.sum()
    unigram_bpb = float(-(probs * np.log2(probs)).sum())
    assert unigram_bpb > corpus.entropy_floor_bpb + 1
    # No code beats -log2 p(x) by k bits with probability above 2**-k, so a compressor bounds the floor.
    lzma_bits = 8 * len(lzma.compress(everything.tobytes(), preset=9))
    assert lzma_bits > corpus.entropy_floor_bpb * len(everything) - 64


def test_second_load_opens_the_cache_memory_mapped(tmp_path, monkeypatch):
    first = load(str(tmp_path), **AMBIGUOUS)
    monkeypatch.setattr(synthetic, "generate", lambda settings: pytest.fail("the cache was not reused"))
    second = load(str(tmp_path), **AMBIGUOUS)
    for name, array in second.splits.items():
        assert isinstance(array, np.memmap)
        np.testing.assert_array_equal(array, first.splits[name])
    assert second.entropy_floor_bpb == first.entropy_floor_bpb
    assert len(os.listdir(tmp_path)) == 1  # no temporary folder left behind


def test_changing_a_setting_uses_a_new_cache(tmp_path):
    base = load(str(tmp_path), **AMBIGUOUS)
    changed = load(str(tmp_path), **{**AMBIGUOUS, "copy_length": 7})
    assert len(os.listdir(tmp_path)) == 2
    assert not np.array_equal(base.splits["train"], changed.splits["train"])


def test_a_damaged_cache_is_reported(tmp_path):
    load(str(tmp_path), **AMBIGUOUS)
    (folder,) = os.listdir(tmp_path)
    np.save(tmp_path / folder / "valid.npy", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="valid.npy has .* bytes, not .*; delete .* and rerun"):
        load(str(tmp_path), **AMBIGUOUS)


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"n_bytes": -5}, "n_bytes"),
        ({"n_bytes": 10}, "empty"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"valid_fraction": 0.6, "test_fraction": 0.5}, "valid_fraction \\+ test_fraction"),
        ({"n_words": 10.5}, "n_words"),
        ({"copy_distances": (30, 0)}, "copy_distances"),
        ({"copy_distances": ()}, "copy_distances"),
        ({"copy_probability": 0.3}, "copy_probability"),
        ({"copy_jitter": 1.0}, "copy_jitter"),
        ({"successor_weight": 1.5}, "successor_weight"),
        ({"n_bites": 1000}, "unknown setting"),
    ],
)
def test_bad_settings_raise_before_any_work(tmp_path, bad, named):
    with pytest.raises(ValueError, match=named):
        load(str(tmp_path / "never"), **bad)
    assert not (tmp_path / "never").exists()


def test_log_uniform_distances_spread_evenly_over_octaves():
    low, high, n = 16, 111, 200_000
    distances = synthetic._draw_distances("log_uniform", np.full(n, low), np.full(n, high), np.random.default_rng(0))
    assert distances.min() == low and distances.max() == high
    octave_share = math.log(32 / 16) / math.log((high + 1) / low)  # a continuous log-uniform law on [16, 112)
    assert np.mean(distances < 32) == pytest.approx(octave_share, abs=0.005)
    assert np.mean((distances >= 32) & (distances < 64)) == pytest.approx(octave_share, abs=0.005)
    with pytest.raises(ValueError, match="copy_law='gauss' must be one of"):
        SyntheticSettings(copy_law="gauss")
