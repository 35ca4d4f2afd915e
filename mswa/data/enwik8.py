"""enwik8: the first 10^8 bytes of an English Wikipedia XML dump (Hutter Prize), modelled byte by byte.

The standard corpus is downloaded from Matt Mahoney's site (or read from ``path``), checked against
its published size and checksums, split in file order into 90M / 5M / 5M bytes (train / valid /
test), and cached as uint8 ``.npy`` arrays; later loads memory-map the verified cache. With
``split_fractions`` any byte file becomes a corpus: no size or checksum check, split by those
fractions.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from mswa.data.bytes import check_fractions, content_digest, split_boundaries
from mswa.data.cache import CacheContent, CacheFolder
from mswa.data.corpus import SPLITS, Corpus, DataError
from mswa.data.download import downloaded

URL = "https://mattmahoney.net/dc/enwik8.zip"
SIZE = 100_000_000
MD5 = "a1fa5ffddb56f4953e226637dabbb36a"
SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
STANDARD_FRACTIONS = (0.9, 0.05, 0.05)  # 90M / 5M / 5M of the 10^8 bytes


def load(
    data_dir: str | os.PathLike,
    url: str = URL,
    path: str | os.PathLike | None = None,
    split_fractions: Sequence[float] | None = None,
    md5: str | None = MD5,
    sha256: str | None = SHA256,
    expected_size: int = SIZE,
) -> Corpus:
    """The enwik8 corpus (bytes, bpc), built into ``data_dir`` on first use and memory-mapped after.

    ``url`` must serve a zip holding one file; ``path`` reads a raw local file instead. Without
    ``split_fractions`` the file must have ``expected_size`` bytes and the given md5 / sha256 (None
    skips one), and is split (0.9, 0.05, 0.05); with them, any byte file is split by them.
    """
    standard = split_fractions is None
    fractions = STANDARD_FRACTIONS if standard else check_fractions(split_fractions)
    if standard and (not isinstance(expected_size, int) or expected_size <= 0):
        raise ValueError(f"expected_size must be a positive number of bytes, got {expected_size!r}")
    source = None if path is None else _checked_local_file(path, expected_size, standard)
    if standard:
        identity = {"corpus": "enwik8", "bytes": expected_size, "md5": md5, "sha256": sha256, "fractions": list(fractions)}
    else:  # a local file by its content (an edit that keeps its size and time is still seen), a download by its URL
        identity = {"corpus": "custom bytes", "source": url if source is None else _content(source), "fractions": list(fractions)}
    cache = CacheFolder(data_dir, "enwik8", identity)
    checks = (expected_size, md5, sha256) if standard else None
    cached = cache.load_or_build(lambda: _build(cache.path, url, source, fractions, checks))
    return Corpus(name="enwik8", splits={s: cached.arrays[s] for s in SPLITS}, vocab_size=256, unit="byte")


def _content(source: Path) -> dict:
    digest, size = content_digest([source])
    return {"bytes": size, "sha256": digest}


def _checked_local_file(path: str | os.PathLike, expected_size: int, standard: bool) -> Path:
    source = Path(path).expanduser().resolve()
    if not source.is_file():
        raise DataError(f"enwik8 path {source} is not a file; point path at the raw enwik8 (unzipped) or leave it unset to download")
    size = source.stat().st_size
    if standard and size != expected_size:
        raise DataError(
            f"{source} has {size:,} bytes, not the {expected_size:,} of enwik8; pass split_fractions "
            f"(e.g. [0.9, 0.05, 0.05]) to use it as a custom byte corpus"
        )
    return source


def _build(folder: Path, url: str, source: Path | None, fractions: tuple, checks: tuple | None) -> CacheContent:
    if source is None:
        raw = _download(url, folder)
        fix = "the download is corrupted or the URL serves another file: rerun, or check url"
    else:
        raw = np.fromfile(source, dtype=np.uint8)
        fix = "replace it with the real enwik8, or pass split_fractions to use it as a custom byte corpus"
    described = url if source is None else str(source)
    if checks is not None:
        _verify(raw, described, fix, *checks)
    train_end, valid_end = split_boundaries(len(raw), fractions)
    pieces = {"train": raw[:train_end], "valid": raw[train_end:valid_end], "test": raw[valid_end:]}
    info = {"source": described, "bytes": len(raw), "boundaries": [train_end, valid_end]}
    return CacheContent(arrays=pieces, info=info)


def _download(url: str, folder: Path) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    with downloaded(url, folder / (Path(urlparse(url).path).name or "download")) as archive:
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = [m for m in zipped.infolist() if not m.is_dir()]
                if len(members) != 1:
                    raise DataError(f"zip from {url} holds {[m.filename for m in members]}, not exactly one file; check url")
                content = zipped.read(members[0])  # checks the member's CRC-32
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise DataError(
                f"download of {url} is not a readable zip ({error}; corrupted or truncated); rerun to download it again, or check url"
            ) from error
    return np.frombuffer(content, dtype=np.uint8)


def _verify(raw: np.ndarray, described: str, fix: str, expected_size: int, md5: str | None, sha256: str | None) -> None:
    if len(raw) != expected_size:
        raise DataError(f"enwik8 from {described} has {len(raw):,} bytes, not {expected_size:,}; {fix}")
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected is not None and (actual := hashlib.new(algorithm, raw).hexdigest()) != expected.lower():
            raise DataError(f"enwik8 from {described} has {algorithm} {actual}, not the expected {expected}; {fix}")
