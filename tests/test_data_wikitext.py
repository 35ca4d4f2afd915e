"""WikiText loader: Transformer-XL word rules checked against a plain-Python reference, both sources, caches."""

import collections
import random
from pathlib import Path

import numpy as np
import pytest

from helpers.data import SHARED_WIKITEXT2_VALID, cache_files
from mswa.bench import data as bench_data
from mswa.data import wikitext
from mswa.data.corpus import DataError

# count: the 3; "=", cat, <unk> 2 each (first seen in that order); Title, dog, zebra, apple 1 each
TRAIN = " \n = Title = \n\n the cat <unk> the \n dog <unk> the cat \n zebra apple \n"
VALID = " the <unk> \n\n"
TEST = "apple dog"  # no final newline: still a line


def _write_splits(folder: Path, texts: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (folder / f"wiki.{split}.tokens").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return folder


def _words(corpus, split) -> list[str]:
    return [corpus.vocab[i] for i in corpus.splits[split]]


def test_eos_per_line_order_by_count_and_unk_an_ordinary_word(tmp_path):
    folder = _write_splits(tmp_path / "text", {"train": TRAIN, "valid": VALID, "test": TEST})
    corpus = wikitext.load(tmp_path / "data", name="tiny", path=folder)
    assert corpus.vocab == ["<eos>", "the", "=", "cat", "<unk>", "Title", "dog", "zebra", "apple"]
    assert (corpus.unit, corpus.metric, corpus.vocab_size) == ("word", "ppl", 9)
    assert _words(corpus, "train") == (
        ["<eos>", "=", "Title", "=", "<eos>", "<eos>", "the", "cat", "<unk>", "the", "<eos>"]
        + ["dog", "<unk>", "the", "cat", "<eos>", "zebra", "apple", "<eos>"]
    )
    assert _words(corpus, "valid") == ["the", "<unk>", "<eos>", "<eos>"]
    assert _words(corpus, "test") == ["apple", "dog", "<eos>"]
    assert all(corpus.splits[s].dtype == np.int32 and isinstance(corpus.splits[s], np.memmap) for s in corpus.splits)


def _random_text(rng: random.Random, lines: int, words: list[str]) -> str:
    """Lines of random words joined by assorted Unicode whitespace, some empty or blank, mixed line ends."""
    spaces = [" ", "  ", "\t", "\u00a0", "\u3000", "\x1c", "\u2028", "\x0b"]
    out = []
    for _ in range(lines):
        n = rng.choice([0, 0, 1, 3, 8, 20])
        line = "".join(rng.choice(spaces) + rng.choice(words) for _ in range(n)) + rng.choice(["", " "])
        out.append(line + rng.choice(["\n", "\n", "\n", "\r\n", "\r"]))
    return "".join(out).rstrip("\n\r")  # and no final line end


def _reference(path: Path) -> list[str]:
    """Transformer-XL's rule written plainly: text-mode lines, str.split(), <eos> after each."""
    with open(path, encoding="utf-8") as f:
        return [w for line in f for w in line.split() + ["<eos>"]]


def test_matches_plain_python_reference_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(wikitext, "BATCH_BYTES", 256)  # many batches: ids must stay in first-seen order across them
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(300)] + ["<unk>", "é", "=", "naïve"]
    train = _random_text(rng, 600, vocabulary)
    held_out = {s: _random_text(rng, 80, sorted(set(train.split()))) for s in ("valid", "test")}
    folder = _write_splits(tmp_path / "text", {"train": train, **held_out})
    corpus = wikitext.load(tmp_path / "data", name="random", path=folder)
    counts = collections.Counter(w for w in _reference(folder / "wiki.train.tokens") if w != "<eos>")
    assert corpus.vocab == ["<eos>"] + [w for w, _ in counts.most_common()]  # most_common keeps first-seen order on ties
    for split in ("train", "valid", "test"):
        assert _words(corpus, split) == _reference(folder / f"wiki.{split}.tokens")


