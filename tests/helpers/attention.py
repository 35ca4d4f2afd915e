"""Attention inputs and the check of a kernel against the dense reference, shared by the CPU and CUDA tests."""

import torch

from mswa.attention import window_attention
from mswa.attention.blocked import block_size_for
from mswa.attention.dense import dense_window_attention

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_inputs(batch, heads, kv_heads, n, dim, dtype=torch.float64, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    return [torch.randn(s, generator=generator, dtype=dtype).to(device).requires_grad_() for s in shapes]


def output_and_grads(fn, q, k, v):
    """fn's output and the gradients of q, k, v for a fixed random output gradient."""
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), fixed_grad_out(out)))


def fixed_grad_out(out):
    """The same random output gradient for every call with this output's shape, dtype and device."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)


def assert_matches_dense(fn, q, k, v, windows):
    """Output and q/k/v gradients of fn against dense: same dtype and device as q, within TOLERANCE."""
    tolerance = TOLERANCE[q.dtype]
    got = output_and_grads(fn, q, k, v)
    want = output_and_grads(lambda *x: dense_window_attention(*x, windows), q, k, v)
    for name, a, b in zip(("out", "grad q", "grad k", "grad v"), got, want, strict=True):
        assert a.dtype == q.dtype and a.device == q.device, f"{name}: {a.dtype} on {a.device}"
        torch.testing.assert_close(a, b, atol=tolerance, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


CASES = {
    "window 1": (1, 4, 4, 70, [1, 1, 1, 1]),
    "window >= N mixed with small": (1, 4, 4, 70, [70, 500, 3, 3]),
    "N not a multiple of the block": (2, 4, 4, 2 * block_size_for(40) + 7, [40, 40, 17, 17]),
    "mixed windows with None": (1, 6, 6, 130, [None, 32, 5, None, 129, 64]),
    "heads sharing a window are not adjacent": (1, 5, 5, 90, [8, 32, 8, None, 32]),
    "grouped-query k/v": (2, 8, 2, 100, [4, 4, 16, 16, 33, 33, None, 7]),
    "grouped-query, one kv head": (1, 4, 1, 77, [9, 60, 9, 2]),
    "every block size in one layer": (1, 4, 2, 1100, [5, 600, 70, None]),
}


def assert_case_matches_dense(case, backend, dtype, device="cpu"):
    """One of CASES through `window_attention` against dense (the CPU and the CUDA tests)."""
    batch, heads, kv_heads, n, windows = case
    q, k, v = make_inputs(batch, heads, kv_heads, n, 16, dtype, device=device)
    assert_matches_dense(lambda *x: window_attention(*x, windows, backend=backend), q, k, v, windows)
