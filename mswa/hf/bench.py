"""Peak memory and time of one forward of a tiny Hugging Face Llama, unpatched vs window-patched,
over sequence lengths: `python -m mswa.hf.bench` prints a table.

Rows: transformers' eager attention (materialises the N x N scores: quadratic memory), its SDPA
(fused causal kernel), and the model patched with uniform windows through `window_attention`
(blocked: O(N * W); dense: the O(N^2) reference). The growth column is peak memory relative to the
shortest length: x4 from 2k to 8k is linear, x16 quadratic.
"""

from __future__ import annotations

import argparse
import time

import torch

from mswa.bench import _peak_memory_mb
from mswa.hf.patch import apply_window_attention
from mswa.hf.tiny import tiny_model

CASES = ("eager", "sdpa", "mswa-blocked", "mswa-dense")


def build(case: str, window: int, n_head: int, n_layer: int, hidden: int, device):
    """The tiny model for one table row: unpatched with HF `eager`/`sdpa`, or patched with `window`."""
    attention, _, backend = case.partition("-")
    model = tiny_model("llama", attn_implementation=attention if not backend else "sdpa", vocab_size=512,
                       n_layer=n_layer, n_head=n_head, n_kv_head=n_head // 2, hidden=hidden).to(device)
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up
    peak = min(_peak_memory_mb(step, device) for _ in range(repeats))
    return peak, min(_seconds(step) for _ in range(repeats))


def _seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m mswa.hf.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="measurements per row; the least is shown")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"tiny Llama: {args.layers} layers, {args.heads} heads ({args.heads // 2} kv), hidden {args.hidden}; "
          f"window {args.window}; batch 1; no-grad forward on {device}")
    print(f"{'case':<14} {'N':>6} {'peak MB':>9} {'growth':>7} {'time ms':>9}")
    rows = []
    for case in args.cases:
        model = build(case, args.window, args.heads, args.layers, args.hidden, device)
        first = None
        for n in sorted(args.lengths):
            peak, seconds = measure(model, n, device, args.repeats)
            first = first or (n, peak)
            growth = peak / first[1] if first[1] > 0 else float("nan")
            rows.append({"case": case, "n": n, "peak_mb": peak, "time_s": seconds})
            print(f"{case:<14} {n:>6} {peak:>9.1f} {growth:>6.1f}x {seconds * 1e3:>9.1f}")
        del model
    return rows


if __name__ == "__main__":
    main()
