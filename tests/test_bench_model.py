import json
import subprocess
import sys

from helpers.runs import REPO


def test_model_benchmark_runs_at_tiny_size_and_writes_json(tmp_path):
    out = tmp_path / "model.json"
    proc = subprocess.run([sys.executable, "-m", "mswa.bench", "model", "--tiny", "--models", "full", "swa", "mswa_linear",
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["n"]) for r in rows] == [(m, n) for m in ("full", "swa", "mswa_linear") for n in (64, 128)]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["peak_mb"] >= 0
        assert row["tokens_per_s"] == row["n"] / row["step_s"]
    full = {r["n"]: r["tokens_per_s"] for r in rows if r["model"] == "full"}
    assert all(r["x_full"] == r["tokens_per_s"] / full[r["n"]] for r in rows)
    assert "x full" in proc.stdout
