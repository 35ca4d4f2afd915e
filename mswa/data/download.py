"""Shared plumbing of the dataset loaders: one error type, downloads, atomic writes, verified caches.

A cache is a folder ``<data_dir>/<name>-<key>`` whose key is a digest of the request that built it
(the corpus' expected checksums, or its source and split rule), so different requests never share a
folder. It holds ``.npy`` arrays and text files plus ``manifest.json``, written last, that records
the request and each file's size and sha256. Every load checks the files against the manifest, so:

- a folder without a manifest is an interrupted build: it is rebuilt, never read;
- a file that disagrees with the manifest (missing, truncated, changed) is reported and never used.

Every file is written to ``<name>.part-<pid>`` and renamed only once complete and verified; a
failure or interrupt deletes the temporary file, so nothing half-written carries a final name.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

MANIFEST = "manifest.json"
CACHE_FORMAT = 1  # bump when the layout of cache folders changes
BLOCK_BYTES = 1 << 20


class DataError(ValueError):
    """A data file is missing, malformed, truncated or corrupted; the message names the file and the fix."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def temporary_sibling(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; deleted on exit unless the caller renamed it."""
    temp = final.with_name(f"{final.name}.part-{os.getpid()}")
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


@contextmanager
def downloaded(url: str, final: Path) -> Iterator[Path]:
    """Download ``url`` into a temporary file beside ``final`` and yield it once complete.

    The file is deleted on exit: the caller verifies its content and keeps what it derives from it.
    """
    with temporary_sibling(final) as temp:
        _fetch(url, temp)
        yield temp


def _fetch(url: str, destination: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(destination, "wb") as out:
            announced = response.length  # Content-Length, None when the server does not say
            with tqdm(total=announced, unit="B", unit_scale=True, desc=f"downloading {Path(url).name}") as bar:
                while block := response.read(BLOCK_BYTES):
                    out.write(block)
                    bar.update(len(block))
    except (OSError, http.client.HTTPException) as error:  # URLError, HTTPError, timeouts, full disk
        raise DataError(f"downloading {url} failed ({error}); check the URL and the network, then rerun") from error
    received = destination.stat().st_size
    if announced is not None and received != announced:
        raise DataError(
            f"download of {url} is truncated ({received:,} of {announced:,} bytes, connection closed early); "
            "rerun to download it again"
        )


class CacheFolder:
    """The verified cache of one request: arrays and texts under ``<data_dir>/<name>-<key>``."""

    def __init__(self, data_dir: str | os.PathLike, name: str, identity: dict):
        self.identity = json.loads(json.dumps(identity, sort_keys=True))  # JSON-native, as the manifest stores it
        key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(data_dir).expanduser() / f"{name}-{key}"

    def verified_manifest(self) -> dict | None:
        """The manifest after checking every file against it; None when no complete build exists."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            return None
        manifest = self._read_manifest(manifest_path)
        for filename, record in manifest["files"].items():
            self._verify_file(self.path / filename, record)
        return manifest

    def array(self, manifest: dict, filename: str) -> np.ndarray:
        """Memory-map a verified array of the cache."""
        path, record = self.path / filename, manifest["files"][filename]
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"cache file {path} is unreadable ({error}); {self._fix}") from error
        if str(array.dtype) != record["dtype"] or array.shape != (record["length"],):
            expected = f"{record['dtype']}[{record['length']}]"
            raise DataError(f"cache file {path} holds {array.dtype}{list(array.shape)}, not the manifest's {expected}; {self._fix}")
        return array

    def text(self, filename: str) -> str:
        return (self.path / filename).read_bytes().decode("utf-8")

    def write(self, arrays: dict[str, np.ndarray], texts: dict[str, str], info: dict) -> dict:
        """Write and verify every file, then the manifest that makes them a cache; return the manifest."""
        self.path.mkdir(parents=True, exist_ok=True)
        files = {filename: self._write_array(filename, array) for filename, array in arrays.items()}
        files |= {filename: self._write_text(filename, text) for filename, text in texts.items()}
        manifest = {"format": CACHE_FORMAT, "identity": self.identity, "files": files, "info": info}
        final = self.path / MANIFEST
        with temporary_sibling(final) as temp:
            temp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            os.replace(temp, final)
        return manifest

    @property
    def _fix(self) -> str:
        return f"delete {self.path} and rerun to rebuild it"

    def _read_manifest(self, path: Path) -> dict:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            identity = manifest["identity"]
            if not all({"bytes", "sha256"} <= record.keys() for record in manifest["files"].values()):
                raise KeyError("a file record lacks 'bytes' or 'sha256'")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DataError(f"cache manifest {path} is unreadable ({error!r}); {self._fix}") from error
        if manifest.get("format") != CACHE_FORMAT or identity != self.identity:
            raise DataError(f"cache {self.path} was built by another version or request ({identity}); {self._fix}")
        return manifest

    def _verify_file(self, path: Path, record: dict) -> None:
        if not path.is_file():
            raise DataError(f"cache file {path} is missing; {self._fix}")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise DataError(
                f"cache file {path} has {size:,} bytes, not the {record['bytes']:,} its manifest records (truncated or changed); {self._fix}"
            )
        if sha256_file(path) != record["sha256"]:
            raise DataError(f"cache file {path} does not match the sha256 its manifest records (corrupted); {self._fix}")

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
