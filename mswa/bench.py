"""Benchmarks, one subcommand each: `python -m mswa.bench attention [--tiny] ...`.

`attention` times the attention backends over sequence lengths for three cases at one base window
w, each reported per layer: `mswa` (the `mswa` schedule's four layer groups, one layer each, timed
as one step: mean window 0.88 w), `mswa_h` (one layer of the head scales alone: 0.94 w) and
`uniform` (one SWA layer: 1.0 w), plus the full causal baseline; it prints a table and writes JSON.
Useful GFLOP/s count only query-key pairs inside the windows
(4 * head_dim FLOPs per pair forward, x3 for forward+backward), compared with this machine's fp32
matmul rate measured by the command itself: a 2048 x 2048 product timed round-robin with each
length's windowed kernels, because a shared VM's speed drifts by 10-20% within minutes.
"""

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mswa.attention import window_attention
from mswa.windows import attended_pairs, make_schedule

PAGE_RESET = "5"  # written to /proc/self/clear_refs: resets the peak resident set (VmHWM)
HEADER = f"{'layer':<8} {'N':>6} {'backend':<8} {'mode':<9} {'time ms':>10} {'runs':>4} {'peak MB':>9} {'GFLOP/s':>8} {'%matmul':>7}"
MEMORY_METHOD = {
    "cpu": "peak resident memory (VmHWM) above the resident memory just before one forward+backward, "
    "in MB, with glibc's mmap threshold pinned to 64 KiB so freed tensors leave the resident set",
    "cuda": "torch.cuda.max_memory_allocated above the allocation before one forward+backward, in MB",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mswa.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_attention_command(commands)
    _add_model_command(commands)
    _add_eval_command(commands)
    _add_generate_command(commands)
    args = parser.parse_args(argv)
    args.run(args)


# ----------------------------------------------------------------------------- attention


def _add_attention_command(commands):
    bench = commands.add_parser("attention", help="time and peak memory of the attention backends")
    bench.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    bench.add_argument("--heads", type=int, default=8, help="heads (a multiple of 4: the mswa layer has 4 head groups)")
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--window", type=int, default=128, help="base window w of every case")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up; the median is reported")
    bench.add_argument(
        "--row-budget-s", type=float, default=60.0, help="slow cases get fewer runs (at least 3) to fit this"
    )
    bench.add_argument(
        "--min-time-s", type=float, default=5.0,
        help="fast cases get more runs (up to 100) to fill this, so that short-N medians are stable",
    )
    bench.add_argument(
        "--backends",
        nargs="+",
        choices=("blocked", "dense", "causal", "flex"),
        default=["blocked", "dense", "causal", "flex"],
    )
    bench.add_argument("--dense-max-gb", type=float, default=4.0, help="skip dense where its (N, N) masks need more")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--output", type=Path, default=Path("bench_results/attention.json"))
    _add_allocator_flag(bench)
    bench.add_argument(
        "--tiny", action="store_true", help="smoke run: lengths 64 96, window 16, head_dim 16, 2 repeats"
    )
    bench.set_defaults(run=run_attention_bench)


def _add_allocator_flag(bench):
    bench.add_argument("--glibc-default", action="store_true",
                       help="time with glibc's default allocator settings (see reuse_freed_memory)")


