"""Learned windows: the blocked kernel's soft span mask against a dense reference written here (outputs and the
gradients of q, k, v and the spans), its cost following the spans, and a learned run end to end."""

import pytest
import torch

from helpers.attention import fixed_grad_out, make_inputs
from mswa.attention import blocked, window_attention


def dense_soft_reference(q, k, v, spans, ramp, caps):
    """Every score plus log clamp((z + R - d) / R, 0, 1) at lag d >= 0 below the cap; -inf elsewhere."""
    n = q.shape[2]
    lag = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).to(q.dtype)
    cap = torch.tensor([n if c is None else c for c in caps], dtype=q.dtype)[:, None, None]
    weight = ((spans[:, None, None] + ramp - lag) / ramp).clamp(0, 1)
    visible = (lag >= 0) & (lag < cap) & (weight > 0)
    # log of 1 where masked, so that no inf * 0 gradient arises there
    log_mask = torch.where(visible, torch.log(torch.where(visible, weight, 1.0)), float("-inf"))
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = q @ k.mT / q.shape[-1] ** 0.5 + log_mask
    return torch.softmax(scores, dim=-1) @ v


# spans off the integers: at z = d the mask has a kink whose one-sided derivative is a convention
CASES = {  # batch, heads, kv heads, n, caps, spans, ramp
    "spans inside their caps, several bands": (2, 4, 4, 70, [64, 64, 64, 64], [3.5, 20.25, 0.1, 40.7], 8.0),
    "a span whose ramp passes N": (1, 3, 3, 40, [None, 80, 16], [35.2, 50.5, 2.2], 6.0),
    "span truncated by its cap": (1, 2, 2, 50, [10, 30], [9.4, 3.6], 4.0),
    "grouped-query k/v, ramp 1": (2, 4, 2, 45, [32, 32, 32, 32], [5.5, 5.5, 12.4, 0.3], 1.0),
    "several chunks per row": (1, 2, 2, 300, [128, 128], [60.3, 100.5], 16.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_soft_spans_match_the_dense_reference_forward_and_backward(case, monkeypatch):
    batch, heads, kv_heads, n, caps, spans, ramp = case
    monkeypatch.setattr(blocked, "CHUNK_BYTES", 16 * 32 * 8 * 40)  # small chunks: pieces of rows too
    q, k, v = make_inputs(batch, heads, kv_heads, n, 8)
    results = []
    kernel = lambda q, k, v, z: window_attention(q, k, v, caps, spans=z, ramp=ramp)  # noqa: E731
    for fn in (kernel, lambda *x: dense_soft_reference(*x, ramp, caps)):
        z = torch.tensor(spans, dtype=torch.float64, requires_grad=True)
        out = fn(q, k, v, z)
        results.append((out, *torch.autograd.grad(out, (q, k, v, z), fixed_grad_out(out))))
    for name, got, want in zip(("out", "grad q", "grad k", "grad v", "grad spans"), *results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert results[1][4].abs().sum() > 0  # the spans do get a gradient


def test_the_cost_follows_the_spans_not_the_caps():
    """A head's band is its current window ceil(z + R): blocks beyond it are never computed."""
    caps = [256, 256, 256, 256]
    spans = torch.tensor([3.0, 20.5, 0.0, 200.0])
    assert blocked.soft_windows(spans, 4.0, caps, 1024) == [7, 25, 4, 204]
    assert blocked.soft_windows(spans, 4.0, caps, 100) == [7, 25, 4, 100]
    plans = []
    original = blocked._BandAttention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocked._BandAttention, "apply", lambda *args: plans.append(args[3]) or original(*args))
        q, k, v = make_inputs(1, 4, 4, 128, 8, torch.float32)
        window_attention(q, k, v, caps, spans=spans, ramp=4.0)
    assert [band.window for band in plans[0].bands] == [7, 25, 4, 128]
    # keys per query block: window 7 and 4 -> 16 + 16, window 25 -> 32 + 32; the cap's band would be 256 + 32
    assert [band.span for band in plans[0].bands[:3]] == [32, 64, 32]
