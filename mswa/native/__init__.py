"""Native CPU kernels, compiled from this package's C++ at first use, with the PyTorch path as the fallback.

`kernel()` returns the compiled module, or None where it cannot be had: a compiler or ninja missing, a build
that fails (said once, in a warning that names the cause), or `MSWA_NATIVE=0` in the environment. Callers keep
their PyTorch path for None, so a machine without a compiler loses speed, never results.

The build is for this machine's own vector unit (`-march=native`), so its name carries a digest of the source,
the flags, torch's version and the CPU's instruction set: nodes of a cluster that share a home directory (and so
torch's extension cache) each load a build made for their own CPU, never one that would stop on an illegal
instruction. The cache lies where torch keeps extensions (`TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import sys
import time
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("ring_step.cpp", "direct_band.cpp", "band_chunks.cpp", "bindings.cpp")]
FLAGS = ["-O3", "-march=native"]


def _cpu_identity() -> str:
    """The CPU's architecture and instruction-set flags (Linux: /proc/cpuinfo's first `flags` line)."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {platform.processor()} {flags}"


def _extensions_dir() -> Path:
    """torch's extension cache (`TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions), an mswa folder in it."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "mswa"


def build_name(source: str) -> str:
    identity = "\n".join([source, " ".join(FLAGS), torch.__version__, _cpu_identity()])
    return "mswa_native_" + hashlib.sha256(identity.encode()).hexdigest()[:16]


def build_folder(source: str | None = None) -> Path:
    """Where this machine's build of `source` (default: the package's sources) lies, or will."""
    return _extensions_dir() / build_name(_source() if source is None else source)


# torch's build lock outlives a build that was killed (Ctrl-C during the first ~30 s), and every later build would
# wait on it for ever; a build takes well under this, so a lock this old is such a leftover.
STALE_LOCK_S = 600


@cache
def kernel():
    """The compiled kernels (`ring_step`, `band_forward`, `band_backward`), or None (see the module's
    notes); built once per process at most."""
    if os.environ.get("MSWA_NATIVE", "1") == "0":
        return None
    from torch.utils.cpp_extension import load_inline

    source = _source()
    folder = build_folder(source)
    built = _import_built(folder)
    if built is not None:
        return built
    print(f"mswa: building native CPU kernels for this machine, once (~30 s): {folder}", file=sys.stderr)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(folder / "lock")
        return load_inline(folder.name, cpp_sources=source, extra_cflags=FLAGS, build_directory=str(folder))
    except Exception as error:  # noqa: BLE001  any failure to build or load means the PyTorch path, said once
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(f"mswa: native CPU kernels unavailable, using the PyTorch path ({reason})", stacklevel=2)
        return None


def _import_built(folder: Path):
    """The finished build in `folder`, imported without asking ninja whether it is up to date: its name already
    says which source, flags, torch and CPU it was built for, and two ninja versions on one machine (a system one
    and pip's, found by different PATHs) disagree on the build's command hash, so each would rebuild it (~30 s)
    after the other. None if there is none, or it does not load (a build killed while linking): then it is built."""
    library = folder / f"{folder.name}.so"
    if not library.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(folder.name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError:
        return None


def _source() -> str:
    return "\n".join(path.read_text() for path in SOURCES)


def _remove_stale_lock(lock: Path) -> None:
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            print(f"mswa: removed a build lock left by a killed build: {lock}", file=sys.stderr)
    except FileNotFoundError:
        pass