def test_hugging_face_source_equals_local_files_and_cached_reload(tmp_path):
    vocabulary = bench_data.synthetic_vocabulary(3_000)
    folder = tmp_path / "text"
    folder.mkdir()
    files = {s: folder / f"wiki.{s}.tokens" for s in ("train", "valid", "test")}
    seen = bench_data.write_wikitext_like(files["train"], 20_000, vocabulary, seed=0)
    for seed, split in ((1, "valid"), (2, "test")):
        bench_data.write_wikitext_like(files[split], 2_000, vocabulary, seed, allowed=seen)
    bench_data.write_hf_mirror(tmp_path / "mirror", files, "wikitext-2-v1")
    from_files = wikitext.load(tmp_path / "data", name="wikitext-2", path=folder)
    hf = {"hf_dataset": str(tmp_path / "mirror"), "hf_cache_dir": tmp_path / "hf_cache"}  # hf_config from name
    from_hf = wikitext.load(tmp_path / "data", name="wikitext-2", **hf)
    again = wikitext.load(tmp_path / "data", name="wikitext-2", **hf)
    assert from_hf.vocab == from_files.vocab == again.vocab and "<unk>" in from_hf.vocab
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(from_hf.splits[split], from_files.splits[split])
        np.testing.assert_array_equal(again.splits[split], from_files.splits[split])
    assert len(list((tmp_path / "data").iterdir())) == 2  # one cache per source


def test_bad_sources_reported_before_work(tmp_path):
    with pytest.raises(DataError, match=r"wiki\.test\.tokens.*do not exist"):
        wikitext.load(tmp_path / "data", path=_write_splits(tmp_path / "text", {"train": TRAIN, "valid": VALID}))
    with pytest.raises(ValueError, match="hf_config is unset and name 'ptb'"):
        wikitext.load(tmp_path / "data", name="ptb")
    train_only = {s: tmp_path / "text" / "wiki.train.tokens" for s in ("train", "valid", "test")}
    bench_data.write_hf_mirror(tmp_path / "mirror", train_only, "wikitext-2-v1")
    with pytest.raises(DataError, match="config 'wikitext-103-v1' failed"):
        wikitext.load(tmp_path / "data", hf_dataset=str(tmp_path / "mirror"), hf_cache_dir=tmp_path / "hf_cache")
    assert cache_files(tmp_path / "data") == []


def test_held_out_word_missing_from_train_is_an_error(tmp_path):
    folder = _write_splits(tmp_path / "text", {"train": TRAIN, "valid": VALID + " unicorn \n", "test": TEST})
    with pytest.raises(DataError, match=r"1 words absent from its training split \(e\.g\. \['unicorn'\]\)"):
        wikitext.load(tmp_path / "data", path=folder)
    assert cache_files(tmp_path / "data") == []


def test_not_utf8_is_reported(tmp_path):
    folder = _write_splits(tmp_path / "text", {"train": b"caf\xe9 \n", "valid": VALID, "test": TEST})
    with pytest.raises(DataError, match="wiki.train.tokens is not UTF-8"):
        wikitext.load(tmp_path / "data", path=folder)


@pytest.mark.parametrize("damaged", ["vocab.txt", "train.npy"])
def test_corrupted_cache_detected(tmp_path, damaged):
    folder = _write_splits(tmp_path / "text", {"train": TRAIN, "valid": VALID, "test": TEST})
    wikitext.load(tmp_path / "data", path=folder)
    (cache,) = (tmp_path / "data").iterdir()
    data = bytearray((cache / damaged).read_bytes())
    data[-2] ^= 0x01  # same size, one bit off: "apple" -> "appme", or an id
    (cache / damaged).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{damaged} does not match the sha256.*delete {cache} and rerun"):
        wikitext.load(tmp_path / "data", path=folder)


@pytest.mark.skipif(not SHARED_WIKITEXT2_VALID.exists(), reason="../shared/data/wikitext-2/valid.txt is absent")
def test_real_wikitext2_valid_counts(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.tokens").symlink_to(SHARED_WIKITEXT2_VALID)
    corpus = wikitext.load(tmp_path / "data", name="wikitext-2-valid", path=folder)
    valid = np.asarray(corpus.splits["valid"])
    eos = int((valid == 0).sum())
    assert (len(valid) - eos, eos, len(valid)) == (213_886, 3_760, 217_646)  # README counts; 217,646 as Merity et al. report
    counts = collections.Counter(w for w in _reference(SHARED_WIKITEXT2_VALID) if w != "<eos>")
    assert corpus.vocab == ["<eos>"] + [w for w, _ in counts.most_common()]
    assert corpus.vocab[:4] == ["<eos>", "the", "<unk>", ","] and corpus.vocab_size == 13_777