def run_attention_bench(args):
    if args.tiny:
        args.lengths, args.window, args.head_dim, args.repeats, args.min_time_s = [64, 96], 16, 16, 2, 0.0
    if min(args.lengths) < 1 or args.repeats < 1 or args.head_dim < 1:
        raise SystemExit("--lengths, --repeats and --head-dim must all be >= 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    layers = {name: make_schedule(name, w=args.window, n_layer=count, n_head=args.heads) for name, count in LAYERS}
    load_before = os.getloadavg()[0]  # other work on the machine makes timings noisy: record it
    if not args.glibc_default:
        reuse_freed_memory()
    matmul_gflops = measure_matmul_gflops(device)
    print(f"matmul rate (fp32, measured): {matmul_gflops:.1f} GFLOP/s; timing...", flush=True)
    cases = _cases(layers, args)
    rows = [row for n in args.lengths for row in _timed_rows(cases, _inputs(args, n, device), args)]
    # Memory last, so that the allocator settings it needs never touch the timings.
    for n in args.lengths:
        inputs = _inputs(args, n, device)
        for (_, stack, backend), row in zip(cases, (row for row in rows if row["n"] == n)):
            if row["time_s"] is not None:  # of the stack's largest layer: one layer's graph lives at a time
                row["peak_mb"] = _peak_memory_mb(_attention_step(stack, backend, inputs, row["mode"] == "fwd+bwd"), device)
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
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
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(_report(result))
    print(f"\nwritten: {args.output}")


# (schedule, layers): timed as one step of those layers, reported per layer. `mswa` needs one layer
# per layer group for its mean window (0.88 w): no single layer of it has that budget.
LAYERS = (("mswa", 4), ("mswa_h", 1), ("uniform", 1))
MATMUL_SIZE = 2048
MATMUL_FLOPS = 2 * MATMUL_SIZE**3


def measure_matmul_gflops(device, repeats=5):
    """This machine's fp32 matrix-multiply rate: median time of a (2048 x 2048) @ (2048 x 2048)."""
    return MATMUL_FLOPS / _median_seconds(_matmul_step(device), device, repeats)[0] / 1e9


def _matmul_step(device):
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device) for _ in range(2))
    return lambda: a @ b


def _inputs(args, n, device):
    return [torch.randn(1, args.heads, n, args.head_dim, device=device, requires_grad=True) for _ in range(3)]


def _cases(layers, args):
    """(name, per-layer windows, backend) timed at every length."""
    cases = [(name, schedule.windows, backend) for name, schedule in layers.items()
             for backend in ("blocked", "dense", "flex") if backend in args.backends]
    return cases + ([("full", ((None,) * args.heads,), "causal")] if "causal" in args.backends else [])


def _timed_rows(cases, inputs, args):
    """Rows of one length; the cases' timed runs are interleaved (see `interleaved_medians`)."""
    n, device = inputs[0].shape[2], inputs[0].device
    rows, steps = [], []
    for layer, stack, backend in cases:
        backward = not (backend == "flex" and device.type == "cpu")  # torch has no CPU flex backward
        row = {"layer": layer, "n": n, "backend": backend, "mode": "fwd+bwd" if backward else "fwd only", "time_s": None,
               "layers": len(stack), "runs": 0, "peak_mb": None, "useful_gflops": None, "pct_matmul": None, "note": ""}
        dense_gb = (args.heads * 5 + 5) * n * n / 1e9  # bool mask, its float copy, int32 lags
        if backend == "dense" and dense_gb > args.dense_max_gb:
            row["note"] = f"skipped: (N, N) masks need ~{dense_gb:.1f} GB > --dense-max-gb {args.dense_max_gb}"
        else:
            steps.append((row, _attention_step(stack, backend, inputs, backward)))
        rows.append(row)
    runnable = []  # (row, step, warm-up seconds)
    for row, step in steps:
        try:  # the warm-up; flex is optional (it needs torch.compile): record why it did not run
            runnable.append((row, step, _seconds(step, device)))
        except Exception as error:
            if row["backend"] != "flex":
                raise
            row["note"] = f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    # The windowed kernels are interleaved with each other and with the matmul that rates this
    # length's %matmul (row None: the VM's speed drifts, the rate with it); the references (dense,
    # flex, causal) among themselves: a dense step moves gigabytes, which would slow the step after it.
    matmul = _matmul_step(device)
    kernels = [case for case in runnable if case[0]["backend"] == "blocked"] + [(None, matmul, _seconds(matmul, device))]
    references = [case for case in runnable if case[0]["backend"] != "blocked"]
    for group in (kernels, references):
        timings = interleaved_medians([step for _, step, _ in group], device, args.repeats, args.row_budget_s,
                                      [warmup for *_, warmup in group], args.min_time_s)
        for (row, _, _), (seconds, samples) in zip(group, timings):
            if row is None:
                matmul_gflops = MATMUL_FLOPS / seconds / 1e9
            else:  # per layer
                row.update(time_s=seconds / row["layers"], runs=len(samples), samples_s=[s / row["layers"] for s in samples])
    for row, (layer, stack, backend) in zip(rows, cases):
        row["matmul_gflops"] = matmul_gflops
        if row["time_s"] is not None:
            pairs = sum(attended_pairs(w, n) for windows in stack for w in windows) / len(stack)
            row["useful_gflops"] = pairs * 4 * args.head_dim * (3 if row["mode"] == "fwd+bwd" else 1) / row["time_s"] / 1e9
            row["pct_matmul"] = 100 * row["useful_gflops"] / matmul_gflops
        shown = f"{1e3 * row['time_s']:.1f} ms" if row["time_s"] is not None else row["note"]
        print(f"  {layer:<8} {n:>6} {backend:<8} {row['mode']:<9} {shown}", flush=True)
    return rows


