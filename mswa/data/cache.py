"""Verified caches: the one way every dataset loader stores what it built, and checks it on every load.

A cache is a folder ``<data_dir>/<name>-<key>`` whose key is a digest of the request that built it
(the corpus' expected checksums, its source and split rule, the generator settings, the tokenizer),
so different requests never share a folder. It holds ``.npy`` arrays and text files plus
``manifest.json``, written last, that records the request and each file's size and sha256. Every
load checks every file against the manifest (sha256 runs at ~1.5 GB/s: the packed ~0.5 GB LLM corpus
verifies in under a second), so:

- a folder without a manifest is an interrupted build: it is rebuilt, never read;
- a file that disagrees with the manifest (missing, truncated, changed) is refused in one sentence
  naming it and the folder to delete, never used.

Every file is written to ``<name>.part-<pid>`` and renamed only once complete and verified; a
failure or interrupt deletes the temporary file, so nothing half-written carries a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mswa.atomic import temporary_sibling, write_atomic
from mswa.data.corpus import DataError

MANIFEST = "manifest.json"
CACHE_FORMAT = 1  # bump when the layout of cache folders changes


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class CacheContent:
    """What a cache holds: arrays by name (stored as ``<name>.npy``), texts by file name, and the
    loader's ``info`` (plain JSON values: sizes, floors, the vocabulary size)."""

    arrays: dict[str, np.ndarray]
    info: dict
    texts: dict[str, str] = field(default_factory=dict)


class CacheFolder:
    """The verified cache of one request: arrays and texts under ``<data_dir>/<name>-<key>``."""

    def __init__(self, data_dir: str | os.PathLike, name: str, identity: dict):
        self.identity = json.loads(json.dumps(identity, sort_keys=True))  # JSON-native, as the manifest stores it
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(data_dir).expanduser() / f"{name}-{key}"

    def load_or_build(self, build: Callable[[], CacheContent]) -> CacheContent:
        """The cache's content, every file verified against the manifest (arrays memory-mapped); when no
        complete build exists, ``build()`` makes it first and it is written, verified, then read back."""
        manifest = self._verified_manifest()
        if manifest is None:
            manifest = self._write(build())
        files = manifest["files"]
        arrays = {name.removesuffix(".npy"): self._array(name, record) for name, record in files.items() if "dtype" in record}
        texts = {name: (self.path / name).read_bytes().decode("utf-8") for name, record in files.items() if "dtype" not in record}
        return CacheContent(arrays=arrays, info=manifest["info"], texts=texts)

    def refuse(self, problem: str) -> DataError:
        """The one-sentence refusal of a damaged cache: ``problem``, then the folder to delete."""
        return DataError(f"{problem}; delete {self.path} and rerun to rebuild it")

    def _verified_manifest(self) -> dict | None:
        """The manifest after checking every file against it; None when no complete build exists."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            return None
        manifest = self._read_manifest(manifest_path)
        for filename, record in manifest["files"].items():
            self._verify_file(self.path / filename, record)
        return manifest

    def _array(self, filename: str, record: dict) -> np.ndarray:
        """Memory-map a verified array of the cache."""
        path = self.path / filename
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise self.refuse(f"cache file {path} is unreadable ({error})") from error
        if str(array.dtype) != record["dtype"] or array.shape != (record["length"],):
            expected = f"{record['dtype']}[{record['length']}]"
            raise self.refuse(f"cache file {path} holds {array.dtype}{list(array.shape)}, not the manifest's {expected}")
        return array

    def _write(self, content: CacheContent) -> dict:
        """Write and verify every file, then the manifest that makes them a cache; return the manifest."""
        self.path.mkdir(parents=True, exist_ok=True)
        files = {f"{name}.npy": self._write_array(f"{name}.npy", array) for name, array in content.arrays.items()}
        files |= {filename: self._write_text(filename, text) for filename, text in content.texts.items()}
        manifest = {"format": CACHE_FORMAT, "identity": self.identity, "files": files, "info": content.info}
        write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=2))
        return manifest

    def _read_manifest(self, path: Path) -> dict:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            identity = manifest["identity"]
            if not all({"bytes", "sha256"} <= record.keys() for record in manifest["files"].values()):
                raise KeyError("a file record lacks 'bytes' or 'sha256'")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise self.refuse(f"cache manifest {path} is unreadable ({error!r})") from error
        if manifest.get("format") != CACHE_FORMAT or identity != self.identity:
            raise self.refuse(f"cache {self.path} was built by another version or request ({identity})")
        return manifest

    def _verify_file(self, path: Path, record: dict) -> None:
        if not path.is_file():
            raise self.refuse(f"cache file {path} is missing")
        size = path.stat().st_size
        if size != record["bytes"]:
            recorded = record["bytes"]
            raise self.refuse(f"cache file {path} has {size:,} bytes, not the {recorded:,} its manifest records (truncated or changed)")
        if sha256_file(path) != record["sha256"]:
            raise self.refuse(f"cache file {path} does not match the sha256 its manifest records (corrupted)")

    def _unreadable_write(self, temp: Path) -> DataError:
        return DataError(f"cache file {temp} does not read back as written (failing disk?); check {self.path.parent} and rerun")

    def _write_array(self, filename: str, array: np.ndarray) -> dict:
        final = self.path / filename
        with temporary_sibling(final) as temp:
            with open(temp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            written = np.load(temp, mmap_mode="r", allow_pickle=False)
            if written.dtype != array.dtype or not np.array_equal(written, array):
                raise self._unreadable_write(temp)
            del written  # release the map before renaming
            record = {"bytes": temp.stat().st_size, "sha256": sha256_file(temp), "dtype": str(array.dtype), "length": len(array)}
            os.replace(temp, final)
        return record

    def _write_text(self, filename: str, text: str) -> dict:
        final = self.path / filename
        with temporary_sibling(final) as temp:
            encoded = text.encode("utf-8")
            temp.write_bytes(encoded)
            if temp.read_bytes() != encoded:
                raise self._unreadable_write(temp)
            record = {"bytes": temp.stat().st_size, "sha256": sha256_file(temp)}
            os.replace(temp, final)
        return record
