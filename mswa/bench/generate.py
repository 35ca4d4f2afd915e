"""`python -m mswa.bench generate`: decoding cache bytes, per-token latency and memory against context length.

Every (model, context) is prefilled into its own cache, then single-token steps (one token for each of
`--batch` sequences) are timed round-robin over all of them, so that the machine's drift hits every row
alike; `/swa` is the median over rounds of each step's time over swa's step at the same context in the
same round. The measured cache bytes are printed beside their closed form (`mswa.generate.cache_bytes`).
"""

import json
import os
import platform
import time
from pathlib import Path

import torch

from mswa.atomic import write_atomic
from mswa.bench.model import MODEL_VARIANTS, add_shape_arguments, variant_model
from mswa.bench.timing import add_allocator_flag, interleaved_medians, paired_ratio, peak_memory_mb, reuse_freed_memory, set_threads
from mswa.flops import decoding_flops_per_token
from mswa.windows import make_schedule


def add_command(commands):
    bench = commands.add_parser("generate", help="decoding: cache bytes, per-token latency and memory vs context length")
    bench.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    bench.add_argument("--models", nargs="+", choices=tuple(MODEL_VARIANTS), default=["full", "swa", "mswa", "mswa_linear"])
    add_shape_arguments(bench)
    bench.add_argument("--steps", type=int, default=20, help="timed decoding steps per context; the median is reported")
    bench.add_argument("--batch", type=int, default=1, help="sequences decoded together (each step: one token for each)")
    bench.add_argument(
        "--prefill-chunk", type=int, default=2048, help="prefill chunk of models with full-attention heads (others: one call)"
    )
    bench.add_argument(
        "--prefill-cap-s",
        type=float,
        default=120.0,
        help="stop a chunked prefill after the chunk that passes this many seconds; decoding then runs at the context reached",
    )
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--output", type=Path, default=Path("bench_results/generate.json"))
    add_allocator_flag(bench)
    bench.add_argument("--tiny", action="store_true", help="smoke run: contexts 64 256, 4 layers, d_model 32, window 8")
    bench.set_defaults(run=run)


def run(args):
    """Prefill every (model, context) into its own cache, then time single-token steps round-robin over all of
    them, so that the machine's drift hits every row alike and latency ratios stay fair."""
    from mswa.generate import DecodingCache, cache_bytes

    if args.tiny:
        args.contexts, args.layers, args.d_model, args.heads, args.window, args.steps = [64, 256], 4, 32, 4, 8, 5
        args.prefill_chunk = 96
    if min(args.contexts) < 1 or args.steps < 1 or args.prefill_chunk < 1 or args.batch < 1:
        raise SystemExit("--contexts, --steps, --prefill-chunk and --batch must all be >= 1.")
    set_threads(args.threads)
    if not args.glibc_default:
        reuse_freed_memory()
    device, rows, steps, load_before = torch.device("cpu"), [], [], os.getloadavg()[0]
    torch.manual_seed(0)
    for name in args.models:
        model = variant_model(name, max(args.contexts) + args.steps + 1, args).eval()
        for n in args.contexts:
            cache = DecodingCache(model, reserve=n + args.steps + 2)  # warm-up, timed steps, memory step
            rows.append({"model": name, **_prefill(model, cache, n, args)})
            steps.append((model, cache, args.batch))
            print(f"{name:<12} prefilled {cache.seen:>6} tokens in {rows[-1]['prefill_s']:.1f} s", flush=True)
    with torch.no_grad():
        timings = interleaved_medians([_decode_step(*step) for step in steps], device, args.steps)  # one warm-up each
        for row, (model, cache, batch), (seconds, samples) in zip(rows, steps, timings):
            row.update(
                latency_s=seconds,
                tokens_per_s=args.batch / seconds,
                runs=len(samples),
                samples_s=samples,
                step_peak_mb=peak_memory_mb(_decode_step(model, cache, batch), device),
            )
            closed_form = cache_bytes(model.cfg, cache.seen, batch=args.batch)
            row.update(cache_bytes=cache.nbytes(), cache_bytes_closed_form=closed_form, seen=cache.seen)
            row.update(
                step_bytes=parameter_bytes(model) + row["cache_bytes"]["total"],
                step_flops=args.batch * decoding_flops_per_token(model.cfg, cache.seen),
            )
            row["peak_mb"] = row["cache_bytes"]["total"] / 2**20 + row["step_peak_mb"]
    _add_generate_ratios(rows)
    schedule = make_schedule("mswa", w=args.window, n_layer=args.layers, n_head=args.heads)
    result = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("run", "output")},
        "mswa_budget": schedule.mean_window_over_w(),
        "memory_method": "peak MB = the cache's tensors + the peak resident memory (VmHWM) one decoding step adds "
        "above the resident memory before it, with glibc's mmap threshold pinned to 64 KiB",
        "rows": rows,
    }
    write_atomic(args.output, json.dumps(result, indent=2, default=str))
    print(_generate_report(result))
    print(f"wrote {args.output}")