def _attention_step(stack, backend, inputs, backward):
    """Forward (and backward) of each layer of `stack` (per-layer windows) in turn, on the same inputs."""
    grad_out = torch.randn_like(inputs[0])
    backend = "auto" if backend == "causal" else backend  # all-None windows run fused causal SDPA

    def step():
        with torch.set_grad_enabled(backward):
            for windows in stack:
                out = window_attention(*inputs, windows, backend=backend)
                if backward:
                    torch.autograd.grad(out, inputs, grad_out)

    return step


def _median_seconds(step, device, repeats, budget_s=float("inf")):
    """Median of `repeats` timed runs after a warm-up."""
    return interleaved_medians([step], device, repeats, budget_s)[0]


def interleaved_medians(steps, device, repeats, budget_s=float("inf"), warmups=None, min_time_s=0.0):
    """(median seconds, [seconds of each run]) of each step. After one warm-up each (compilation, cached masks,
    allocator), the timed runs go round-robin over the steps, so drift in the machine's speed (a
    shared VM's neighbours) hits every step alike and their ratios stay fair. Slow steps get fewer
    runs, at least 3, so that each fits in about `budget_s`. When a round of all steps turns out
    fast, every step gets more rounds, up to 100 in all, to fill `min_time_s` (judged from the timed
    runs: a first warm-up can be slow). `warmups`: seconds of warm-ups already run."""
    warmups = warmups or [_seconds(step, device) for step in steps]
    runs = [repeats if w * repeats <= budget_s else min(repeats, max(3, int(budget_s / w))) for w in warmups]
    times = [[] for _ in steps]
    _run_rounds(steps, device, runs, times)
    if steps and min_time_s:
        rounds = min(100, math.ceil(min_time_s / sum(statistics.median(timed) for timed in times)))
        _run_rounds(steps, device, [rounds - len(timed) for timed in times], times)
    return [(statistics.median(timed), timed) for timed in times]


def _run_rounds(steps, device, runs, times):
    """runs[i] more timed runs of step i, appended to times[i], round-robin over the steps. Each
    round starts one step later, so no step always follows the same one (a step that sweeps the
    caches, like the matmul, would otherwise always slow the same successor)."""
    for round_ in range(max(runs, default=0)):
        for i in range(len(steps)):
            i = (i + round_) % len(steps)
            if round_ < runs[i]:
                times[i].append(_seconds(steps[i], device))


def _seconds(step, device):
    _synchronize(device)
    start = time.perf_counter()
    step()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(step, device):
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
_reusing_freed_memory = False


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


