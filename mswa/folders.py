"""Where a command writes, checked before any work: one check for every output folder and file of the project,
and the lock a live run holds on its folder.

A folder must not be a file nor lie inside one, and a folder must be creatable in the nearest part of it
that exists. Creating one is the only sure test: permission bits do not tell for root, read-only mounts,
/proc or /sys. Light on imports, so that every command (the report included) can use it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mswa.atomic import write_atomic
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


class FolderInUse(ConfigError):
    """A run folder that a live run holds; the message names its process."""


class FolderLock:
    """The OS lock (``flock``) a run holds on ``<folder>/run.lock`` for its whole life, so that two runs never write
    one folder (a requeued job and a stale duplicate, the same command started twice, ``overwrite=true`` on a
    live run). The OS releases it however the process ends, a SIGKILL included: a lock is never left stale.
    ``run.lock`` itself is never rewritten nor renamed (the lock belongs to the file); who holds it is written,
    atomically, in ``run.lock.json`` once the lock is taken."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path, self.holder_path = self.folder / "run.lock", self.folder / "run.lock.json"
        self._fd: int | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def acquire(self) -> None:
        """Take the lock, or refuse in one sentence naming the live process, before anything in the folder is touched."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(self.refusal()) from None
        except OSError as error:  # a file system without flock (some NFS or Lustre mounts): said, not fatal
            os.close(fd)
            print(f"warning: {self.folder} cannot be locked ({error.strerror}); a second run there would not be stopped", file=sys.stderr)
            return
        self._fd = fd
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        write_atomic(self.holder_path, json.dumps(holder))

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def alive(self) -> bool:
        """Whether a live process holds the folder (tried without taking it; nothing is created)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # and with it any lock this probe took

    def refusal(self) -> str:
        try:
            holder = json.loads(self.holder_path.read_text())
            who = f"process {holder['pid']} on {holder['host']}, running since {holder['since']}"
            stop = f"stop it with kill -TERM {holder['pid']} on {holder['host']} (it saves a checkpoint)"
        except (OSError, ValueError, KeyError):
            who, stop = "a process that has just started", "stop it"
        return (
            f"{self.folder} is in use by a live run ({who}); wait for it to end or {stop}, then run again "
            "(overwrite=true never takes the folder of a live run)"
        )
