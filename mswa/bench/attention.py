"""`python -m mswa.bench attention`: time and peak memory of the attention backends.

It times the attention backends over sequence lengths for three cases at one base window
w, each reported per layer: `mswa` (the `mswa` schedule's four layer groups, one layer each, timed
as one step: mean window 0.88 w), `mswa_h` (one layer of the head scales alone: 0.94 w) and
`uniform` (one SWA layer: 1.0 w), plus the full causal baseline; it prints a table and writes JSON.
Useful GFLOP/s count only query-key pairs inside the windows
(4 * head_dim FLOPs per pair forward, x3 for forward+backward), compared with this machine's fp32
matmul rate measured by the command itself: a 2048 x 2048 product timed round-robin with each
length's windowed kernels, because a shared VM's speed drifts by 10-20% within minutes. With several
`--threads`, `/1 thread` (a kernel's time over its one-thread time, paired by round) is printed beside
`matmul /1`, the same ratio for that product: what this machine's threads give work that splits perfectly
(on a VM whose cores share a physical core or a neighbour's load, far from 1 / threads).
"""

import json
import os
import platform
from pathlib import Path

import torch

from mswa.atomic import write_atomic
from mswa.attention import window_attention
from mswa.bench.timing import (
    add_allocator_flag,
    busy_processes,
    device_argument,
    interleaved_medians,
    paired_ratio,
    peak_memory_mb,
    reuse_freed_memory,
    step_seconds,
)
from mswa.flops import matmul_flops_per_s, matmul_step
from mswa.windows import attended_pairs, make_schedule

HEADER = (
    f"{'layer':<8} {'N':>6} {'backend':<8} {'threads':>7} {'mode':<9} {'time ms':>10} {'runs':>4} {'peak MB':>9} {'GFLOP/s':>8} "
    f"{'%matmul':>7}"
)
MEMORY_METHOD = {
    "cpu": "peak resident memory (VmHWM) above the resident memory just before one forward+backward, "
    "in MB, with glibc's mmap threshold pinned to 64 KiB so freed tensors leave the resident set",
    "cuda": "torch.cuda.max_memory_allocated above the allocation before one forward+backward, in MB",
}


def add_command(commands):
    bench = commands.add_parser("attention", help="time and peak memory of the attention backends")
    bench.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    bench.add_argument("--heads", type=int, default=8, help="heads (a multiple of 4: the mswa layer has 4 head groups)")
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--window", type=int, default=128, help="base window w of every case")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up; the median is reported")
    bench.add_argument("--row-budget-s", type=float, default=60.0, help="slow cases get fewer runs (at least 3) to fit this")
    bench.add_argument("--min-time-s", type=float, default=5.0, help="fast cases get more runs (<= 100) to fill this: stable medians")
    bench.add_argument(
        "--backends",
        nargs="+",
        choices=("blocked", "dense", "causal", "flex"),
        default=["blocked", "dense", "causal", "flex"],
    )
    bench.add_argument("--dense-max-gb", type=float, default=4.0, help="skip dense where its (N, N) masks need more")
    bench.add_argument("--device", type=device_argument, default=torch.device("cpu"), help="cpu, cuda or cuda:N")
    bench.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[0],
        help="torch CPU threads (default: torch's choice); several (e.g. 1 2) time every case at each, interleaved, with /1 thread",
    )
    bench.add_argument(
        "--background-load",
        type=int,
        nargs="?",
        const=1,
        default=0,
        help="busy processes (default 1) spinning beside the timing: how the kernels fare on a machine with other work",
    )
    bench.add_argument("--output", type=Path, default=Path("bench_results/attention.json"))
    add_allocator_flag(bench)
    bench.add_argument("--tiny", action="store_true", help="smoke run: lengths 64 96, window 16, head_dim 16, 2 repeats")
    bench.set_defaults(run=run)


