"""Searched windows: profile a trained run head by head, then choose every head's window under a budget.

    python -m mswa.allocate RUN_DIR --budget mswa|0.85 [--candidates 16,32,64,128,256] [--batches 8] [--out FILE]

Profiling: for every (layer, head) and every candidate window, the loss on a fixed set of validation batches
when only that head is restricted to that window (every other head keeps the run's own window); exact forward
passes of the trained model. The source run's windows must be at least the largest candidate (full attention,
or SWA at a large window), so that every restriction is a restriction.

Choice: one window per head minimising the summed loss increase subject to the budget, a multiple-choice
knapsack solved exactly by dynamic programming over the budget in attended pairs (``choose_windows``). The
budget means what it means everywhere in the project: attended query-key pairs at the run's ``seq_len``,
relative to SWA at the base window w (``mswa.windows.WindowSchedule.budget``).

The result is a ``custom`` window schedule named by its file, by default ``searched_<corpus>`` in
``conf/window_schedule/``, so that one override trains it: ``window_schedule=searched_<corpus>``. Its header
records where it came from (run, sha256 of its results.json, budget, candidates, batches, time, predicted loss
increase) and its budget line.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mswa.atomic import write_atomic
from mswa.data.batches import EvalChunks
from mswa.folders import check_file
from mswa.windows import WindowSchedule, attended_pairs, corpus_label, custom_schedule_yaml, mswa_budget

CONF_SCHEDULES = Path(__file__).resolve().parent.parent / "conf" / "window_schedule"
DEFAULT_RATIOS = (0.25, 0.5, 1, 2, 4)  # candidates w/4 ... 4w


class AllocationError(ValueError):
    """Input the search cannot work with; the message is one sentence with the fix."""


# ----------------------------------------------------------------------------- the exact choice


def choose_windows(options: Sequence[Sequence[tuple[int, float]]], capacity: int) -> tuple[tuple[int, ...], int, float]:
    """One option per item, total cost <= ``capacity``, least total loss: ``(picks, cost, loss)``.

    ``options[i]`` lists item i's ``(cost, loss)`` pairs (integer costs: attended pairs). Dynamic programming
    over the budget: after each item, every reachable total cost keeps the least loss that reaches it (and the
    picks that do). A total that costs more than another and loses no less is dropped, since any completion of
    it completes the cheaper one too; so the states stay few and the answer stays exact. Ties: least cost."""
    states: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for item in options:
        reached: dict[int, tuple[float, tuple[int, ...]]] = {}
        for cost, (loss, picks) in states.items():
            for pick, (extra_cost, extra_loss) in enumerate(item):
                total = cost + extra_cost
                if total <= capacity and (total not in reached or loss + extra_loss < reached[total][0]):
                    reached[total] = (loss + extra_loss, (*picks, pick))
        states, best = {}, math.inf
        for total in sorted(reached):
            if reached[total][0] < best:
                states[total], best = reached[total], reached[total][0]
        if not states:
            raise AllocationError(f"no choice of windows fits {capacity:,} attended pairs; raise --budget or add smaller --candidates")
    cost = min(states, key=lambda total: (states[total][0], total))
    return states[cost][1], cost, states[cost][0]


# ----------------------------------------------------------------------------- profiling


def profile_heads(model, batches: list, candidates: Sequence[int], show: bool = True) -> tuple[float, list[list[list[float]]]]:
    """(baseline loss, loss[layer][head][candidate]) of ``model`` on ``batches`` with one head restricted at a time."""
    mixers = [block.mixer for block in model.blocks]
    passes = 1 + sum(len(m.windows) for m in mixers) * len(candidates)
    start = time.perf_counter()
    with tqdm(total=passes, desc="profiling heads", unit="pass", disable=None if show else True) as bar:  # off a terminal: lines
        baseline = _loss(model, batches)
        bar.update()
        table = []
        for layer, mixer in enumerate(mixers):
            own, rows = list(mixer.windows), []
            for head in range(len(own)):
                row = []
                for window in candidates:
                    mixer.windows = [window if h == head else w for h, w in enumerate(own)]
                    row.append(_loss(model, batches))
                    bar.update()
                rows.append(row)
            mixer.windows = own
            table.append(rows)
            if show and bar.disable:  # a log file gets one plain line per layer instead of a bar's redraws
                done = 1 + sum(len(row) for rows in table for row in rows)  # the baseline and every loss measured
                seconds = time.perf_counter() - start
                left = seconds / done * (passes - done)
                shown = f"profiled layer {layer + 1}/{len(mixers)}: {done}/{passes} passes, {seconds:.0f} s in, ~{left:.0f} s left"
                print(shown, flush=True)
    return baseline, table


@torch.no_grad()
def _loss(model, batches: list) -> float:
    """Mean NLL per scored target over ``batches`` (sums in float64)."""
    total, count = 0.0, 0
    for x, y in batches:
        nll = model.token_nll(x, y)
        scored = y != -100
        total += nll[scored].double().sum().item()
        count += int(scored.sum())
    return total / count


def validation_batches(corpus, seq_len: int, batch_size: int, n_batches: int) -> list:
    """The first ``n_batches`` batches of ``seq_len`` chunks of the validation split (each target scored once)."""
    chunks = EvalChunks(corpus.splits["valid"], seq_len)
    items = [chunks[i][:2] for i in range(min(len(chunks), n_batches * batch_size))]
    return [
        tuple(torch.stack([torch.as_tensor(item[part]) for item in items[i : i + batch_size]]) for part in (0, 1))
        for i in range(0, len(items), batch_size)
    ]


# ----------------------------------------------------------------------------- the command


def parse_candidates(text: str | None, w: int) -> list[int]:
    """``16,32,64`` -> [16, 32, 64] (sorted, distinct); None: w/4, w/2, w, 2w, 4w."""
    if text is None:
        return sorted({max(1, round(w * r)) for r in DEFAULT_RATIOS})
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d+", p) and int(p) > 0 for p in parts):
        raise AllocationError(f"--candidates {text!r} must be positive integers separated by commas, e.g. 16,32,64,128,256")
    return sorted({int(p) for p in parts})


def check_source_windows(windows: list[list], largest: int) -> None:
    narrow = [w for layer in windows for w in layer if w is not None and w < largest]
    if narrow:
        raise AllocationError(
            f"the run's windows (smallest {min(narrow)}) are smaller than the largest candidate {largest}, so restricting a head "
            "to it would widen it; profile a run with full attention or SWA at a window >= the largest candidate"
        )


def parse_budget(text: str, w: int, windows: list[list], seq_len: int) -> float:
    """A budget as given: a number, or ``mswa`` (mswa's attended pairs relative to SWA at w, at this shape and length)."""
    if text == "mswa":
        return mswa_budget(w, len(windows), len(windows[0]), seq_len)
    try:
        budget = float(text)
    except ValueError:
        budget = math.nan
    if not (math.isfinite(budget) and budget > 0):
        raise AllocationError(f"--budget {text} must be a number > 0 (attended pairs relative to SWA at w) or mswa (mswa's budget)")
    return budget


def allocate(run_dir: str, budget: str, candidates: str | None, n_batches: int, out: str | None, checkpoint: str = "best") -> Path:
    """Profile ``run_dir``, choose the windows, write the schedule; returns its path. Nothing is written on a refusal."""
    from mswa.evaluate import checkpoint_file, load_run, run_config

    if n_batches < 1:
        raise AllocationError(f"--batches {n_batches} must be an integer >= 1")
    cfg = run_config(run_dir)
    checkpoint_file(run_dir, checkpoint, "--checkpoint ")
    if cfg["model"].get("mixer", "attention") != "attention" or "pretrained" in cfg["model"]:
        raise AllocationError(f"{run_dir} is not a softmax-attention model of mswa.model; profile a run of model=full or model=swa")
    w, seq_len = cfg["window"], cfg["seq_len"]
    chosen = parse_candidates(candidates, w)
    results = Path(run_dir) / "results.json"
    if not results.is_file():
        raise AllocationError(f"{run_dir} has no results.json (the run did not finish); profile a finished run")
    windows = _run_windows(cfg)
    budget = parse_budget(str(budget), w, windows, seq_len)
    check_source_windows(windows, chosen[-1])
    n_heads = sum(len(layer) for layer in windows)
    swa_pairs = n_heads * attended_pairs(w, seq_len)
    possible = (n_heads * attended_pairs(chosen[0], seq_len) / swa_pairs, n_heads * attended_pairs(chosen[-1], seq_len) / swa_pairs)
    if not possible[0] <= budget <= possible[1] + 1e-12:
        raise AllocationError(
            f"--budget {budget} is outside what the candidates {chosen} allow at seq_len={seq_len}, w={w}: "
            f"{possible[0]:.4f} (all at {chosen[0]}) to {possible[1]:.4f} (all at {chosen[-1]}); pick a budget in that range"
        )
    _, task, corpus = load_run(run_dir, checkpoint, "--checkpoint ")
    target = Path(out) if out else CONF_SCHEDULES / f"searched_{corpus_label(corpus.name)}.yaml"
    name = target.stem  # a schedule is named by its file: window_schedule=<stem> trains it
    check_file("--out", target)
    batches = validation_batches(corpus, seq_len, cfg["data"]["eval_batch_size"], n_batches)
    started = time.time()
    baseline, losses = profile_heads(task.model, batches, chosen)
    seconds = time.time() - started
    options = [[(attended_pairs(c, seq_len), loss - baseline) for c, loss in zip(chosen, head)] for layer in losses for head in layer]
    picks, _, increase = choose_windows(options, math.floor(budget * swa_pairs * (1 + 1e-12)))
    n_head = len(windows[0])
    table = [[chosen[picks[layer * n_head + head]] for head in range(n_head)] for layer in range(len(windows))]
    schedule = WindowSchedule(name, w, tuple(tuple(row) for row in table))
    targets = sum(int((y != -100).sum()) for _, y in batches)
    header = [
        f"{name}: windows searched from data by python -m mswa.allocate",
        f"source run: {Path(run_dir).resolve()}",
        f"source results.json sha256: {hashlib.sha256(results.read_bytes()).hexdigest()}",
        f"budget: {budget} x SWA(w={w}) in attended pairs at seq_len={seq_len} (the project's budget)",
        f"candidates: {chosen}",
        f"profiled on {len(batches)} validation batch(es) ({targets:,} targets, chunks of {seq_len} tokens): "
        f"{1 + n_heads * len(chosen)} exact forward passes over them in {seconds:.1f} s",
        f"source validation loss on them: {baseline:.6f} nats/target",
        f"predicted loss increase (sum of the chosen heads' single-head increases): {increase:+.6f} nats/target",
        "chosen exactly: multiple-choice knapsack by dynamic programming over the budget in attended pairs",
        *schedule.describe(seq_len).splitlines()[-2:],
        f"budget met: {schedule.budget(seq_len)['pairs_vs_swa']:.6f} <= {budget}",
    ]
    write_atomic(target, custom_schedule_yaml(name, table, header))
    print("\n".join(["", schedule.describe(seq_len), *header[5:8], f"written: {target}", f"train it: window_schedule={target.stem}"]))
    return target


def _run_windows(cfg: dict) -> list[list]:
    """The run's windows, as its schedule builds them (no model is loaded for this)."""
    from mswa.config import parse_config
    from mswa.factory import build_schedule

    return build_schedule(parse_config(cfg)).as_lists()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mswa.allocate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run of train.py whose windows are at least the largest candidate")
    parser.add_argument("--budget", required=True, help="attended pairs relative to SWA at w (e.g. 0.85), or mswa: mswa's own")
    parser.add_argument("--candidates", default=None, help="windows to choose from, comma-separated (default w/4,w/2,w,2w,4w)")
    parser.add_argument("--batches", type=int, default=8, help="validation batches (of the run's eval_batch_size) to profile on")
    parser.add_argument(
        "--out",
        default=None,
        help="the schedule's file, which names it (default conf/window_schedule/searched_<corpus>.yaml)",
    )
    parser.add_argument("--checkpoint", default="best", help="best, last or the path of a .ckpt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        allocate(args.run_dir, args.budget, args.candidates, args.batches, args.out, args.checkpoint)
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