def compare_rows(rows):
    """Per layer and N: blocked speedups over dense and full causal, mswa/uniform time (paired by
    round), growth from the smallest N."""
    times = {(r["layer"], r["backend"], r["n"]): r for r in rows if r["time_s"] is not None}
    lengths = sorted({r["n"] for r in rows})
    comparisons = []
    for layer in dict.fromkeys(r["layer"] for r in rows if r["layer"] != "full"):
        first = times.get((layer, "blocked", lengths[0]))
        for n in lengths:
            blocked = times.get((layer, "blocked", n))
            if blocked is None:
                continue
            uniform = times.get(("uniform", "blocked", n))
            comparisons.append(
                {
                    "layer": layer,
                    "n": n,
                    "blocked_ms": 1e3 * blocked["time_s"],
                    "speedup_vs_dense": _time_ratio(times.get((layer, "dense", n)), blocked),
                    "speedup_vs_causal": _time_ratio(times.get(("full", "causal", n)), blocked),
                    "time_vs_uniform": _paired_time_ratio(blocked, uniform),
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
        return statistics.median(x / y for x, y in zip(a, b))
    return _time_ratio(numerator, denominator)


def _time_ratio(numerator, denominator):
    return numerator["time_s"] / denominator["time_s"] if numerator and denominator else None


def _format_row(row):
    if row["time_s"] is None:
        return f"{row['layer']:<8} {row['n']:>6} {row['backend']:<8} {row['mode']:<9} {row['note']}"
    return (
        f"{row['layer']:<8} {row['n']:>6} {row['backend']:<8} {row['mode']:<9} {1e3 * row['time_s']:>10.1f} {row['runs']:>4} "
        f"{row['peak_mb']:>9.1f} {row['useful_gflops']:>8.1f} {row['pct_matmul']:>7.1f} {row['note']}"
    )


def _report(result):
    def number(x, spec):
        return "-" if x is None else format(x, spec)

    load = result["machine"]["load_average_1min"]
    machine = (
        f"\nmatmul rate (fp32, measured at the start): {result['matmul_gflops']:.1f} GFLOP/s; %matmul uses the rate "
        f"timed among each length's windowed kernels; "
        f"{result['machine']['threads']} threads; load average {load['start']:.1f} -> {load['end']:.1f} "
        f"(other work on the machine slows timings)"
    )
    config = result["config"]
    cases = "; ".join(f"{name}: {len(stack)} layer{'s' * (len(stack) > 1)}, mean window {config['mean_window_over_w'][name]:.2f} w"
                      for name, stack in config["layers"].items())
    lines = [machine, f"memory: {result['memory_method']}",
             f"per layer (time and GFLOP/s averaged over a case's layers, memory of its largest) - {cases}", HEADER]
    lines += [_format_row(row) for row in result["rows"]]
    lines.append(
        f"\nblocked: {'layer':<8} {'N':>6} {'ms':>9} {'x dense':>8} {'x causal':>8} {'/uniform':>8} "
        f"{'/first N':>8} {'MB/1k tok':>9} {'%matmul':>7} {'of GFLOP/s':>10}"
    )
    for c in result["comparisons"]:
        lines.append(
            f"         {c['layer']:<8} {c['n']:>6} {c['blocked_ms']:>9.1f} {number(c['speedup_vs_dense'], '8.1f'):>8} "
            f"{number(c['speedup_vs_causal'], '8.1f'):>8} {number(c['time_vs_uniform'], '8.2f'):>8} "
            f"{c['time_vs_smallest_n']:>8.1f} {c['peak_mb_per_1k_tokens']:>9.2f} {c['pct_matmul']:>7.1f} {c['matmul_gflops']:>10.1f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- model

MODEL_VARIANTS = {  # name -> (window schedule, ModelConfig mixer keywords)
    "full": ("full", {}),
    "swa": ("uniform", {}),
    "mswa": ("mswa", {}),
    "linear": ("full", {"mixer": "linear"}),
    "swa_linear": ("uniform", {"mixer": "hybrid"}),
    "mswa_linear": ("mswa", {"mixer": "hybrid"}),
    "mswa_linear_parallel": ("mswa", {"mixer": "hybrid", "layout": "parallel"}),
}


def _add_model_command(commands):
    bench = commands.add_parser("model", help="training-step tokens/s and peak memory of whole models")
    bench.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    bench.add_argument("--models", nargs="+", choices=tuple(MODEL_VARIANTS), default=list(MODEL_VARIANTS))
    bench.add_argument("--layers", type=int, default=8, help="a multiple of 4: mswa has 4 layer groups")
    bench.add_argument("--d-model", type=int, default=256)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--window", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--output", type=Path, default=Path("bench_results/model.json"))
    _add_allocator_flag(bench)
    bench.add_argument("--tiny", action="store_true", help="smoke run: lengths 64 128, 2 layers, d_model 32, window 16")
    bench.set_defaults(run=run_model_bench)


def run_model_bench(args):
    """Training tokens/s per model and length; the models of one length are timed interleaved."""
    if args.tiny:
        args.lengths, args.layers, args.d_model, args.heads, args.window, args.repeats = [64, 128], 4, 32, 4, 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.glibc_default:
        reuse_freed_memory()
    device, rows = torch.device("cpu"), []
    for n in args.lengths:
        steps = {name: _training_step(name, n, args) for name in args.models}
        timings = interleaved_medians(list(steps.values()), device, args.repeats)
        for (name, step), (seconds, samples) in zip(steps.items(), timings):
            rows.append({"model": name, "n": n, "tokens_per_s": n / seconds, "step_s": seconds, "runs": len(samples),
                         "peak_mb": _peak_memory_mb(step, device)})
            print(f"{name:<22} N={n:>6} {n / seconds:>10.0f} tok/s {rows[-1]['peak_mb']:>9.1f} MB", flush=True)
    rows.sort(key=lambda row: args.models.index(row["model"]))  # stable: by model, then length
    _add_model_ratios(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "settings": {k: v for k, v in vars(args).items() if k not in ("run", "output")}}, indent=2, default=str))
    print(f"\n{'model':<22} {'N':>6} {'tok/s':>10} {'x full':>7} {'/swa':>6} {'peak MB':>9} {'MB/1k tok':>9}")
    for row in rows:
        print(f"{row['model']:<22} {row['n']:>6} {row['tokens_per_s']:>10.0f} {row['x_full'] or float('nan'):>7.2f} "
              f"{row['vs_swa'] or float('nan'):>6.2f} {row['peak_mb']:>9.1f} {1024 * row['peak_mb'] / row['n']:>9.1f}")
    print(f"wrote {args.output}")