def run(args):
    if args.tiny:
        args.lengths, args.window, args.head_dim, args.repeats, args.min_time_s = [64, 96], 16, 16, 2, 0.0
    if min(args.lengths) < 1 or args.repeats < 1 or args.head_dim < 1 or min(args.threads) < 0 or args.background_load < 0:
        raise SystemExit("--lengths, --repeats and --head-dim must all be >= 1, --threads and --background-load >= 0.")
    args.threads = sorted({threads or torch.get_num_threads() for threads in args.threads})
    device = args.device
    layers = {name: make_schedule(name, w=args.window, n_layer=count, n_head=args.heads) for name, count in LAYERS}
    load_before = os.getloadavg()[0]  # other work on the machine makes timings noisy: record it
    if not args.glibc_default:
        reuse_freed_memory()
    torch.set_num_threads(max(args.threads))
    matmul_gflops = matmul_flops_per_s(device, torch.float32, MATMUL_SIZE, max(args.threads)) / 1e9
    print(f"matmul rate (fp32, {max(args.threads)} threads, measured): {matmul_gflops:.1f} GFLOP/s; timing...", flush=True)
    cases = _cases(layers, args)
    with busy_processes(args.background_load):
        rows = [row for n in args.lengths for row in _timed_rows(cases, _inputs(args, n, device), args)]
    # Memory last, so that the allocator settings it needs never touch the timings.
    for n in args.lengths:
        inputs = _inputs(args, n, device)
        for (_, stack, backend, threads), row in zip(cases, (row for row in rows if row["n"] == n)):
            if row["time_s"] is not None:  # of the stack's largest layer: one layer's graph lives at a time
                step = _attention_step(stack, backend, inputs, row["mode"] == "fwd+bwd", threads)
                row["peak_mb"] = peak_memory_mb(step, device)
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": args.threads,
            "background_load": args.background_load,
            "device": str(device),
            "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
            "allocator": "glibc default" if args.glibc_default else "reuse freed memory (no mmap)",
        },
        "config": {
            "lengths": args.lengths,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "window": args.window,
            "repeats": args.repeats,
            "min_time_s": args.min_time_s,
            "dtype": "float32",
            "batch": 1,
            "layers": {name: schedule.as_lists() for name, schedule in layers.items()},
            "mean_window_over_w": {name: schedule.mean_window_over_w() for name, schedule in layers.items()},
        },
        "matmul_gflops": matmul_gflops,
        "memory_method": MEMORY_METHOD[device.type],
        "rows": rows,
        "comparisons": compare_rows(rows),
    }
    write_atomic(args.output, json.dumps(result, indent=2))
    print(_report(result))
    print(f"\nwritten: {args.output}")


# (schedule, layers): timed as one step of those layers, reported per layer. `mswa` needs one layer
# per layer group for its mean window (0.88 w): no single layer of it has that budget.
LAYERS = (("mswa", 4), ("mswa_h", 1), ("uniform", 1))
MATMUL_SIZE = 2048
MATMUL_FLOPS = 2 * MATMUL_SIZE**3


def _matmul_step(device, threads):
    """A (2048 x 2048) @ (2048 x 2048) fp32 product on `threads` torch threads: the rate %matmul compares with."""
    product, _ = matmul_step(device, torch.float32, MATMUL_SIZE)

    def step():
        torch.set_num_threads(threads)
        return product()

    return step


def _inputs(args, n, device):
    return [torch.randn(1, args.heads, n, args.head_dim, device=device, requires_grad=True) for _ in range(3)]


def _cases(layers, args):
    """(name, per-layer windows, backend, threads) timed at every length."""
    cases = [
        (name, schedule.windows, backend)
        for name, schedule in layers.items()
        for backend in ("blocked", "dense", "flex")
        if backend in args.backends
    ]
    cases += [("full", ((None,) * args.heads,), "causal")] if "causal" in args.backends else []
    return [(*case, threads) for threads in args.threads for case in cases]