def _prefill(model, cache, n, args):
    """Feed n random tokens into `cache`: in one call through the training kernel (O(n * W) for windowed
    heads), or, for a model with full-attention heads, in chunks of --prefill-chunk that stop after the chunk
    passing --prefill-cap-s. Returns where it stopped and how long it took."""
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, n))
    has_full_heads = model.cfg.windows is None or any(None in layer for layer in model.cfg.windows)
    chunk = args.prefill_chunk if has_full_heads else n
    start = time.perf_counter()
    with torch.no_grad():
        while cache.seen < n and time.perf_counter() - start < args.prefill_cap_s:
            model(tokens[:, cache.seen : cache.seen + chunk], cache)
    seconds = time.perf_counter() - start
    note = (
        ""
        if cache.seen == n
        else (f"prefill capped: stopped at {cache.seen} of {n} tokens after {seconds:.0f} s (cache allocated for all)")
    )
    return {"context": n, "reached": cache.seen, "prefill_s": seconds, "note": note}


def _decode_step(model, cache, batch):
    """One new token for each sequence through the model against `cache` (which keeps them)."""
    token = torch.zeros(batch, 1, dtype=torch.long)
    return lambda: model(token, cache)


def parameter_bytes(model):
    """The bytes of the model's parameters: a decoding step reads each once, whatever the batch."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _add_generate_ratios(rows):
    """Latency relative to the model's smallest context and to swa's at the same context (median of the
    per-round ratios: the two steps ran a few ms apart), cache bytes relative to swa's, and the two bounds a
    step's time ratio can follow: its bytes read (parameters + cache) and its FLOPs, relative to swa's."""
    first = {}
    by_key = {(row["model"], row["context"]): row for row in rows}
    for row in rows:
        first.setdefault(row["model"], row)
        row["latency_vs_first"] = row["latency_s"] / first[row["model"]]["latency_s"]
        swa = by_key.get(("swa", row["context"]))
        row["latency_vs_swa"] = paired_ratio(row["samples_s"], swa["samples_s"]) if swa else None
        row["cache_vs_swa"] = row["cache_bytes"]["kv"] / swa["cache_bytes"]["kv"] if swa and swa["cache_bytes"]["kv"] else None
        for measure in ("bytes", "flops"):
            row[f"{measure}_vs_swa"] = row[f"step_{measure}"] / swa[f"step_{measure}"] if swa else None


def _generate_report(result):
    machine, settings = result["machine"], result["settings"]
    load = machine["load_average_1min"]

    def ratio(x):
        return "-" if x is None else format(x, "6.3f")

    lines = [
        f"\nbatch {settings['batch']}, {machine['threads']} threads, load average {load['start']:.1f} -> {load['end']:.1f} "
        "(other work on the machine slows timings; compare the /swa column, paired by round)",
        f"memory: {result['memory_method']}",
        "a step's time over swa's (/swa) follows its budget only as far as the cache is the step's work: "
        "bytes/swa (the parameters, read once a step, plus the cache) and flops/swa are the step's own ratios",
        f"{'model':<12} {'context':>7} {'reached':>7} {'prefill s':>9} {'cache MB':>9} {'closed MB':>9} "
        f"{'ms/step':>9} {'tok/s':>7} {'/first':>6} {'/swa':>6} {'peak MB':>8} {'kv/swa':>6} {'read MB':>8} "
        f"{'bytes/swa':>9} {'flops/swa':>9}",
    ]
    for row in result["rows"]:
        measured, closed = row["cache_bytes"]["total"], row["cache_bytes_closed_form"]["total"]
        lines.append(
            f"{row['model']:<12} {row['context']:>7} {row['reached']:>7} {row['prefill_s']:>9.1f} {measured / 2**20:>9.3f} "
            f"{closed / 2**20:>9.3f} {1e3 * row['latency_s']:>9.2f} {row['tokens_per_s']:>7.1f} {row['latency_vs_first']:>6.2f} "
            f"{ratio(row['latency_vs_swa']):>6} {row['peak_mb']:>8.1f} {ratio(row['cache_vs_swa']):>6} "
            f"{row['step_bytes'] / 2**20:>8.1f} {ratio(row['bytes_vs_swa']):>9} {ratio(row['flops_vs_swa']):>9} {row['note']}"
        )
    ratios = sorted({round(row["cache_vs_swa"], 4) for row in result["rows"] if row["model"] == "mswa" and row["cache_vs_swa"]})
    if ratios:
        lines.append(
            f"mswa / swa cache bytes: {', '.join(f'{r:.3f}' for r in ratios)} "
            f"(sum of W over heads) beside the schedule's budget {result['mswa_budget']:.3f}"
        )
    return "\n".join(lines)