def _variant_model(name, n, args):
    """The randomly initialised model `name` of MODEL_VARIANTS at the benchmark's shape, for n tokens."""
    from mswa.model import LanguageModel, ModelConfig

    schedule_name, mixer = MODEL_VARIANTS[name]
    schedule = make_schedule(schedule_name, w=args.window, n_layer=args.layers, n_head=args.heads)
    windows = None if schedule.is_full else schedule.as_lists()
    config = ModelConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, max_seq_len=n,
                         windows=windows, attn_backend="blocked", **mixer)
    return LanguageModel(config)


def _training_step(name, n, args):
    """One training step (forward, backward, AdamW) of model `name` on one sequence of n tokens."""
    model = _variant_model(name, n, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (1, n))

    def step():
        optimizer.zero_grad(set_to_none=True)
        model.token_nll(tokens, tokens).mean().backward()
        optimizer.step()

    return step


def _add_model_ratios(rows):
    """tokens/s relative to full attention and to SWA at the same length."""
    by_key = {(row["model"], row["n"]): row for row in rows}
    for row in rows:
        for key, reference in (("x_full", "full"), ("vs_swa", "swa")):
            other = by_key.get((reference, row["n"]))
            row[key] = row["tokens_per_s"] / other["tokens_per_s"] if other else None


# ----------------------------------------------------------------------------- eval

EVAL_MODELS = ("full", "swa", "mswa")


def _add_eval_command(commands):
    bench = commands.add_parser("eval", help="evaluation targets/s at stride = seq_len / 4 vs stride = seq_len")
    bench.add_argument("--seq-len", type=int, default=512)
    bench.add_argument("--targets", type=int, default=16384, help="length of the (random) split evaluated")
    bench.add_argument("--models", nargs="+", choices=EVAL_MODELS, default=list(EVAL_MODELS))
    bench.add_argument("--layers", type=int, default=4, help="a multiple of 4: mswa has 4 layer groups")
    bench.add_argument("--d-model", type=int, default=256)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--window", type=int, default=128)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--output", type=Path, default=Path("bench_results/eval.json"))
    bench.add_argument("--tiny", action="store_true", help="smoke run: seq_len 64, 1024 targets, d_model 32, window 16")
    bench.set_defaults(run=run_eval_bench)