def _timed_rows(cases, inputs, args):
    """Rows of one length; the cases' timed runs are interleaved (see `interleaved_medians`)."""
    n, device = inputs[0].shape[2], inputs[0].device
    rows, steps = [], []
    for layer, stack, backend, threads in cases:
        backward = not (backend == "flex" and device.type == "cpu")  # torch has no CPU flex backward
        row = {
            "layer": layer,
            "n": n,
            "threads": threads,
            "backend": backend,
            "mode": "fwd+bwd" if backward else "fwd only",
            "time_s": None,
            "layers": len(stack),
            "runs": 0,
            "peak_mb": None,
            "useful_gflops": None,
            "pct_matmul": None,
            "note": "",
        }
        dense_gb = (args.heads * 5 + 5) * n * n / 1e9  # bool mask, its float copy, int32 lags
        if backend == "dense" and dense_gb > args.dense_max_gb:
            row["note"] = f"skipped: (N, N) masks need ~{dense_gb:.1f} GB > --dense-max-gb {args.dense_max_gb}"
        else:
            steps.append((row, _attention_step(stack, backend, inputs, backward, threads)))
        rows.append(row)
    runnable = []  # (row, step, warm-up seconds)
    for row, step in steps:
        try:  # the warm-up; flex is optional (it needs torch.compile): record why it did not run
            runnable.append((row, step, step_seconds(step, device)))
        except Exception as error:
            if row["backend"] != "flex":
                raise
            row["note"] = f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    # The windowed kernels are interleaved with each other and with the matmul that rates this
    # length's %matmul (row None: the VM's speed drifts, the rate with it); the references (dense,
    # flex, causal) among themselves: a dense step moves gigabytes, which would slow the step after it.
    matmuls = [({"matmul_threads": threads}, _matmul_step(device, threads)) for threads in {case[-1] for case in cases}]
    kernels = [case for case in runnable if case[0]["backend"] == "blocked"] + [(row, m, step_seconds(m, device)) for row, m in matmuls]
    references = [case for case in runnable if case[0]["backend"] != "blocked"]
    matmul_timings = {}  # threads -> (median seconds, seconds of each round)
    for group in (kernels, references):
        timings = interleaved_medians(
            [step for _, step, _ in group], device, args.repeats, args.row_budget_s, [warmup for *_, warmup in group], args.min_time_s
        )
        for (row, _, _), (seconds, samples) in zip(group, timings):
            if "matmul_threads" in row:
                matmul_timings[row["matmul_threads"]] = seconds, samples
            else:  # per layer
                row.update(time_s=seconds / row["layers"], runs=len(samples), samples_s=[s / row["layers"] for s in samples])
    for row, (layer, stack, backend, threads) in zip(rows, cases):
        seconds, row["matmul_samples_s"] = matmul_timings[threads]  # the samples: the machine's own thread scaling
        row["matmul_gflops"] = MATMUL_FLOPS / seconds / 1e9
        if row["time_s"] is not None:
            pairs = sum(attended_pairs(w, n) for windows in stack for w in windows) / len(stack)
            row["useful_gflops"] = pairs * 4 * args.head_dim * (3 if row["mode"] == "fwd+bwd" else 1) / row["time_s"] / 1e9
            row["pct_matmul"] = 100 * row["useful_gflops"] / row["matmul_gflops"]
        shown = f"{1e3 * row['time_s']:.1f} ms" if row["time_s"] is not None else row["note"]
        print(f"  {layer:<8} {n:>6} {backend:<8} {threads:>2} threads {row['mode']:<9} {shown}", flush=True)
    return rows


def _attention_step(stack, backend, inputs, backward, threads):
    """Forward (and backward) of each layer of `stack` (per-layer windows) in turn, on the same inputs, on
    `threads` torch threads."""
    grad_out = torch.randn_like(inputs[0])
    backend = "auto" if backend == "causal" else backend  # all-None windows run fused causal SDPA

    def step():
        torch.set_num_threads(threads)
        with torch.set_grad_enabled(backward):
            for windows in stack:
                out = window_attention(*inputs, windows, backend=backend)
                if backward:
                    torch.autograd.grad(out, inputs, grad_out)

    return step


def compare_rows(rows):
    """Per layer, N and thread count: blocked speedups over dense and full causal, mswa/uniform time and
    the time over one thread's (both paired by round) beside the matmul's own (what this machine's threads
    give a product that splits perfectly), growth from the smallest N."""
    times = {(r["layer"], r["backend"], r["n"], r["threads"]): r for r in rows if r["time_s"] is not None}
    lengths = sorted({r["n"] for r in rows})
    comparisons = []
    for layer, threads in dict.fromkeys((r["layer"], r["threads"]) for r in rows if r["layer"] != "full"):
        first = times.get((layer, "blocked", lengths[0], threads))
        for n in lengths:
            blocked = times.get((layer, "blocked", n, threads))
            if blocked is None:
                continue
            uniform = times.get(("uniform", "blocked", n, threads))
            one_thread = times.get((layer, "blocked", n, 1))
            comparisons.append(
                {
                    "layer": layer,
                    "n": n,
                    "threads": threads,
                    "blocked_ms": 1e3 * blocked["time_s"],
                    "speedup_vs_dense": _time_ratio(times.get((layer, "dense", n, threads)), blocked),
                    "speedup_vs_causal": _time_ratio(times.get(("full", "causal", n, threads)), blocked),
                    "time_vs_uniform": _paired_time_ratio(blocked, uniform),
                    "time_vs_one_thread": _paired_time_ratio(blocked, one_thread),
                    "matmul_vs_one_thread": paired_ratio(blocked["matmul_samples_s"], one_thread["matmul_samples_s"])
                    if one_thread
                    else None,
                    "time_vs_smallest_n": blocked["time_s"] / first["time_s"],
                    "peak_mb_per_1k_tokens": blocked["peak_mb"] / n * 1024,
                    "pct_matmul": blocked["pct_matmul"],
                    "matmul_gflops": blocked["matmul_gflops"],
                }
            )
    return comparisons


