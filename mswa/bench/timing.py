"""Timing and memory measurement shared by every benchmark.

Times are medians of runs that go round-robin over the compared steps (`interleaved_medians`), so
a shared machine's drift hits every step alike. Peak memory is CUDA's peak allocation, or on CPU the
peak resident set (VmHWM) with glibc's mmap threshold pinned low so that resident memory tracks live
tensors (`peak_memory_mb`). CPU timings run with glibc keeping freed memory (`reuse_freed_memory`).
"""

import argparse
import contextlib
import ctypes
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PAGE_RESET = "5"  # written to /proc/self/clear_refs: resets the peak resident set (VmHWM)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
_reusing_freed_memory = False


def interleaved_medians(steps, device, repeats, budget_s=float("inf"), warmups=None, min_time_s=0.0):
    """(median seconds, [seconds of each run]) of each step. After one warm-up each (compilation, cached masks,
    allocator), the timed runs go round-robin over the steps, so drift in the machine's speed (a
    shared VM's neighbours) hits every step alike and their ratios stay fair. Slow steps get fewer
    runs, at least 3, so that each fits in about `budget_s`. When a round of all steps turns out
    fast, every step gets more rounds, up to 100 in all, to fill `min_time_s` (judged from the timed
    runs: a first warm-up can be slow). `warmups`: seconds of warm-ups already run."""
    warmups = warmups or [step_seconds(step, device) for step in steps]
    runs = [repeats if w * repeats <= budget_s else min(repeats, max(3, int(budget_s / w))) for w in warmups]
    times = [[] for _ in steps]
    _run_rounds(steps, device, runs, times)
    if steps and min_time_s:
        rounds = min(100, math.ceil(min_time_s / sum(statistics.median(timed) for timed in times)))
        _run_rounds(steps, device, [rounds - len(timed) for timed in times], times)
    return [(statistics.median(timed), timed) for timed in times]


def paired_ratio(a, b):
    """Median over rounds of a[i] / b[i], the seconds of two steps timed in the same rounds of
    `interleaved_medians`: each ratio compares two runs a few ms apart, which cancels the machine's drift.
    Rounds only one of them ran (a slow step gets fewer) are left out."""
    return statistics.median(x / y for x, y in zip(a, b))


def median_seconds(step, device, repeats, budget_s=float("inf")):
    """(median, runs) of `repeats` timed runs of one step after a warm-up."""
    return interleaved_medians([step], device, repeats, budget_s)[0]


def _run_rounds(steps, device, runs, times):
    """runs[i] more timed runs of step i, appended to times[i], round-robin over the steps. Each
    round starts one step later, so no step always follows the same one (a step that sweeps the
    caches, like the matmul, would otherwise always slow the same successor)."""
    for round_ in range(max(runs, default=0)):
        for i in range(len(steps)):
            i = (i + round_) % len(steps)
            if round_ < runs[i]:
                times[i].append(step_seconds(steps[i], device))


def step_seconds(step, device):
    """Wall seconds of one call of `step`, the device's queued work included."""
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def timed(function, *args, **kwargs) -> tuple[object, float, float]:
    """Result, wall seconds, CPU seconds of this process (all threads): on a shared machine the two differ."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(step, device):
    """MB that one call of `step` adds at its peak above the memory in use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with _freed_memory_unmapped():
        Path("/proc/self/clear_refs").write_text(PAGE_RESET)
        before = _proc_status_bytes("VmRSS")
        step()
    return (_proc_status_bytes("VmHWM") - before) / 2**20


def _proc_status_bytes(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}; CPU memory measurement needs Linux.")


def add_allocator_flag(bench):
    bench.add_argument("--glibc-default", action="store_true", help="time with glibc's default allocator settings (see reuse_freed_memory)")


def reuse_freed_memory():
    """Serve every allocation from glibc's heap and keep freed memory there (no mmap, no trim).

    By default glibc gives blocks above its mmap threshold (at most 32 MiB) their own fresh mapping
    and unmaps them on free, so every step pays page faults to zero them again. Tensors cross that
    size only at long sequences (q, k, v at N = 16k are 32 MiB), which made time grow faster than N
    (+40% at 16k here). Timings use this setting, the one a long-running trainer would choose;
    `--glibc-default` times without it (`MALLOC_MMAP_MAX_=0` does the same for any process)."""
    global _reusing_freed_memory
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**30)
    _reusing_freed_memory = True


@contextlib.contextmanager
def _freed_memory_unmapped():
    """For memory measurement: with the mmap threshold pinned to 64 KiB, big tensors get their own
    mappings, returned on free, so resident memory tracks live tensors. Afterwards the timing
    setting is back (`reuse_freed_memory`, else a 32 MiB threshold, the dynamic default's ceiling)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_MAX, 65536)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)  # glibc's default: freed heap tops go back too
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)  # also hand back what earlier runs left in the heap's free lists
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        if _reusing_freed_memory:
            reuse_freed_memory()


@contextlib.contextmanager
def busy_processes(count):
    """`count` processes that spin on a CPU each while the block runs (the `--background-load` of the
    benchmarks: a machine with other work), stopped at its end."""
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def set_threads(threads):
    """torch's CPU threads (0: torch's choice)."""
    if threads:
        torch.set_num_threads(threads)


def device_argument(text):
    """--device as a torch.device that this machine has, refused in one sentence otherwise."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda; use one of those")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible here; use --device cpu")
    return device
