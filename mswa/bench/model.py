"""`python -m mswa.bench model`: training-step tokens/s and peak memory of whole models.

Each model of `MODEL_VARIANTS` (also the models of the eval and generate benchmarks) is built at one
shape; at every length the models' training steps (forward, backward, AdamW on one sequence) are
timed interleaved. `--device`, `--backend` and `--dtype` (autocast, as `precision=bf16-mixed` trains)
pick where and how; the defaults (cpu, auto = blocked there, float32) are the CPU benchmark.
"""

import json
from pathlib import Path

import torch

from mswa.atomic import write_atomic
from mswa.attention import BACKENDS, resolve_backend
from mswa.bench.timing import (
    add_allocator_flag,
    device_argument,
    interleaved_medians,
    peak_memory_mb,
    reuse_freed_memory,
    set_threads,
)
from mswa.flops import matmul_step, rate_dtype, training_flops_per_token
from mswa.windows import make_schedule

MODEL_VARIANTS = {  # name -> (window schedule, ModelConfig mixer keywords)
    "full": ("full", {}),
    "swa": ("uniform", {}),
    "mswa": ("mswa", {}),
    "linear": ("full", {"mixer": "linear"}),
    "swa_linear": ("uniform", {"mixer": "hybrid"}),
    "mswa_linear": ("mswa", {"mixer": "hybrid"}),
    "mswa_linear_parallel": ("mswa", {"mixer": "hybrid", "layout": "parallel"}),
}
DTYPES = ("float32", "bfloat16", "float16")


def add_command(commands):
    bench = commands.add_parser("model", help="training-step tokens/s and peak memory of whole models")
    bench.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    bench.add_argument("--models", nargs="+", choices=tuple(MODEL_VARIANTS), default=list(MODEL_VARIANTS))
    add_shape_arguments(bench)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--device", type=device_argument, default=torch.device("cpu"), help="cpu, cuda or cuda:N")
    bench.add_argument("--backend", choices=BACKENDS, default="auto", help="window_attention backend (auto: flex on CUDA, else blocked)")
    bench.add_argument("--dtype", choices=DTYPES, default="float32", help="autocast dtype of the forward (float32: no autocast)")
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--output", type=Path, default=Path("bench_results/model.json"))
    add_allocator_flag(bench)
    bench.add_argument("--tiny", action="store_true", help="smoke run: lengths 64 128, 4 layers, d_model 32, window 16")
    bench.set_defaults(run=run)


def add_shape_arguments(bench, layers=8):
    """The shape of the MODEL_VARIANTS models (shared by the model, eval and generate benchmarks)."""
    bench.add_argument("--layers", type=int, default=layers, help="a multiple of 4: mswa has 4 layer groups")
    bench.add_argument("--d-model", type=int, default=256)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--window", type=int, default=128)


def run(args):
    """Training tokens/s per model and length; the models of one length are timed interleaved."""
    if args.tiny:
        args.lengths, args.layers, args.d_model, args.heads, args.window, args.repeats = [64, 128], 4, 32, 4, 16, 2
    backend = resolve_backend(args.backend, args.device)
    if backend == "flex" and args.device.type == "cpu":
        raise SystemExit(
            "--backend flex cannot train on CPU (torch compiles only its forward there); use --backend blocked or auto on CPU."
        )
    set_threads(args.threads)
    if not args.glibc_default:
        reuse_freed_memory()
    print(f"device {args.device}, backend {args.backend} ({backend}), {args.dtype}", flush=True)
    rows, product, product_flops = [], *matmul_step(args.device)
    for n in args.lengths:
        steps = {name: _training_step(name, n, args) for name in args.models}
        flops = {name: training_flops_per_token(variant_model(name, n, args).cfg, n) for name in args.models}
        # the matmul that rates MFU goes round-robin with the models: a shared machine's drift hits both
        *timings, (matmul_s, _) = interleaved_medians([*steps.values(), product], args.device, args.repeats)
        peak = product_flops / matmul_s
        for (name, step), (seconds, samples) in zip(steps.items(), timings):
            rows.append(
                {
                    "model": name,
                    "n": n,
                    "tokens_per_s": n / seconds,
                    "model_flops_per_token": flops[name],
                    "mfu": n / seconds * flops[name] / peak,
                    "matmul_flops_per_s": peak,
                    "step_s": seconds,
                    "runs": len(samples),
                    "peak_mb": peak_memory_mb(step, args.device),
                }
            )
            print(f"{name:<22} N={n:>6} {n / seconds:>10.0f} tok/s {rows[-1]['mfu']:>6.1%} MFU {rows[-1]['peak_mb']:>9.1f} MB", flush=True)
    rows.sort(key=lambda row: args.models.index(row["model"]))  # stable: by model, then length
    _add_model_ratios(rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "output")} | {"resolved_backend": backend}
    result = {"rows": rows, "settings": settings, "rate_dtype": str(rate_dtype(args.device))}
    write_atomic(args.output, json.dumps(result, indent=2, default=str))
    rates = ", ".join(f"{row['matmul_flops_per_s'] / 1e9:.1f}" for row in rows if row["model"] == args.models[0])
    print(f"\nMFU: model FLOPs per token (mswa.flops, window-aware) x tokens/s over the {result['rate_dtype']} matmul rate")
    print(f"timed among each length's steps ({rates} GFLOP/s)")
    print(f"{'model':<22} {'N':>6} {'tok/s':>10} {'MFU':>6} {'x full':>7} {'/swa':>6} {'peak MB':>9} {'MB/1k tok':>9}")
    for row in rows:
        print(
            f"{row['model']:<22} {row['n']:>6} {row['tokens_per_s']:>10.0f} {row['mfu']:>6.1%} {row['x_full'] or float('nan'):>7.2f} "
            f"{row['vs_swa'] or float('nan'):>6.2f} {row['peak_mb']:>9.1f} {1024 * row['peak_mb'] / row['n']:>9.1f}"
        )
    print(f"wrote {args.output}")


def variant_model(name, n, args, backend="blocked"):
    """The randomly initialised model `name` of MODEL_VARIANTS at the benchmark's shape, for n tokens."""
    from mswa.model import LanguageModel, ModelConfig

    schedule_name, mixer = MODEL_VARIANTS[name]
    schedule = make_schedule(schedule_name, w=args.window, n_layer=args.layers, n_head=args.heads)
    windows = None if schedule.is_full else schedule.as_lists()
    config = ModelConfig(
        n_layer=args.layers, n_head=args.heads, d_model=args.d_model, max_seq_len=n, windows=windows, attn_backend=backend, **mixer
    )
    return LanguageModel(config)


def _training_step(name, n, args):
    """One training step (forward, backward, AdamW) of model `name` on one sequence of n tokens."""
    model = variant_model(name, n, args, args.backend).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (1, n), device=args.device)
    dtype = getattr(torch, args.dtype)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model.token_nll(tokens, tokens).mean()
        loss.backward()
        optimizer.step()

    return step


def _add_model_ratios(rows):
    """tokens/s relative to full attention and to SWA at the same length."""
    by_key = {(row["model"], row["n"]): row for row in rows}
    for row in rows:
        for key, reference in (("x_full", "full"), ("vs_swa", "swa")):
            other = by_key.get((reference, row["n"]))
            row[key] = row["tokens_per_s"] / other["tokens_per_s"] if other else None