def _paired_time_ratio(numerator, denominator):
    """Median over rounds of the two rows' time ratio: their runs alternate round by round, so each
    ratio compares two runs a few ms apart, which cancels the machine's drift better than a ratio of
    medians (that one is the fallback when the rows were not timed in the same rounds)."""
    a, b = (row and row.get("samples_s") for row in (numerator, denominator))
    if a and b and len(a) == len(b):
        return paired_ratio(a, b)
    return _time_ratio(numerator, denominator)


def _time_ratio(numerator, denominator):
    return numerator["time_s"] / denominator["time_s"] if numerator and denominator else None


def _format_row(row):
    if row["time_s"] is None:
        return f"{row['layer']:<8} {row['n']:>6} {row['backend']:<8} {row['threads']:>7} {row['mode']:<9} {row['note']}"
    return (
        f"{row['layer']:<8} {row['n']:>6} {row['backend']:<8} {row['threads']:>7} {row['mode']:<9} {1e3 * row['time_s']:>10.1f} "
        f"{row['runs']:>4} "
        f"{row['peak_mb']:>9.1f} {row['useful_gflops']:>8.1f} {row['pct_matmul']:>7.1f} {row['note']}"
    )


def _report(result):
    def number(x, spec):
        return "-" if x is None else format(x, spec)

    load = result["machine"]["load_average_1min"]
    machine = (
        f"\nmatmul rate (fp32, measured at the start): {result['matmul_gflops']:.1f} GFLOP/s; %matmul uses the rate "
        f"timed among each length's windowed kernels; "
        f"threads {', '.join(map(str, result['machine']['threads']))}; {result['machine']['background_load']} busy "
        f"process(es) beside the timing (--background-load); load average {load['start']:.1f} -> {load['end']:.1f} "
        f"(other work on the machine slows timings)"
    )
    config = result["config"]
    cases = "; ".join(
        f"{name}: {len(stack)} layer{'s' * (len(stack) > 1)}, mean window {config['mean_window_over_w'][name]:.2f} w"
        for name, stack in config["layers"].items()
    )
    lines = [
        machine,
        f"memory: {result['memory_method']}",
        f"per layer (time and GFLOP/s averaged over a case's layers, memory of its largest) - {cases}",
        HEADER,
    ]
    lines += [_format_row(row) for row in result["rows"]]
    lines.append(
        f"\nblocked: {'layer':<8} {'N':>6} {'threads':>7} {'ms':>9} {'x dense':>8} {'x causal':>8} {'/uniform':>8} "
        f"{'/1 thread':>9} {'matmul /1':>9} {'/first N':>8} {'MB/1k tok':>9} {'%matmul':>7} {'of GFLOP/s':>10}"
    )
    for c in result["comparisons"]:
        lines.append(
            f"         {c['layer']:<8} {c['n']:>6} {c['threads']:>7} {c['blocked_ms']:>9.1f} {number(c['speedup_vs_dense'], '8.1f'):>8} "
            f"{number(c['speedup_vs_causal'], '8.1f'):>8} {number(c['time_vs_uniform'], '8.2f'):>8} "
            f"{number(c['time_vs_one_thread'], '9.2f'):>9} {number(c['matmul_vs_one_thread'], '9.2f'):>9} "
            f"{c['time_vs_smallest_n']:>8.1f} {c['peak_mb_per_1k_tokens']:>9.2f} {c['pct_matmul']:>7.1f} {c['matmul_gflops']:>10.1f}"
        )
    return "\n".join(lines)
