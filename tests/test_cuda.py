"""The GPU paths, against the dense reference: flex forward+backward, blocked, `auto` -> flex, bf16.
In float64, flex runs FlexAttention's unfused implementation (its Triton kernels accumulate in
float32) and `auto` picks blocked.

Skipped without CUDA; on a GPU machine `python -m pytest tests/test_cuda.py` is the whole check.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.attention import CASES, assert_case_matches_dense, fixed_grad_out, make_inputs
from mswa.attention import resolve_backend, window_attention
from mswa.attention.dense import dense_window_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[1]
BF16_RELATIVE_ERROR = 1e-2  # bf16 keeps 8 bits of mantissa: 4e-3 relative per rounding


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round fp32 products to 10 bits and miss the 1e-5 tolerance by design, not by bug."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["flex", "blocked", "auto"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cuda_backend_matches_dense(case, backend, dtype):
    assert_case_matches_dense(case, backend, dtype, device="cuda")


def test_auto_is_flex_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) == "flex"


@pytest.mark.parametrize("backend", ["flex", "blocked"])
def test_bf16_trains_close_to_fp32_dense(backend):
    """bf16 inputs: bf16 outputs and gradients within bf16 rounding of fp32 dense on the same values."""
    inputs = make_inputs(2, 8, 2, 700, 64, torch.bfloat16, device="cuda")
    windows = [16, 16, 64, 64, 200, 200, None, 5]
    out = window_attention(*inputs, windows, backend=backend)
    grad_out = fixed_grad_out(out)
    got = (out, *torch.autograd.grad(out, inputs, grad_out))
    reference_inputs = [x.detach().float().requires_grad_() for x in inputs]
    reference = dense_window_attention(*reference_inputs, windows)
    want = (reference, *torch.autograd.grad(reference, reference_inputs, grad_out.float()))
    for name, a, b in zip(("out", "grad q", "grad k", "grad v"), got, want, strict=True):
        assert a.dtype == torch.bfloat16
        error = (a.float() - b).norm() / b.norm()
        assert error < BF16_RELATIVE_ERROR, f"{name}: relative error {error:.2e}"


def test_attention_bench_runs_on_cuda(tmp_path):
    output = tmp_path / "attention.json"
    command = [sys.executable, "-m", "mswa.bench", "attention", "--tiny", "--device", "cuda", "--output", str(output)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(output.read_text())["rows"]
    assert {r["backend"] for r in rows if r["time_s"]} == {"blocked", "dense", "flex", "causal"}
    assert all(r["mode"] == "fwd+bwd" for r in rows)  # flex trains on CUDA


def test_model_bench_trains_on_cuda_in_bf16(tmp_path):
    output = tmp_path / "model.json"
    command = [
        sys.executable,
        "-m",
        "mswa.bench",
        "model",
        "--tiny",
        "--models",
        "full",
        "swa",
        "mswa",
        "--device",
        "cuda",
        "--backend",
        "auto",
        "--dtype",
        "bfloat16",
        "--output",
        str(output),
    ]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(output.read_text())
    assert result["settings"]["resolved_backend"] == "flex" and result["settings"]["dtype"] == "bfloat16"
    assert all(row["tokens_per_s"] > 0 and row["peak_mb"] > 0 for row in result["rows"])
