"""enwik8 loader: real download over a local HTTP server, verification, split arithmetic, verified caches."""

import hashlib

import numpy as np
import pytest

from helpers.data import CUT_PREFIX, cache_files, serve_folder, write_zip
from mswa.data import enwik8
from mswa.data.cache import MANIFEST
from mswa.data.corpus import DataError

SIZE = 20_000  # the small stand-in: split 18,000 / 1,000 / 1,000 by the standard fractions


def _content(size=SIZE, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(32, 127, size=size, dtype=np.uint8).tobytes()


def _checks(content: bytes) -> dict:
    return {"md5": hashlib.md5(content).hexdigest(), "sha256": hashlib.sha256(content).hexdigest(), "expected_size": len(content)}


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves good and bad zips of the stand-in; yields (base URL, request log, content)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    content = _content()
    www = tmp_path / "www"
    www.mkdir()
    write_zip(www / "enwik8.zip", "enwik8", content)
    flipped = bytearray(content)
    flipped[SIZE // 2] ^= 1
    write_zip(www / "flipped.zip", "enwik8", bytes(flipped))
    write_zip(www / "short.zip", "enwik8", content[:-1])
    (www / "half.zip").write_bytes((www / "enwik8.zip").read_bytes()[: SIZE // 4])
    with serve_folder(www) as (base, requests):
        yield base, requests, content


def _assert_standard_split(corpus, content: bytes) -> None:
    raw = np.frombuffer(content, dtype=np.uint8)
    assert (corpus.name, corpus.unit, corpus.metric, corpus.vocab_size) == ("enwik8", "byte", "bpc", 256)
    for split, piece in {"train": raw[:18_000], "valid": raw[18_000:19_000], "test": raw[19_000:]}.items():
        assert isinstance(corpus.splits[split], np.memmap) and corpus.splits[split].dtype == np.uint8
        np.testing.assert_array_equal(corpus.splits[split], piece)


def test_split_arithmetic_at_full_scale():
    assert enwik8.split_boundaries(enwik8.SIZE, enwik8.STANDARD_FRACTIONS) == (90_000_000, 95_000_000)
    assert enwik8.split_boundaries(100_000_000, [0.8, 0.1, 0.1]) == (80_000_000, 90_000_000)
    assert enwik8.split_boundaries(10, [1 / 3, 1 / 3, 1 / 3]) == (3, 6)
    with pytest.raises(DataError, match="leave a split empty"):
        enwik8.split_boundaries(10, enwik8.STANDARD_FRACTIONS)  # 9 / 0.5 / 0.5 bytes
    for bad in ([0.5, 0.5], [0.9, 0.1, 0.0], [0.5, 0.3, 0.3], [True, 0.5, 0.5]):
        with pytest.raises(ValueError, match="split_fractions"):
            enwik8.check_fractions(bad)


def test_download_verify_split_and_cache(server, tmp_path):
    base, requests, content = server
    corpus = enwik8.load(tmp_path / "data", url=f"{base}/enwik8.zip", **_checks(content))
    _assert_standard_split(corpus, content)
    files = [p.name for p in cache_files(tmp_path / "data")]
    assert sorted(files) == sorted([MANIFEST, "train.npy", "valid.npy", "test.npy"])  # no zip, no .part left
    again = enwik8.load(tmp_path / "data", url=f"{base}/enwik8.zip", **_checks(content))
    assert requests == ["/enwik8.zip"]  # the second load used the cache
    _assert_standard_split(again, content)


@pytest.mark.parametrize(
    ("served", "problem"), [("flipped.zip", "md5"), ("short.zip", "19,999 bytes, not 20,000"), ("half.zip", "not a readable zip")]
)
def test_corrupted_download_refused_and_nothing_kept(server, tmp_path, served, problem):
    base, _, content = server
    with pytest.raises(DataError, match=problem):
        enwik8.load(tmp_path / "data", url=f"{base}/{served}", **_checks(content))
    assert cache_files(tmp_path / "data") == []


def test_truncated_download_refused_then_a_rerun_succeeds(server, tmp_path):
    base, _, content = server
    with pytest.raises(DataError, match=r"enwik8.zip is truncated \([0-9,]+ of [0-9,]+ bytes"):
        enwik8.load(tmp_path / "data", url=f"{base}{CUT_PREFIX}enwik8.zip", **_checks(content))
    assert cache_files(tmp_path / "data") == []
    _assert_standard_split(enwik8.load(tmp_path / "data", url=f"{base}/enwik8.zip", **_checks(content)), content)


def test_unreachable_url_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with serve_folder(tmp_path) as (base, _):
        missing = f"{base}/nothing.zip"
        with pytest.raises(DataError, match="downloading .*nothing.zip failed"):
            enwik8.load(tmp_path / "data", url=missing)


def test_local_raw_file_and_custom_fractions(tmp_path):
    content = _content()
    raw = tmp_path / "enwik8"
    raw.write_bytes(content)
    _assert_standard_split(enwik8.load(tmp_path / "data", path=raw, **_checks(content)), content)
    with pytest.raises(DataError, match="pass split_fractions"):
        enwik8.load(tmp_path / "other", path=raw)  # the real enwik8's size is expected by default
    assert cache_files(tmp_path / "other") == []
    custom = enwik8.load(tmp_path / "data", path=raw, split_fractions=[0.5, 0.25, 0.25])
    np.testing.assert_array_equal(custom.splits["valid"], np.frombuffer(content[10_000:15_000], dtype=np.uint8))
    assert len(list((tmp_path / "data").iterdir())) == 2  # the custom corpus has its own cache folder


def test_wrong_checksum_of_local_file_refused(tmp_path):
    content = _content()
    raw = tmp_path / "enwik8"
    raw.write_bytes(content)
    wrong = _checks(content) | {"sha256": "0" * 64}
    with pytest.raises(DataError, match=f"{raw} has sha256 .*replace it with the real enwik8"):
        enwik8.load(tmp_path / "data", path=raw, **wrong)
    assert cache_files(tmp_path / "data") == []


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda folder: _flip_byte(folder / "valid.npy"), "valid.npy does not match the sha256"),
        (lambda folder: (folder / "test.npy").write_bytes((folder / "test.npy").read_bytes()[:-7]), "test.npy has .* bytes, not"),
        (lambda folder: (folder / "train.npy").unlink(), "train.npy is missing"),
        (lambda folder: (folder / MANIFEST).write_text("{not json"), "manifest .* is unreadable"),
    ],
    ids=["flipped-byte", "truncated", "missing", "bad-manifest"],
)
def test_corrupted_cache_detected(tmp_path, damage, problem):
    content = _content()
    raw = tmp_path / "enwik8"
    raw.write_bytes(content)
    enwik8.load(tmp_path / "data", path=raw, **_checks(content))
    (folder,) = (tmp_path / "data").iterdir()
    damage(folder)
    with pytest.raises(DataError, match=f"{problem}.*delete {folder} and rerun"):
        enwik8.load(tmp_path / "data", path=raw, **_checks(content))


def test_interrupted_build_is_rebuilt_not_used(tmp_path):
    content = _content()
    raw = tmp_path / "enwik8"
    raw.write_bytes(content)
    enwik8.load(tmp_path / "data", path=raw, **_checks(content))
    (folder,) = (tmp_path / "data").iterdir()
    (folder / MANIFEST).unlink()  # as if killed before the manifest was written
    (folder / "train.npy").write_bytes(b"half-written")
    (folder / "valid.npy.part-12345").write_bytes(b"left by a killed run")
    _assert_standard_split(enwik8.load(tmp_path / "data", path=raw, **_checks(content)), content)
