"""`python -m mswa.bench eval`: evaluation targets/s at stride = seq_len / 4 against stride = seq_len.

Full evaluation passes (the project's EvalChunks and token_nll, no gradients) over one random split,
for the full, swa and mswa models of the model benchmark; per model the two strides are timed
interleaved, so their ratio (the slowdown) is fair on a drifting machine.
"""

import json
from pathlib import Path

import torch

from mswa.atomic import write_atomic
from mswa.bench.model import add_shape_arguments, variant_model
from mswa.bench.timing import interleaved_medians, set_threads

EVAL_MODELS = ("full", "swa", "mswa")


def add_command(commands):
    bench = commands.add_parser("eval", help="evaluation targets/s at stride = seq_len / 4 vs stride = seq_len")
    bench.add_argument("--seq-len", type=int, default=512)
    bench.add_argument("--targets", type=int, default=16384, help="length of the (random) split evaluated")
    bench.add_argument("--models", nargs="+", choices=EVAL_MODELS, default=list(EVAL_MODELS))
    add_shape_arguments(bench, layers=4)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--output", type=Path, default=Path("bench_results/eval.json"))
    bench.add_argument("--tiny", action="store_true", help="smoke run: seq_len 64, 1024 targets, d_model 32, window 16")
    bench.set_defaults(run=run)


def run(args):
    """Targets/s of each model at both strides, which are timed interleaved; the table, and the JSON."""
    if args.tiny:
        args.seq_len, args.targets, args.d_model, args.heads, args.window, args.repeats = 64, 1024, 32, 4, 16, 2
    set_threads(args.threads)
    device, rows = torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    tokens = torch.randint(0, 256, (args.targets + 1,)).numpy()
    strides = (args.seq_len, max(1, args.seq_len // 4))
    for name in args.models:
        model = variant_model(name, args.seq_len, args).eval().to(device)
        passes = [_eval_pass(model, tokens, args.seq_len, stride, args.batch_size, device) for stride in strides]
        timings = interleaved_medians([step for step, _ in passes], device, args.repeats)
        for stride, (_, chunks), (seconds, samples) in zip(strides, passes, timings):
            rows.append(
                {
                    "model": name,
                    "seq_len": args.seq_len,
                    "stride": stride,
                    "targets_per_s": chunks.n_targets / seconds,
                    "forward_tokens_per_target": chunks.forward_tokens_per_target,
                    "pass_s": seconds,
                    "runs": len(samples),
                }
            )
        rows[-1]["slowdown"] = rows[-2]["targets_per_s"] / rows[-1]["targets_per_s"]
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "output")} | {"device": str(device)}
    write_atomic(args.output, json.dumps({"rows": rows, "settings": settings}, indent=2, default=str))
    print(f"{'model':<6} {'seq_len':>7} {'stride':>6} {'targets/s':>10} {'fwd tok/target':>14} {'slowdown':>8}")
    for row in rows:
        slowdown = f"{row['slowdown']:.2f}x" if "slowdown" in row else ""
        print(
            f"{row['model']:<6} {row['seq_len']:>7} {row['stride']:>6} {row['targets_per_s']:>10.0f} "
            f"{row['forward_tokens_per_target']:>14.2f} {slowdown:>8}"
        )
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