def run_eval_bench(args):
    """Full evaluation passes (the project's EvalChunks and token_nll, no gradients) over one random split;
    per model the two strides are timed interleaved, so their ratio is fair on a drifting machine."""
    if args.tiny:
        args.seq_len, args.targets, args.d_model, args.heads, args.window, args.repeats = 64, 1024, 32, 4, 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device, rows = torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    tokens = torch.randint(0, 256, (args.targets + 1,)).numpy()
    strides = (args.seq_len, max(1, args.seq_len // 4))
    for name in args.models:
        model = _variant_model(name, args.seq_len, args).eval().to(device)
        passes = [_eval_pass(model, tokens, args.seq_len, stride, args.batch_size, device) for stride in strides]
        timings = interleaved_medians([step for step, _ in passes], device, args.repeats)
        for stride, (_, chunks), (seconds, samples) in zip(strides, passes, timings):
            rows.append({"model": name, "seq_len": args.seq_len, "stride": stride, "targets_per_s": chunks.n_targets / seconds,
                         "forward_tokens_per_target": chunks.forward_tokens_per_target, "pass_s": seconds, "runs": len(samples)})
        rows[-1]["slowdown"] = rows[-2]["targets_per_s"] / rows[-1]["targets_per_s"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "output")} | {"device": str(device)}
    args.output.write_text(json.dumps({"rows": rows, "settings": settings}, indent=2, default=str))
    print(f"{'model':<6} {'seq_len':>7} {'stride':>6} {'targets/s':>10} {'fwd tok/target':>14} {'slowdown':>8}")
    for row in rows:
        slowdown = f"{row['slowdown']:.2f}x" if "slowdown" in row else ""
        print(f"{row['model']:<6} {row['seq_len']:>7} {row['stride']:>6} {row['targets_per_s']:>10.0f} "
              f"{row['forward_tokens_per_target']:>14.2f} {slowdown:>8}")
    print(f"slowdown: targets/s at stride = seq_len over stride = seq_len / 4 (4x the forward work; goal <= 4.5x)\nwrote {args.output}")


def _eval_pass(model, tokens, seq_len, stride, batch_size, device):
    """(one whole evaluation pass as a step, its chunks)."""
    from torch.utils.data import DataLoader

    from mswa.data.batches import IGNORE, EvalChunks

    chunks = EvalChunks(tokens, seq_len, stride=stride)
    batches = [(x.to(device), y.to(device)) for x, y in DataLoader(chunks, batch_size=batch_size)]

    def step():
        with torch.inference_mode():
            total = torch.zeros((), dtype=torch.float64, device=device)
            for x, y in batches:
                total += model.token_nll(x, y).double()[y != IGNORE].sum()
        return total

    return step, chunks


# ----------------------------------------------------------------------------- generate


def _add_generate_command(commands):
    bench = commands.add_parser("generate", help="decoding: cache bytes, per-token latency and memory vs context length")
    bench.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    bench.add_argument("--models", nargs="+", choices=tuple(MODEL_VARIANTS), default=["full", "swa", "mswa", "mswa_linear"])
    bench.add_argument("--layers", type=int, default=8, help="a multiple of 4: mswa has 4 layer groups")
    bench.add_argument("--d-model", type=int, default=256)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--window", type=int, default=128)
    bench.add_argument("--steps", type=int, default=20, help="timed decoding steps per context; the median is reported")
    bench.add_argument("--prefill-chunk", type=int, default=2048,
                       help="models with full-attention heads prefill in chunks of this many tokens (others in one call)")
    bench.add_argument("--prefill-cap-s", type=float, default=120.0,
                       help="stop a chunked prefill after the chunk that passes this many seconds; decoding then runs at the context reached")
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--output", type=Path, default=Path("bench_results/generate.json"))
    _add_allocator_flag(bench)
    bench.add_argument("--tiny", action="store_true", help="smoke run: contexts 64 256, 4 layers, d_model 32, window 8")
    bench.set_defaults(run=run_generate_bench)


def run_generate_bench(args):
    """Prefill every (model, context) into its own cache, then time single-token steps round-robin over all of
    them, so that the machine's drift hits every row alike and latency ratios stay fair."""
    from mswa.generate import DecodingCache, cache_bytes

    if args.tiny:
        args.contexts, args.layers, args.d_model, args.heads, args.window, args.steps = [64, 256], 4, 32, 4, 8, 5
        args.prefill_chunk = 96
    if min(args.contexts) < 1 or args.steps < 1 or args.prefill_chunk < 1:
        raise SystemExit("--contexts, --steps and --prefill-chunk must all be >= 1.")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.glibc_default:
        reuse_freed_memory()
    device, rows, steps = torch.device("cpu"), [], []
    torch.manual_seed(0)
    for name in args.models:
        model = _variant_model(name, max(args.contexts) + args.steps + 1, args).eval()
        for n in args.contexts:
            cache = DecodingCache(model, reserve=n + args.steps + 2)  # warm-up, timed steps, memory step
            rows.append({"model": name, **_prefill(model, cache, n, args)})
            steps.append((model, cache))
            print(f"{name:<12} prefilled {cache.seen:>6} tokens in {rows[-1]['prefill_s']:.1f} s", flush=True)
    with torch.no_grad():
        timings = interleaved_medians([_decode_step(*step) for step in steps], device, args.steps)  # one warm-up each
        for row, (model, cache), (seconds, samples) in zip(rows, steps, timings):
            row.update(latency_s=seconds, tokens_per_s=1 / seconds, runs=len(samples),
                       step_peak_mb=_peak_memory_mb(_decode_step(model, cache), device))
            row.update(cache_bytes=cache.nbytes(), cache_bytes_closed_form=cache_bytes(model.cfg, cache.seen), seen=cache.seen)
            row["peak_mb"] = row["cache_bytes"]["total"] / 2**20 + row["step_peak_mb"]
    _add_generate_ratios(rows)
    schedule = make_schedule("mswa", w=args.window, n_layer=args.layers, n_head=args.heads)
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_1min": os.getloadavg()[0]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("run", "output")},
        "mswa_budget": schedule.mean_window_over_w(),
        "memory_method": "peak MB = the cache's tensors + the peak resident memory (VmHWM) one decoding step adds "
                         "above the resident memory before it, with glibc's mmap threshold pinned to 64 KiB",
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2, default=str))
    print(_generate_report(result))
    print(f"wrote {args.output}")


