"""dataset=bytes: any file or folder as a byte corpus, split in order, cached by content, bad input in one sentence."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers.runs import REPO, results_under, run_train
from mswa.data import bytes as byte_corpus
from mswa.data.corpus import DataError
from mswa.report.cli import main as report_main

KERNEL_DOCS = REPO.parent / "shared" / "data" / "kernel-docs" / "kernel-docs.txt"


def _text(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(32, 127, size=size, dtype=np.uint8).tobytes()


def test_a_file_is_split_in_order_and_identified_by_its_content(tmp_path):
    source = tmp_path / "notes.txt"
    content = _text(10_000)
    source.write_bytes(content)
    corpus = byte_corpus.load(tmp_path / "data", source, [0.8, 0.1, 0.1])
    assert bytes(corpus.splits["train"]) == content[:8_000]
    assert bytes(corpus.splits["valid"]) == content[8_000:9_000]
    assert bytes(corpus.splits["test"]) == content[9_000:]
    assert corpus.name == "notes.txt" and corpus.unit == "byte" and corpus.vocab_size == 256
    assert corpus.source["bytes"] == 10_000 and corpus.source["sha256"] == hashlib.sha256(content).hexdigest()


def test_a_folder_is_read_in_sorted_path_order_and_says_what_it_skipped(tmp_path, capsys):
    folder = tmp_path / "docs"
    (folder / "b").mkdir(parents=True)
    parts = {"b/2.txt": _text(3_000, 1), "a.txt": _text(3_000, 2), "b/10.txt": _text(4_000, 3)}
    for name, content in parts.items():
        (folder / name).write_bytes(content)
    (folder / "empty.txt").write_bytes(b"")
    (folder / ".hidden").write_bytes(b"secret")
    corpus = byte_corpus.load(tmp_path / "data", folder)
    expected = parts["a.txt"] + parts["b/10.txt"] + parts["b/2.txt"]  # byte order of the paths, like LC_ALL=C sort
    read = b"".join(bytes(corpus.splits[s]) for s in ("train", "valid", "test"))
    assert read == expected and corpus.source["files"] == 3
    said = capsys.readouterr().out
    assert "skipped 2 file(s)" in said and "empty.txt (empty)" in said and ".hidden (hidden)" in said


def test_a_changed_source_is_read_again_never_served_stale(tmp_path, capsys):
    source = tmp_path / "corpus.txt"
    source.write_bytes(_text(10_000, 0))
    first = byte_corpus.load(tmp_path / "data", source)
    stat = source.stat()
    changed = bytearray(source.read_bytes())
    changed[100] ^= 1  # same size, and the mtime is put back: only the content tells
    source.write_bytes(bytes(changed))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    second = byte_corpus.load(tmp_path / "data", source)
    assert bytes(second.splits["train"][:200]) == bytes(changed[:200]) != bytes(first.splits["train"][:200])
    assert "changed since it was cached" in capsys.readouterr().out
    byte_corpus.load(tmp_path / "data", source)  # unchanged now: no line
    assert "changed" not in capsys.readouterr().out


def _bad_source(tmp_path: Path, kind: str) -> Path | None:
    """A source of the given kind of bad: missing, empty, an empty folder, or none at all."""
    if kind == "missing":
        return tmp_path / "missing.txt"
    if kind == "empty":
        (tmp_path / "empty.txt").write_bytes(b"")
        return tmp_path / "empty.txt"
    if kind == "empty folder":
        (tmp_path / "blank").mkdir()
        (tmp_path / "blank" / "nothing.txt").write_bytes(b"")
        return tmp_path / "blank"
    return None


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "is empty"),
        ("empty folder", "holds no readable, non-empty files"),
        ("unset", "needs dataset.path"),
    ],
)
def test_bad_sources_are_refused_in_one_sentence(tmp_path, kind, message):
    with pytest.raises(DataError, match=message):
        byte_corpus.load(tmp_path / "data", _bad_source(tmp_path, kind))


def test_fractions_must_be_three_that_sum_to_one(tmp_path):
    (tmp_path / "ok.txt").write_bytes(_text(1_000))
    for bad, message in (([0.9, 0.05, 0.1], "must sum to 1"), ([0.9, 0.1], "three positive numbers"), ([1.0, 0.0, 0.0], "three positive")):
        with pytest.raises(DataError, match=message):
            byte_corpus.load(tmp_path / "data", tmp_path / "ok.txt", bad)


def test_train_py_records_the_source_and_refuses_a_split_smaller_than_one_window(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_bytes(_text(60_000))
    common = ["dataset=bytes", f"dataset.path={source}", "debug=smoke", "logger=csv"]
    run_train(common, tmp_path)
    (result,) = results_under(tmp_path / "outputs")
    assert result["status"] == "finished" and result["dataset"] == "bytes"
    assert result["data_source"]["name"] == "corpus.txt" and result["data_source"]["bytes"] == 60_000
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert result["data_source"]["sha256"] == digest
    assert report_main([str(tmp_path / "outputs"), "--out", str(tmp_path / "report")]) == 0
    assert f"Data: `corpus.txt`, 60,000 bytes, sha256 `{digest}`." in (tmp_path / "report" / "summary.md").read_text()
    small = run_train([*common, "eval.seq_len=64", "dataset.loader.split_fractions=[0.9995,0.0004,0.0001]"], tmp_path, check=False)
    assert small.returncode != 0 and "Traceback" not in small.stderr
    assert "less than one evaluation window" in small.stdout + small.stderr


@pytest.mark.skipif(not KERNEL_DOCS.exists(), reason="../shared/data/kernel-docs is absent")
def test_kernel_docs_reads_as_its_readme_says(tmp_path):
    recorded = (KERNEL_DOCS.parent / "SHA256").read_text().split()[0]
    corpus = byte_corpus.load(tmp_path / "data", KERNEL_DOCS)
    assert corpus.source["bytes"] == 21_372_070 and corpus.source["sha256"] == recorded
    assert sum(len(corpus.splits[s]) for s in ("train", "valid", "test")) == 21_372_070
    manifest = json.loads(next(Path(tmp_path / "data").glob("bytes-*/manifest.json")).read_text())
    assert manifest["identity"]["sha256"] == recorded
