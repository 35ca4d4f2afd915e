"""Any byte corpus: a file, or a folder of files read in sorted path order, modelled byte by byte (bpc).

The source is split in order into contiguous train / valid / test pieces by ``split_fractions`` and
cached as uint8 arrays keyed by the source's size and sha256: a source whose content changed gets a
new cache (with one line saying so), never a stale one. The corpus carries the source's name, size and
sha256 so that results.json and the report say exactly what was read.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from mswa.atomic import write_atomic
from mswa.data.cache import MANIFEST, CacheContent, CacheFolder
from mswa.data.corpus import SPLITS, Corpus, DataError

DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
SOURCES_FILE = "bytes-sources.json"  # source path -> sha256 of its last build, to say when a source changed


def split_boundaries(total_bytes: int, fractions: Sequence[float]) -> tuple[int, int]:
    """(end of train, end of valid) when ``total_bytes`` are split in order by (train, valid, test) fractions.

    Exact: each fraction is read as the decimal it prints as (0.9 is 9/10), so 10^8 bytes split by
    (0.9, 0.05, 0.05) give exactly (90_000_000, 95_000_000).
    """
    exact = [Fraction(repr(float(f))) for f in check_fractions(fractions)]
    train_end, valid_end = int(total_bytes * exact[0]), int(total_bytes * (exact[0] + exact[1]))
    if not 0 < train_end < valid_end < total_bytes:
        raise DataError(f"{total_bytes:,} bytes split by {list(fractions)} leave a split empty; use a larger file or larger fractions")
    return train_end, valid_end


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(fractions)
    if len(values) != 3 or not all(isinstance(f, numbers.Real) and not isinstance(f, bool) and f > 0 for f in values):
        raise DataError(f"split_fractions must be three positive numbers (train, valid, test), got {list(values)!r}")
    if abs(sum(Fraction(repr(float(f))) for f in values) - 1) > 1e-9:
        raise DataError(f"split_fractions must sum to 1, got {list(values)!r} (sum {sum(values):g}); e.g. [0.9, 0.05, 0.05]")
    return tuple(float(f) for f in values)


def load(data_dir: str | os.PathLike, path: str | os.PathLike | None, split_fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Corpus:
    """The byte corpus of ``path`` (a file, or a folder read in sorted path order), split by ``split_fractions``."""
    fractions = check_fractions(split_fractions)
    root, files = source_files(path)
    digest, size = content_digest(files)
    source = {"name": root.name, "path": str(root), "files": len(files), "bytes": size, "sha256": digest}
    identity = {"corpus": "bytes", "bytes": size, "sha256": digest, "fractions": list(fractions)}
    cache = CacheFolder(data_dir, f"bytes-{_safe(root.name)}", identity)
    _note_changed_source(Path(data_dir).expanduser(), root, digest, cache)
    cached = cache.load_or_build(lambda: _build(files, fractions, source))
    return Corpus(name=root.name, splits={s: cached.arrays[s] for s in SPLITS}, vocab_size=256, unit="byte", source=source)


def source_files(path: str | os.PathLike | None) -> tuple[Path, list[Path]]:
    """The source's resolved path and the files it reads, in order; skipped files of a folder are named, with why."""
    if path is None or str(path).strip() == "":
        raise DataError("dataset=bytes needs dataset.path=FILE_OR_FOLDER (the bytes to model)")
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"dataset.path {root} does not exist; point it at a file or a folder of files")
    if root.is_file():
        if root.stat().st_size == 0:
            raise DataError(f"dataset.path {root} is empty; a byte corpus needs bytes")
        return root, [root]
    if not root.is_dir():
        raise DataError(f"dataset.path {root} is neither a file nor a folder")
    files, skipped = _folder_files(root)
    if skipped:
        print(f"dataset.path {root}: skipped {len(skipped)} file(s): " + "; ".join(f"{name} ({why})" for name, why in skipped))
    if not files:
        raise DataError(f"dataset.path {root} holds no readable, non-empty files; point it at a folder of text")
    return root, files


def _folder_files(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    files, skipped = [], []
    for candidate in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix().encode()):
        name = candidate.relative_to(root).as_posix()
        if any(part.startswith(".") for part in candidate.relative_to(root).parts):
            if candidate.is_file():
                skipped.append((name, "hidden"))
        elif candidate.is_symlink():
            skipped.append((name, "a link"))
        elif not candidate.is_file():
            continue  # folders are walked; sockets and pipes are not data
        elif candidate.stat().st_size == 0:
            skipped.append((name, "empty"))
        elif not os.access(candidate, os.R_OK):
            skipped.append((name, "unreadable"))
        else:
            files.append(candidate)
    return files, skipped


def content_digest(files: list[Path]) -> tuple[str, int]:
    """sha256 and size of the files' concatenation (what the corpus is): what keys a cache built from local files."""
    digest, size = hashlib.sha256(), 0
    for file in files:
        try:
            with open(file, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    size += len(block)
        except OSError as error:
            raise DataError(f"cannot read {file} ({error.strerror}); fix its permissions or remove it from dataset.path") from error
    return digest.hexdigest(), size


def _build(files: list[Path], fractions: tuple, source: dict) -> CacheContent:
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
    digest = hashlib.sha256(raw).hexdigest()
    if digest != source["sha256"]:
        raise DataError(f"dataset.path {source['path']} changed while it was read; rerun when it is complete")
    train_end, valid_end = split_boundaries(len(raw), fractions)
    pieces = {"train": raw[:train_end], "valid": raw[train_end:valid_end], "test": raw[valid_end:]}
    return CacheContent(arrays=pieces, info={"source": source, "boundaries": [train_end, valid_end]})


def _note_changed_source(data_dir: Path, root: Path, digest: str, cache: CacheFolder) -> None:
    """Say in one line when this path was cached before with other content (its new cache is then built)."""
    sources_path = data_dir / SOURCES_FILE
    try:
        sources = json.loads(sources_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sources = {}
    if not isinstance(sources, dict):
        sources = {}
    earlier = sources.get(str(root))
    if earlier is not None and earlier != digest and not (cache.path / MANIFEST).exists():
        print(f"{root} changed since it was cached (sha256 {earlier[:12]}… → {digest[:12]}…); reading it again")
    if earlier != digest:
        data_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(sources_path, json.dumps(sources | {str(root): digest}, indent=2, sort_keys=True))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "source"
