import json

import pytest

from helpers.runs import run_bench
from mswa.bench.cli import main


def test_model_benchmark_runs_at_tiny_size_and_writes_json(tmp_path):
    out = tmp_path / "model.json"
    rows, stdout = run_bench("model", out, "--models", "full", "swa", "mswa_linear")
    assert [(r["model"], r["n"]) for r in rows] == [(m, n) for m in ("full", "swa", "mswa_linear") for n in (64, 128)]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_mb"] >= 0
        assert row["tokens_per_s"] == row["n"] / row["step_s"]
        # MFU: the model's FLOPs per token (checked in tests/test_flops.py) at these tokens/s, over the measured rate
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["model_flops_per_token"] / row["matmul_flops_per_s"])
    full = {r["n"]: r["tokens_per_s"] for r in rows if r["model"] == "full"}
    assert all(r["x_full"] == r["tokens_per_s"] / full[r["n"]] for r in rows)
    assert "x full" in stdout and "MFU" in stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--backend", "flex"],
            "--backend flex cannot train on CPU (torch compiles only its forward there); use --backend blocked or auto on CPU.",
        ),
        (["--device", "gpu"], "argument --device: 'gpu' is not a torch device; use cpu, cuda or cuda:N"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ],
)
def test_model_benchmark_refuses_bad_settings_in_one_sentence_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "model.json"
    with pytest.raises(SystemExit) as stopped:
        main(["model", "--tiny", "--glibc-default", *flags, "--output", str(out)])
    assert message in str(stopped.value.code) + capsys.readouterr().err
    assert not out.exists()


def test_model_benchmark_records_device_backend_and_dtype(tmp_path):
    out = tmp_path / "model.json"
    # in this process: --glibc-default keeps its allocator settings as they are
    main(
        [
            "model",
            "--tiny",
            "--glibc-default",
            "--models",
            "swa",
            "--device",
            "cpu",
            "--backend",
            "auto",
            "--dtype",
            "bfloat16",
            "--output",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert [(r["model"], r["n"]) for r in result["rows"]] == [("swa", 64), ("swa", 128)]
    settings = result["settings"]
    assert (settings["device"], settings["backend"], settings["resolved_backend"], settings["dtype"]) == (
        "cpu",
        "auto",
        "blocked",
        "bfloat16",
    )
