import pytest

from helpers.runs import run_bench


def test_eval_benchmark_times_both_strides_per_model_and_writes_json(tmp_path):
    out = tmp_path / "eval.json"
    rows, stdout = run_bench("eval", out, "--models", "full", "mswa")
    assert [(r["model"], r["stride"]) for r in rows] == [("full", 64), ("full", 16), ("mswa", 64), ("mswa", 16)]
    for plain, sliding in (rows[:2], rows[2:]):
        assert plain["forward_tokens_per_target"] == pytest.approx(1.0, abs=0.07)  # 1024 targets in 16 chunks of 64
        assert sliding["forward_tokens_per_target"] == pytest.approx(61 * 64 / 1024)
        assert sliding["slowdown"] == plain["targets_per_s"] / sliding["targets_per_s"]
    assert "slowdown" in stdout
