"""Where a command writes, checked before any work: one check for every output folder and file of the project.

A folder must not be a file nor lie inside one, and a folder must be creatable in the nearest part of it
that exists. Creating one is the only sure test: permission bits do not tell for root, read-only mounts,
/proc or /sys. Light on imports, so that every command (the report included) can use it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mswa.rules import ConfigError


class FolderError(ConfigError):
    """A place a command cannot write to; the message names the key, the path and the fix."""


def check_folder(key: str, path: str | os.PathLike) -> None:
    """``path`` (given as ``key``) is, or can become, a folder this process writes into."""
    _check_place(key, path, Path(path))


def check_file(key: str, path: str | os.PathLike) -> None:
    """``path`` (given as ``key``) is a file this process can write: not a folder, in a folder it can write into."""
    if Path(path).is_dir():
        raise FolderError(f"{key}={path} is a folder; give the path of a file")
    _check_place(key, path, Path(path).parent)


def _check_place(key: str, path: str | os.PathLike, folder: Path) -> None:
    """The nearest existing part of ``folder`` is a folder in which a folder can be made."""
    folder = folder.expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == Path(path).expanduser().absolute() else f"is inside the file {existing}"
        raise FolderError(f"{key}={path} {where}; give a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as error:
        raise FolderError(
            f"{key}={path} cannot be written (no folder can be made in {existing}: {error.strerror}); give a folder you can write to"
        ) from None
