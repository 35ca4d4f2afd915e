"""`python -m mswa.bench attention` runs end to end at tiny sizes and reports consistent figures."""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mswa.bench.timing import interleaved_medians

ROOT = Path(__file__).resolve().parents[1]


def run_bench(tmp_path, *extra):
    output = tmp_path / "attention.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mswa.bench", "attention", "--tiny", "--output", str(output), *extra]
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(output.read_text()), done.stdout


def useful_pairs(windows, n):
    return sum(min(i + 1, n if w is None else w) for w in windows for i in range(n))


def test_tiny_bench_writes_consistent_json_and_table(tmp_path):
    result, table = run_bench(tmp_path, "--backends", "blocked", "dense", "causal")
    config = result["config"]
    assert config["lengths"] == [64, 96] and config["layers"]["uniform"] == [[16] * 8]
    assert config["layers"]["mswa_h"] == [[4, 4, 8, 8, 16, 16, 32, 32]]
    # the mswa schedule's four layer groups: its mean window 0.88 w needs them all
    assert config["layers"]["mswa"] == [[w * s for w in (1, 1, 2, 2, 4, 4, 8, 8)] for s in (1, 2, 4, 8)]
    assert config["mean_window_over_w"] == pytest.approx({"mswa": (15 / 16) ** 2, "mswa_h": 15 / 16, "uniform": 1.0})
    assert result["matmul_gflops"] > 0
    cases = {(r["layer"], r["backend"], r["n"]) for r in result["rows"]}
    assert cases == {
        (layer, backend, n) for n in (64, 96) for layer in ("mswa", "mswa_h", "uniform") for backend in ("blocked", "dense")
    } | {("full", "causal", 64), ("full", "causal", 96)}
    stacks = {**config["layers"], "full": [[None] * 8]}
    for row in result["rows"]:
        assert row["mode"] == "fwd+bwd" and row["time_s"] > 0 and row["runs"] == 2 and row["peak_mb"] >= 0
        stack = stacks[row["layer"]]
        assert row["layers"] == len(stack)
        # per layer: time and useful work are the stack's means
        assert row["time_s"] == pytest.approx(statistics.median(row["samples_s"]))
        flops = sum(useful_pairs(windows, row["n"]) for windows in stack) / len(stack) * 4 * config["head_dim"] * 3
        assert row["useful_gflops"] == pytest.approx(flops / row["time_s"] / 1e9)
        # %matmul is against the matmul rate timed among this length's windowed kernels
        assert row["matmul_gflops"] > 0 and row["pct_matmul"] == pytest.approx(100 * row["useful_gflops"] / row["matmul_gflops"])
        assert f"{row['layer']:<8} {row['n']:>6} {row['backend']:<8}" in table
    comparison = {(c["layer"], c["n"]): c for c in result["comparisons"]}
    assert comparison[("uniform", 96)]["time_vs_uniform"] == 1.0
    uniform = next(r for r in result["rows"] if r["layer"] == "uniform" and r["backend"] == "blocked" and r["n"] == 96)
    for layer in ("mswa", "mswa_h"):
        row = next(r for r in result["rows"] if r["layer"] == layer and r["backend"] == "blocked" and r["n"] == 96)
        paired = [a / b for a, b in zip(row["samples_s"], uniform["samples_s"], strict=True)]  # same rounds
        assert comparison[(layer, 96)]["time_vs_uniform"] == pytest.approx(statistics.median(paired))
    assert len({r["matmul_gflops"] for r in result["rows"] if r["n"] == 96}) == 1
    assert comparison[("mswa", 64)]["speedup_vs_dense"] > 0 and comparison[("mswa", 96)]["speedup_vs_causal"] > 0
    assert "x dense" in table and "GFLOP/s" in table


def test_threads_are_compared_in_the_same_rounds_beside_a_busy_process(tmp_path):
    result, table = run_bench(tmp_path, "--backends", "blocked", "--threads", "1", "2", "--background-load")
    assert result["machine"]["threads"] == [1, 2] and result["machine"]["background_load"] == 1
    rows = {(r["layer"], r["n"], r["threads"]): r for r in result["rows"]}
    assert set(rows) == {(layer, n, t) for layer in ("mswa", "mswa_h", "uniform") for n in (64, 96) for t in (1, 2)}
    for c in result["comparisons"]:
        one, this = rows[(c["layer"], c["n"], 1)], rows[(c["layer"], c["n"], c["threads"])]
        paired = [a / b for a, b in zip(this["samples_s"], one["samples_s"], strict=True)]
        assert c["time_vs_one_thread"] == pytest.approx(statistics.median(paired))
        # each thread count has its own matmul rate, timed in the same rounds: the machine's own scaling beside
        matmul = [a / b for a, b in zip(this["matmul_samples_s"], one["matmul_samples_s"], strict=True)]
        assert c["matmul_vs_one_thread"] == pytest.approx(statistics.median(matmul))
        assert this["matmul_gflops"] == pytest.approx(2 * 2048**3 / statistics.median(this["matmul_samples_s"]) / 1e9)
    assert "1 busy process(es) beside the timing" in table and "matmul /1" in table


def test_dense_is_skipped_with_a_note_when_its_masks_do_not_fit(tmp_path):
    result, table = run_bench(tmp_path, "--backends", "blocked", "dense", "--dense-max-gb", "0")
    dense = [r for r in result["rows"] if r["backend"] == "dense"]
    assert dense and all(r["time_s"] is None and "skipped" in r["note"] for r in dense)
    assert all(c["speedup_vs_dense"] is None for c in result["comparisons"])
    assert "skipped" in table


@pytest.mark.slow  # compiles flex on CPU
def test_tiny_bench_runs_flex_forward_only_on_cpu(tmp_path):
    result, _ = run_bench(tmp_path, "--backends", "flex")
    assert {r["mode"] for r in result["rows"]} == {"fwd only"}
    assert all(r["time_s"] > 0 for r in result["rows"])


def test_interleaved_medians_give_every_step_the_same_rounds():
    """Fast steps repeat to fill min_time_s, all alike (fair round-robin); slow ones are cut to the budget."""
    calls = {"fast": 0, "slow": 0}

    def step(name, seconds):
        def run():
            calls[name] += 1
            time.sleep(seconds)

        return run

    cpu = torch.device("cpu")
    results = interleaved_medians([step("fast", 0.001), step("slow", 0.004)], cpu, 3, min_time_s=0.1, warmups=[0.001, 0.004])
    runs = [len(samples) for _, samples in results]
    assert runs == [calls["fast"], calls["slow"]] and runs[0] == runs[1]
    assert 12 <= runs[0] <= 20  # rounds of ~5 ms (sleep overshoots) to fill 0.1 s
    assert results[0][0] < results[1][0]
    calls.update(fast=0, slow=0)
    results = interleaved_medians([step("fast", 0.001), step("slow", 0.004)], cpu, 5, budget_s=0.012, warmups=[0.001, 0.004])
    assert [len(samples) for _, samples in results] == [5, 3]
