"""Files written whole or not at all: a reader never finds half a file under its real name."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def temporary_sibling(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (a rename within one folder is atomic); deleted on exit unless
    the caller renamed it over ``final``. Writers that must check what they wrote before it counts (the data
    cache, downloads) use it directly; everything else calls :func:`write_atomic`."""
    temp = final.with_name(f"{final.name}.part-{os.getpid()}")
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.
    On failure (a full disk, say) the temporary file is removed, ``path`` keeps its old content, and the
    OSError names ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with temporary_sibling(path) as temp:
            with open(temp, "wb") as file:
                file.write(data.encode() if isinstance(data, str) else data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
    except OSError as error:
        if error.filename is None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
