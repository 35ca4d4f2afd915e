"""Peak memory and time of one forward of a tiny Hugging Face Llama, unpatched vs window-patched,
over sequence lengths: `python -m mswa.bench hf` prints a table and writes JSON.

Rows: transformers' eager attention (materialises the N x N scores: quadratic memory), its SDPA
(fused causal kernel), and the model patched with uniform windows through `window_attention`
(blocked: O(N * W); dense: the O(N^2) reference). The growth column is peak memory relative to the
shortest length: x4 from 2k to 8k is linear, x16 quadratic.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mswa.atomic import write_atomic
from mswa.bench.timing import device_argument, peak_memory_mb, step_seconds

CASES = ("eager", "sdpa", "mswa-blocked", "mswa-dense")


def add_command(commands):
    bench = commands.add_parser("hf", help="peak memory and time of a tiny Hugging Face Llama, patched or not, vs length")
    bench.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    bench.add_argument("--window", type=int, default=256)
    bench.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    bench.add_argument("--heads", type=int, default=4)
    bench.add_argument("--layers", type=int, default=2)
    bench.add_argument("--hidden", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=2, help="measurements per row; the least is shown")
    bench.add_argument("--device", type=device_argument, default=torch.device("cpu"), help="cpu, cuda or cuda:N")
    bench.add_argument("--output", type=Path, default=Path("bench_results/hf.json"))
    bench.set_defaults(run=run)


def run(args) -> list[dict]:
    device = args.device
    print(
        f"tiny Llama: {args.layers} layers, {args.heads} heads ({args.heads // 2} kv), hidden {args.hidden}; "
        f"window {args.window}; batch 1; no-grad forward on {device}"
    )
    print(f"{'case':<14} {'N':>6} {'peak MB':>9} {'growth':>7} {'time ms':>9}")
    rows = []
    for case in args.cases:
        model = build(case, args.window, args.heads, args.layers, args.hidden, device)
        first = None
        for n in sorted(args.lengths):
            peak, time_s = measure(model, n, device, args.repeats)
            first = first or (n, peak)
            growth = peak / first[1] if first[1] > 0 else float("nan")
            rows.append({"case": case, "n": n, "peak_mb": peak, "time_s": time_s})
            print(f"{case:<14} {n:>6} {peak:>9.1f} {growth:>6.1f}x {time_s * 1e3:>9.1f}")
        del model
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "output")}
    write_atomic(args.output, json.dumps({"rows": rows, "settings": settings}, indent=2, default=str))
    print(f"wrote {args.output}")
    return rows


def build(case: str, window: int, n_head: int, n_layer: int, hidden: int, device):
    """The tiny model for one table row: unpatched with HF `eager`/`sdpa`, or patched with `window`."""
    from mswa.hf.patch import apply_window_attention  # transformers loads only for this benchmark
    from mswa.hf.tiny import tiny_model

    attention, _, backend = case.partition("-")
    model = tiny_model(
        "llama",
        attn_implementation=attention if not backend else "sdpa",
        vocab_size=512,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_head // 2,
        hidden=hidden,
    ).to(device)
    if backend:
        apply_window_attention(model, window, backend=backend)
    return model


def measure(model, n: int, device, repeats: int) -> tuple[float, float]:
    """(peak MB above the memory in use before the call, seconds) of one no-grad forward; the least
    of `repeats` measurements each, as allocator noise only ever adds."""
    ids = torch.randint(3, 512, (1, n), device=device)

    def step():
        with torch.no_grad():
            model(ids, use_cache=False)

    step()  # warm-up
    peak = min(peak_memory_mb(step, device) for _ in range(repeats))
    return peak, min(step_seconds(step, device) for _ in range(repeats))
