"""A synthetic byte corpus with dependencies at known distances and a known entropy floor.

The process emits a sequence of *events*, each starting at an event boundary:

* a **word** (probability ``1 - n_scales * copy_probability``): lowercase letters followed by a space,
  drawn from a fixed vocabulary of ``n_words`` words. With probability ``successor_weight`` the word
  is one of ``n_successors`` favourite successors of the previous word (weights ~ 1/(k+1)), otherwise
  it is drawn from a Zipf law over the vocabulary. Frequent words are short. This gives structure at
  a few bytes (within a word) to ~15 bytes (word bigrams).
* a **copy** at scale ``s`` (probability ``copy_probability`` for each scale): the marker byte
  ``MARKERS[s]`` followed by ``copy_length`` bytes repeated verbatim from ``d`` bytes back,
  ``x[c + i] = x[c + i - d]`` (LZ77 semantics, so ``d < copy_length`` repeats periodically), with ``d``
  drawn from ``copy_ranges[s]`` (``copy_distances[s]`` +- ``copy_jitter``), uniformly or, with
  ``copy_law="log_uniform"``, log-uniformly (distances spread over a range, not tuned to any window). These are the long
  dependencies (defaults ~32, ~100, ~300, ~1000 bytes). The first ``warmup_events`` events are
  always words, so every copy source exists.

Why the floor is exact. Every choice except ``d`` can be read back from the bytes alone: the first
byte of an event tells a letter (word) from a marker (copy of that scale); a word ends at its space
and the vocabulary holds distinct letter strings, so the word is identified; a copy has a known
length; the previous word is the last word event. Only ``d`` may be ambiguous (two distances can
give the same bytes), so the probability of the bytes sums over it:
``p(copy bytes | past) = sum_d p(d) * [x[c+i] == x[c+i-d] for all i]``. The product of these event
probabilities is exactly ``p(x)``, the probability of the byte string under the process, so
``-log2 p(x) / n`` is what a model that knows the process and sees the full past scores on this very
sample (arithmetic-coding code length); no model beats it in expectation. ``entropy_floor_bpb`` is
that value for the whole sample. Each event's bits are attributed to its first byte, so per-split
floors (``Corpus.split_floor_bpb``) are exact up to the one event crossing a split boundary. A model
evaluated in chunks of a finite context, from the start of its split, cannot reach the floor: it is
a lower bound.

Kinds. Every byte of the evaluation splits is labelled with its event's type (``kind_names``:
``word``, then ``copy<d>`` per scale; a copy's marker byte belongs to the copy), so a model's bpc can
be split by what the byte is. ``Corpus.kind_floor_bpb`` gives each kind's floor the same way (an
event's bits on its first byte, hence its kind): the kinds' floors weighted by their byte counts add
back to the split's floor.

The generator is vectorised numpy: events are drawn up front, word chains resolved by repeated
gathers, copies by pointer doubling, and copy ambiguity counted with rolling hashes verified
byte by byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mswa.data.cache import CacheContent, CacheFolder
from mswa.data.corpus import SPLITS, Corpus

EVAL_SPLITS = ("valid", "test")  # the splits whose bytes carry kind labels
VERSION = 2  # bump when the cached files change for the same settings (2: per-byte kinds, verified cache)
MARKERS = b"0123456789"  # marker byte of copy scale s; words use only a-z and space
SPACE = ord(" ")
COPY_LAWS = ("uniform", "log_uniform")
_HASH_CHUNK = 4096  # copy events compared per block of the candidate matrix


@dataclass(frozen=True)
class SyntheticSettings:
    """Every knob of the corpus; the cache folder is named from all of them."""

    n_bytes: int = 3_000_000  # total size of train + valid + test
    seed: int = 0
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    n_words: int = 1000  # vocabulary size
    zipf_exponent: float = 1.0  # word frequency ~ 1 / rank**zipf_exponent
    n_successors: int = 4  # favourite next words per word
    successor_weight: float = 0.5  # probability that a word is one of the previous word's successors
    copy_distances: tuple[int, ...] = (32, 100, 300, 1000)  # centre of each copy scale, in bytes
    copy_jitter: float = 0.25  # each scale's distances lie in centre * (1 -+ jitter)
    copy_law: str = "uniform"  # how a distance is drawn from its scale's range: "uniform" or "log_uniform"
    copy_probability: float = 0.025  # per event and per scale
    copy_length: int = 32  # bytes repeated by one copy

    def __post_init__(self) -> None:
        _validate(self)
        for field in dataclasses.fields(self):  # plain Python values, so settings hash and serialise
            value = getattr(self, field.name)
            plain = tuple(int(d) for d in value) if field.name == "copy_distances" else type(field.default)(value)
            object.__setattr__(self, field.name, plain)

    @property
    def copy_ranges(self) -> list[tuple[int, int]]:
        """Inclusive (min, max) distance of each copy scale."""
        return [(max(1, round(d * (1 - self.copy_jitter))), max(1, round(d * (1 + self.copy_jitter)))) for d in self.copy_distances]

    @property
    def warmup_events(self) -> int:
        """Leading events that are always words: every event spans >= 2 bytes, so copies then fit."""
        return math.ceil(max(hi for _, hi in self.copy_ranges) / 2)

    @property
    def split_sizes(self) -> dict[str, int]:
        n_valid = round(self.n_bytes * self.valid_fraction)
        n_test = round(self.n_bytes * self.test_fraction)
        return {"train": self.n_bytes - n_valid - n_test, "valid": n_valid, "test": n_test}


INTEGER_SETTINGS = ("n_bytes", "seed", "n_words", "n_successors", "copy_length")
NUMBER_SETTINGS = ("valid_fraction", "test_fraction", "zipf_exponent", "successor_weight", "copy_jitter", "copy_probability")


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _validate(s: SyntheticSettings) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"synthetic corpus: {message}")

    for name in INTEGER_SETTINGS:
        need(_is_integer(getattr(s, name)), f"{name} must be an integer, got {getattr(s, name)!r}")
    for name in NUMBER_SETTINGS:
        value = getattr(s, name)
        is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        need(is_number and math.isfinite(value), f"{name} must be a finite number, got {value!r}")
    need(s.n_bytes > 0, f"n_bytes={s.n_bytes} must be positive; ask for at least a few thousand bytes")
    need(s.seed >= 0, f"seed={s.seed} must be >= 0")
    for name in ("valid_fraction", "test_fraction"):
        need(0 < getattr(s, name) < 1, f"{name}={getattr(s, name)} must lie strictly between 0 and 1, e.g. 0.05")
    held_out = s.valid_fraction + s.test_fraction
    need(held_out < 1, f"valid_fraction + test_fraction = {held_out} must be below 1 to leave training bytes")
    empty = [name for name, size in s.split_sizes.items() if size < 1]
    need(not empty, f"n_bytes={s.n_bytes} leaves split(s) {empty} empty; raise n_bytes or the split fractions")
    need(s.n_words >= 2, f"n_words={s.n_words} must be >= 2")
    need(s.zipf_exponent >= 0, f"zipf_exponent={s.zipf_exponent} must be >= 0 (0 = uniform words)")
    need(s.n_successors >= 1, f"n_successors={s.n_successors} must be >= 1")
    need(0 <= s.successor_weight <= 1, f"successor_weight={s.successor_weight} must lie in [0, 1]")
    distances = s.copy_distances
    need(
        isinstance(distances, Sequence) and not isinstance(distances, str) and 1 <= len(distances) <= len(MARKERS),
        f"copy_distances={distances!r} must list 1 to {len(MARKERS)} distances (copy_probability=0 turns copies off)",
    )
    need(all(_is_integer(d) and d >= 1 for d in distances), f"copy_distances={list(distances)} must be integers >= 1")
    need(0 <= s.copy_jitter < 1, f"copy_jitter={s.copy_jitter} must lie in [0, 1)")
    need(s.copy_law in COPY_LAWS, f"copy_law={s.copy_law!r} must be one of {list(COPY_LAWS)}")
    need(s.copy_probability >= 0, f"copy_probability={s.copy_probability} must be >= 0")
    need(
        len(distances) * s.copy_probability < 1,
        f"copy_probability={s.copy_probability} times {len(distances)} scales must stay below 1 to leave words room",
    )
    need(s.copy_length >= 1, f"copy_length={s.copy_length} must be >= 1")


def make_settings(settings: dict[str, Any]) -> SyntheticSettings:
    """Settings from keyword arguments (e.g. a Hydra config), rejecting unknown names."""
    known = {f.name for f in dataclasses.fields(SyntheticSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"synthetic corpus: unknown setting(s) {unknown}; known settings are {sorted(known)}")
    return SyntheticSettings(**settings)


# ---------------------------------------------------------------------------------------------
# The language: vocabulary, word frequencies, successor lists
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Language:
    words: list[bytes]  # id -> spelling (no space); id 0 is the most frequent
    word_probs: np.ndarray  # (n_words,) Zipf unigram
    successors: np.ndarray  # (n_words, n_successors) favourite next word ids
    successor_probs: np.ndarray  # (n_successors,) weight of the k-th favourite
    successor_weight: float

    def next_word_probs(self, previous: np.ndarray, word: np.ndarray) -> np.ndarray:
        """P(word | previous word); previous = -1 marks the first word (unigram only)."""
        favourite = self.successors[np.maximum(previous, 0)] == word[:, None]
        from_successors = (favourite * self.successor_probs).sum(axis=1)
        mixed = self.successor_weight * from_successors + (1 - self.successor_weight) * self.word_probs[word]
        return np.where(previous < 0, self.word_probs[word], mixed)


def make_language(s: SyntheticSettings, rng: np.random.Generator) -> Language:
    lengths = np.sort(np.minimum(1 + rng.poisson(4.0, s.n_words), 12))  # frequent words are short
    spellings = [bytes(rng.integers(ord("a"), ord("z") + 1, n, dtype=np.uint8)) for n in lengths]
    while duplicates := _repeated_indices(spellings):  # distinct, so a word is identified by its bytes
        for i in duplicates:  # one letter longer: short spellings may be exhausted
            spellings[i] = bytes(rng.integers(ord("a"), ord("z") + 1, len(spellings[i]) + 1, dtype=np.uint8))
    word_probs = 1.0 / np.arange(1, s.n_words + 1) ** s.zipf_exponent
    successor_probs = 1.0 / np.arange(1, s.n_successors + 1)
    return Language(
        words=spellings,
        word_probs=word_probs / word_probs.sum(),
        successors=rng.integers(0, s.n_words, (s.n_words, s.n_successors)),
        successor_probs=successor_probs / successor_probs.sum(),
        successor_weight=float(s.successor_weight),
    )


def _repeated_indices(spellings: list[bytes]) -> list[int]:
    """Indices of spellings that already occurred earlier in the list."""
    seen: set[bytes] = set()
    repeated = []
    for i, spelling in enumerate(spellings):
        if spelling in seen:
            repeated.append(i)
        seen.add(spelling)
    return repeated


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    data: np.ndarray  # uint8 bytes of whole events (at least n_bytes long)
    event_starts: np.ndarray  # first byte of each event
    event_bits: np.ndarray  # -log2 p(event bytes | all earlier bytes)
    byte_kinds: np.ndarray  # uint8 kind of every byte: its event's type (0 word, 1 + scale copy)
    language: Language


def generate(s: SyntheticSettings) -> Sample:
    """Draw events until they cover s.n_bytes, lay out their bytes and score them."""
    language = make_language(s, np.random.default_rng([s.seed, 0]))
    n_events = _events_needed(s, language)
    while True:  # the margin almost always suffices; retrying stays deterministic
        types, words, distances = _draw_events(s, language, n_events, np.random.default_rng([s.seed, 1]))
        lengths = np.where(types == 0, _word_lengths(language)[words] + 1, 1 + s.copy_length)
        if lengths.sum() >= s.n_bytes:
            break
        n_events *= 2
    starts = np.cumsum(lengths) - lengths
    data = _lay_out_bytes(s, language, types, words, distances, starts, lengths)
    bits = _word_bits(s, language, types, words) + _copy_bits(s, data, types, starts)
    kinds = np.repeat(types, lengths).astype(np.uint8)
    return Sample(data=data, event_starts=starts, event_bits=bits, byte_kinds=kinds, language=language)


def _word_lengths(language: Language) -> np.ndarray:
    return np.array([len(w) for w in language.words])


def _events_needed(s: SyntheticSettings, language: Language) -> int:
    p_copy = len(s.copy_distances) * s.copy_probability
    lengths = _word_lengths(language)
    from_zipf, from_successors = float(language.word_probs @ lengths), float(lengths[language.successors].mean())
    mean_word_bytes = 1 + (1 - s.successor_weight) * from_zipf + s.successor_weight * from_successors
    mean_event_bytes = (1 - p_copy) * mean_word_bytes + p_copy * (1 + s.copy_length)
    return int(1.1 * s.n_bytes / mean_event_bytes) + s.warmup_events + 64


def _draw_events(s: SyntheticSettings, language: Language, n_events: int, rng: np.random.Generator):
    """Event types (0 = word, 1 + scale = copy), word ids (0 for copies) and copy distances."""
    n_scales = len(s.copy_distances)
    type_probs = [1 - n_scales * s.copy_probability] + [s.copy_probability] * n_scales
    types = rng.choice(n_scales + 1, size=n_events, p=type_probs)
    types[: s.warmup_events] = 0
    ranges = np.array(s.copy_ranges, dtype=np.int64)
    scale = np.maximum(types - 1, 0)
    distances = np.where(types > 0, _draw_distances(s.copy_law, ranges[scale, 0], ranges[scale, 1], rng), 0)

    n_word_events = int((types == 0).sum())
    from_successor = rng.random(n_word_events) < s.successor_weight
    from_successor[0] = False  # the first word has no predecessor
    favourite = rng.choice(s.n_successors, size=n_word_events, p=language.successor_probs)
    chain = rng.choice(s.n_words, size=n_word_events, p=language.word_probs)
    # Resolve runs of successor words with one gather per step along the runs: pass r sets the
    # r-th word after each Zipf draw (passes = longest run, ~log(n) / log(1 / successor_weight)).
    step = np.flatnonzero(from_successor)
    step = step[~from_successor[step - 1]]
    while step.size:
        chain[step] = language.successors[chain[step - 1], favourite[step]]
        step = step[step + 1 < n_word_events] + 1
        step = step[from_successor[step]]
    words = np.zeros(n_events, dtype=np.int64)
    words[types == 0] = chain
    return types, words, distances


def distance_probabilities(law: str, low: int, high: int) -> np.ndarray:
    """p(d) for d = low..high: equal under "uniform"; under "log_uniform" the mass a continuous
    log-uniform law on [low, high + 1) puts on [d, d + 1), so every octave of distances is equally likely."""
    if law == "uniform":
        return np.full(high - low + 1, 1 / (high - low + 1))
    edges = np.log(np.arange(low, high + 2, dtype=np.float64))
    return np.diff(edges) / (edges[-1] - edges[0])


def _draw_distances(law: str, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if law == "uniform":
        return rng.integers(low, high + 1)
    continuous = np.exp(rng.uniform(np.log(low), np.log(high + 1)))
    return np.minimum(np.floor(continuous).astype(np.int64), high)  # floor of a draw in [low, high + 1)


def _lay_out_bytes(s, language, types, words, distances, starts, lengths) -> np.ndarray:
    total = int(lengths.sum())
    event_of_byte = np.repeat(np.arange(len(types)), lengths)
    offset = np.arange(total) - starts[event_of_byte]
    spelled = np.full((len(language.words), int(_word_lengths(language).max()) + 1), SPACE, dtype=np.uint8)
    for i, w in enumerate(language.words):
        spelled[i, : len(w)] = np.frombuffer(w, dtype=np.uint8)

    data = np.zeros(total, dtype=np.uint8)
    in_word = types[event_of_byte] == 0
    data[in_word] = spelled[words[event_of_byte[in_word]], offset[in_word]]
    marker = ~in_word & (offset == 0)
    data[marker] = np.frombuffer(MARKERS, dtype=np.uint8)[types[event_of_byte[marker]] - 1]
    # A copied byte takes its value from d bytes back, which may itself be copied: follow the
    # pointers to an original byte by doubling (log of the chain depth passes).
    source = np.arange(total)
    copied = ~in_word & (offset > 0)
    source[copied] -= distances[event_of_byte[copied]]
    while True:
        further = source[source]
        if np.array_equal(further, source):
            break
        source = further
    return data[source]


def _word_bits(s: SyntheticSettings, language: Language, types, words) -> np.ndarray:
    """Bits of each word event (type choice and word); zero for copy events."""
    is_word = types == 0
    word_ids = words[is_word]
    previous = np.concatenate([[-1], word_ids[:-1]])
    bits = np.zeros(len(types))
    bits[is_word] = -np.log2(language.next_word_probs(previous, word_ids))
    p_word = 1 - len(s.copy_distances) * s.copy_probability
    after_warmup = is_word & (np.arange(len(types)) >= s.warmup_events)
    bits[after_warmup] -= math.log2(p_word)
    return bits


def _copy_bits(s: SyntheticSettings, data: np.ndarray, types, starts) -> np.ndarray:
    """Bits of each copy event: its marker plus -log2 of the share of distances that fit the bytes."""
    bits = np.zeros(len(types))
    if not (types > 0).any():
        return bits
    hashes = _window_hashes(data, s.copy_length)
    for scale, (low, high) in enumerate(s.copy_ranges):
        events = np.flatnonzero(types == scale + 1)
        copy_starts = starts[events] + 1
        candidate_distances = np.arange(low, high + 1)
        p_distance = distance_probabilities(s.copy_law, low, high)
        matched = np.concatenate(
            [
                _matched_probability(data, hashes, copy_starts[i : i + _HASH_CHUNK], candidate_distances, p_distance, s.copy_length)
                for i in range(0, len(events), _HASH_CHUNK)
            ]
            or [np.zeros(0)]
        )
        bits[events] = -math.log2(s.copy_probability) - np.log2(matched)
    return bits


def _window_hashes(data: np.ndarray, length: int) -> np.ndarray:
    """64-bit polynomial hash of every window data[p : p + length], from prefix sums.

    With P[p] = sum_{i<p} code(x_i) B^i (mod 2^64), window p hashes to (P[p+length] - P[p]) B^-p;
    B is odd, hence invertible mod 2^64, and numpy's unsigned arithmetic wraps mod 2^64.
    """
    byte_codes = np.random.default_rng(12345).integers(1, 2**63, 256, dtype=np.uint64)
    base = 0x9E3779B97F4A7C15
    powers = _powers(base, len(data))
    inverse_powers = _powers(pow(base, -1, 2**64), len(data))
    prefix = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(byte_codes[data] * powers)])
    n_windows = len(data) - length + 1
    return (prefix[length:] - prefix[:n_windows]) * inverse_powers[:n_windows]


def _powers(base: int, count: int) -> np.ndarray:
    """base**0 ... base**(count - 1) mod 2^64."""
    factors = np.full(count, base, dtype=np.uint64)
    factors[0] = 1
    return np.cumprod(factors)


def _matched_probability(data, hashes, copy_starts, candidate_distances, p_distance, length) -> np.ndarray:
    """For each copy, the probability of the candidate distances d that give x[c + i] == x[c + i - d] for all i."""
    sources = copy_starts[:, None] - candidate_distances[None, :]
    same_hash = hashes[sources] == hashes[copy_starts][:, None]
    row, col = np.nonzero(same_hash)  # mostly the true source; verify each byte by byte
    span = np.arange(length)
    equal = (data[sources[row, col][:, None] + span] == data[copy_starts[row][:, None] + span]).all(axis=1)
    return np.bincount(row[equal], weights=p_distance[col[equal]], minlength=len(copy_starts))


# ---------------------------------------------------------------------------------------------
# Loader with cache
# ---------------------------------------------------------------------------------------------


def kind_names(s: SyntheticSettings) -> list[str]:
    """Kind id -> name: 0 "word" (letters and spaces), 1 + scale "copy<centre distance>" (marker and copied bytes)."""
    return ["word", *(f"copy{d}" for d in s.copy_distances)]


def describe(**settings: Any) -> dict[str, Any]:
    """The generator settings as plain values (for results.json), including derived copy ranges."""
    s = make_settings(settings)
    return {
        "version": VERSION,
        **_plain_settings(s),
        "copy_ranges": [list(r) for r in s.copy_ranges],
        "warmup_events": s.warmup_events,
        "split_bytes": s.split_sizes,
        "kinds": kind_names(s),
        "cache_folder": _cache(s, "").path.name,
    }


def _plain_settings(s: SyntheticSettings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()}


def _cache(s: SyntheticSettings, data_dir: str | os.PathLike) -> CacheFolder:
    identity = {"corpus": "synthetic", "version": VERSION, "settings": _plain_settings(s)}
    return CacheFolder(data_dir, f"synthetic-v{VERSION}-n{s.n_bytes}-seed{s.seed}", identity)


def load(data_dir: str, **settings: Any) -> Corpus:
    """Generate (first call) or open (later calls, memory-mapped) the synthetic corpus.

    ``settings`` are the fields of ``SyntheticSettings``. The splits, and the kind of every byte of
    the evaluation splits, are a verified cache under ``data_dir`` (``mswa.data.cache.CacheFolder``):
    every file is checked against its manifest on each load, and a damaged one is refused with the
    folder to delete.
    """
    s = make_settings(settings)
    cached = _cache(s, data_dir).load_or_build(lambda: _build(s))
    info = cached.info
    return Corpus(
        name="synthetic",
        splits={name: cached.arrays[name] for name in SPLITS},
        vocab_size=256,
        unit="byte",
        entropy_floor_bpb=info["entropy_floor_bpb"],
        kind_names=info["kind_names"],
        kinds={name: cached.arrays[f"{name}_kinds"] for name in EVAL_SPLITS},
        kind_floor_bpb=info["kind_floor_bpb"],
        split_floor_bpb=info["split_floor_bpb"],
    )


def _build(s: SyntheticSettings) -> CacheContent:
    began = time.perf_counter()
    sample = generate(s)
    data, kinds = sample.data[: s.n_bytes], sample.byte_kinds[: s.n_bytes]
    bounds = np.cumsum([0] + [s.split_sizes[name] for name in SPLITS])
    bits_at_byte = np.bincount(sample.event_starts, weights=sample.event_bits, minlength=len(sample.data))[: s.n_bytes]
    spans = {name: slice(lo, hi) for name, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:])}
    info = {
        "settings": describe(**dataclasses.asdict(s)),
        "entropy_floor_bpb": float(bits_at_byte.sum() / s.n_bytes),
        "split_floor_bpb": {name: float(bits_at_byte[span].mean()) for name, span in spans.items()},
        "kind_names": kind_names(s),
        "kind_floor_bpb": {name: _kind_floors(bits_at_byte[spans[name]], kinds[spans[name]], len(kind_names(s))) for name in EVAL_SPLITS},
        "generation_seconds": round(time.perf_counter() - began, 3),
    }
    arrays = {name: data[span] for name, span in spans.items()}
    arrays |= {f"{name}_kinds": kinds[spans[name]] for name in EVAL_SPLITS}
    return CacheContent(arrays=arrays, info=info)


def _kind_floors(bits: np.ndarray, kinds: np.ndarray, n_kinds: int) -> list[float | None]:
    """Bits per byte of each kind (an event's bits sit on its first byte, whose kind is the event's)."""
    counts = np.bincount(kinds, minlength=n_kinds)
    sums = np.bincount(kinds, weights=bits, minlength=n_kinds)
    return [float(total / count) if count else None for total, count in zip(sums, counts)]


def main() -> None:
    """Print generation time, floors and a unigram baseline for the default corpus (fresh cache)."""
    with tempfile.TemporaryDirectory() as data_dir:
        began = time.perf_counter()
        corpus = load(data_dir)
        elapsed = time.perf_counter() - began
        counts = np.bincount(np.asarray(corpus.splits["train"]), minlength=256)
        probs = counts[counts > 0] / counts.sum()
        print(json.dumps(describe(), indent=2))
        print(f"generate + cache: {elapsed:.2f} s for {SyntheticSettings().n_bytes} bytes")
        print(f"entropy floor: {corpus.entropy_floor_bpb:.4f} bpb; per split {corpus.split_floor_bpb}")
        print(f"per kind {corpus.kind_names}: {corpus.kind_floor_bpb}")
        print(f"unigram (train plug-in): {float(-(probs * np.log2(probs)).sum()):.4f} bpb")


if __name__ == "__main__":
    main()