def _prefill(model, cache, n, args):
    """Feed n random tokens into `cache`: in one call through the training kernel (O(n * W) for windowed
    heads), or, for a model with full-attention heads, in chunks of --prefill-chunk that stop after the chunk
    passing --prefill-cap-s. Returns where it stopped and how long it took."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, n))
    has_full_heads = model.cfg.windows is None or any(None in layer for layer in model.cfg.windows)
    chunk = args.prefill_chunk if has_full_heads else n
    start = time.perf_counter()
    with torch.no_grad():
        while cache.seen < n and time.perf_counter() - start < args.prefill_cap_s:
            model(tokens[:, cache.seen : cache.seen + chunk], cache)
    seconds = time.perf_counter() - start
    note = "" if cache.seen == n else (f"prefill capped: stopped at {cache.seen} of {n} tokens after {seconds:.0f} s "
                                       "(cache allocated for all)")
    return {"context": n, "reached": cache.seen, "prefill_s": seconds, "note": note}


def _decode_step(model, cache):
    """One new token through the model against `cache` (which keeps it)."""
    token = torch.zeros(1, 1, dtype=torch.long)
    return lambda: model(token, cache)


def _add_generate_ratios(rows):
    """Latency relative to the model's smallest context, cache bytes relative to swa at the same context."""
    first = {}
    by_key = {(row["model"], row["context"]): row for row in rows}
    for row in rows:
        first.setdefault(row["model"], row)
        row["latency_vs_first"] = row["latency_s"] / first[row["model"]]["latency_s"]
        swa = by_key.get(("swa", row["context"]))
        row["cache_vs_swa"] = row["cache_bytes"]["kv"] / swa["cache_bytes"]["kv"] if swa and swa["cache_bytes"]["kv"] else None


def _generate_report(result):
    lines = [f"\nmemory: {result['memory_method']}",
             f"{'model':<12} {'context':>7} {'reached':>7} {'prefill s':>9} {'cache MB':>9} {'closed MB':>9} "
             f"{'ms/token':>9} {'tok/s':>7} {'/first':>6} {'peak MB':>8} {'kv/swa':>6}"]
    for row in result["rows"]:
        measured, closed = row["cache_bytes"]["total"], row["cache_bytes_closed_form"]["total"]
        lines.append(
            f"{row['model']:<12} {row['context']:>7} {row['reached']:>7} {row['prefill_s']:>9.1f} {measured / 2**20:>9.3f} "
            f"{closed / 2**20:>9.3f} {1e3 * row['latency_s']:>9.2f} {row['tokens_per_s']:>7.1f} {row['latency_vs_first']:>6.2f} "
            f"{row['peak_mb']:>8.1f} {'-' if row['cache_vs_swa'] is None else format(row['cache_vs_swa'], '6.3f'):>6} {row['note']}"
        )
    ratios = sorted({round(row["cache_vs_swa"], 4) for row in result["rows"] if row["model"] == "mswa" and row["cache_vs_swa"]})
    if ratios:
        lines.append(f"mswa / swa cache bytes: {', '.join(f'{r:.3f}' for r in ratios)} "
                     f"(sum of W - 1 over heads) beside the schedule's budget {result['mswa_budget']:.3f} (sum of W)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
