"""Every attention backend against the dense reference (itself checked against the textbook formula)."""

import functools
import random
import warnings

import pytest
import torch

from helpers.attention import CASES, assert_case_matches_dense, assert_matches_dense, fixed_grad_out, make_inputs, output_and_grads
from mswa.attention import BACKENDS, blocked, dispatch, flex, resolve_backend, window_attention
from mswa.attention.blocked import blocked_window_attention
from mswa.attention.dense import dense_window_attention, window_mask
from mswa.attention.flex import BLOCK, _tile_visibility
from mswa.model import ModelConfig
from mswa.windows import validate_windows


def textbook_attention(q, k, v, windows):
    """softmax(q k^T / sqrt(d) + mask) v with the mask written out pair by pair."""
    n, group = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    for h, window in enumerate(windows):
        for i in range(n):
            for j in range(n):
                if not (0 <= i - j < (window or n + 1)):
                    scores[:, h, i, j] = float("-inf")
    return scores.softmax(-1) @ v


# ----------------------------------------------------------------------------- the reference


def test_dense_reference_is_the_textbook_formula():
    q, k, v = make_inputs(2, 4, 2, 23, 8)
    windows = [1, 5, None, 40]
    with torch.no_grad():
        torch.testing.assert_close(dense_window_attention(q, k, v, windows), textbook_attention(q, k, v, windows), atol=1e-12, rtol=0)


def test_window_mask_follows_the_convention():
    mask = window_mask(6, [3], "cpu")[0, 0]
    assert mask[5].tolist() == [False, False, False, True, True, True]  # query 5 sees keys 3, 4, 5
    assert mask.sum().item() == 1 + 2 + 3 + 3 + 3 + 3


# ----------------------------------------------------------------------------- blocked (and auto)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["blocked", "auto"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_backend_matches_dense(case, backend, dtype, chunk_bodies):
    assert_case_matches_dense(case, backend, dtype)


def test_blocked_matches_dense_on_random_shapes(chunk_bodies):
    rng = random.Random(0)
    for trial in range(25):
        kv_heads = rng.choice([1, 2, 3])
        heads = kv_heads * rng.choice([1, 2, 3])
        n = rng.randint(1, 200)
        windows = [rng.choice([None, rng.randint(1, 8), rng.randint(1, n + 3)]) for _ in range(heads)]
        block = rng.choice([None, 1, 8, 13, 64])
        q, k, v = make_inputs(rng.randint(1, 2), heads, kv_heads, n, rng.choice([4, 8, 16]), seed=trial)
        kernel = functools.partial(blocked_window_attention, windows=windows, block_size=block)
        assert_matches_dense(kernel, q, k, v, windows)


@pytest.mark.parametrize("chunk_blocks", [1, 3, 20, 10**6], ids=["block by block", "pieces of rows", "rows", "one chunk"])
def test_blocked_matches_dense_whatever_the_chunking(monkeypatch, chunk_blocks, threads, chunk_bodies):
    """Chunks of a band split rows into pieces (masking a row's first blocks from inside a piece) or
    group several rows; every chunking gives the dense result, on one thread or several."""
    q, k, v = make_inputs(2, 4, 2, 200, 8)
    monkeypatch.setattr(blocked, "CHUNK_BYTES", chunk_blocks * 32 * 128 * q.element_size())  # 32 queries x 128 keys
    windows = [70, 70, 9, 33]  # block 32: spans of 128 keys (W 70, 3 early blocks) and 64; 7 blocks per row
    assert_matches_dense(lambda *x: blocked_window_attention(*x, windows), q, k, v, windows)


def test_blocked_runs_under_inference_mode_on_its_workers(threads):
    """Lightning validates under torch.inference_mode, which is per thread: the workers must share it."""
    q, k, v = make_inputs(1, 4, 2, 200, 8)
    windows = [70, 70, 9, 33]
    with torch.inference_mode():
        got = blocked_window_attention(q, k, v, windows)
    torch.testing.assert_close(got, dense_window_attention(q, k, v, windows).detach(), atol=1e-12, rtol=0)


def test_blocked_alone_handles_all_windows_at_least_n():
    q, k, v = make_inputs(1, 2, 2, 40, 8)
    assert_matches_dense(lambda *x: blocked_window_attention(*x, [40, 99]), q, k, v, [40, 99])


@pytest.mark.parametrize("backend", ["dense", "blocked", "auto"])
@pytest.mark.parametrize("batch, n", [(0, 16), (2, 0)], ids=["no sequences", "no tokens"])
def test_empty_inputs_give_empty_outputs_and_gradients(backend, batch, n):
    q, k, v = make_inputs(batch, 4, 2, n, 8)
    out = window_attention(q, k, v, [2, 4, 8, 100], backend=backend)
    out.sum().backward()
    assert out.shape == (batch, 4, n, 8)
    assert [x.grad.shape for x in (q, k, v)] == [q.shape, k.shape, v.shape]


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_full_windows_run_fused_causal_whatever_the_backend(backend):
    q, k, v = make_inputs(1, 4, 2, 50, 8)
    windows = [None, 50, None, 80]  # all see every earlier key: even flex trains here (no flex call)
    assert_matches_dense(lambda *x: window_attention(*x, windows, backend=backend), q, k, v, windows)


def test_blocked_trains_in_float32_under_autograd():
    q, k, v = make_inputs(1, 4, 4, 300, 32, torch.float32)
    windows = [32, 32, 128, 256]
    assert_matches_dense(lambda *x: window_attention(*x, windows, backend="blocked"), q, k, v, windows)


# ----------------------------------------------------------------------------- flex


def test_blocked_keeps_its_backward_state_in_saved_tensors():
    """Saved-tensor hooks (offloading, checkpointing) must see all that the backward reads: with
    hooks that keep copies, overwriting the inputs after the forward must not change the gradients."""
    q, k, v = make_inputs(1, 4, 4, 64, 8)  # one sequence of whole blocks, heads in order: q's rows are q
    windows = [3, 3, 40, 40]
    want = output_and_grads(lambda *x: dense_window_attention(*x, windows), q, k, v)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        out = blocked_window_attention(q, k, v, windows)
    for x in (q, k, v):
        x.data.zero_()  # behind autograd's back
    for got, expected in zip(torch.autograd.grad(out, (q, k, v), fixed_grad_out(out)), want[1:], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_flex_tiles_match_brute_force():
    n, windows = 3 * BLOCK + 40, (1, BLOCK, BLOCK + 1, 2 * BLOCK + 5, None)
    partial, full = _tile_visibility(n, torch.tensor([n if w is None else w for w in windows]))
    mask = window_mask(n, windows, "cpu")[0]
    tiles = range(0, n, BLOCK)
    for h in range(len(windows)):
        for a, qs in enumerate(tiles):
            for b, ks in enumerate(tiles):
                tile = mask[h, qs : qs + BLOCK, ks : ks + BLOCK]
                complete = tile.shape == (BLOCK, BLOCK)
                assert full[h, a, b] == (complete and bool(tile.all()))
                assert partial[h, a, b] == (bool(tile.any()) and not full[h, a, b])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_flex_float64_is_exact_through_the_unfused_kernel(case, monkeypatch):
    """float64 runs FlexAttention unfused (its fused kernels compute in float32): the BlockMask and
    mask_mod must then give dense's outputs to 1e-10, with one warning about the N x N memory."""
    batch, heads, kv_heads, n, windows = case
    q, k, v = (x.detach() for x in make_inputs(batch, heads, kv_heads, n, 16))
    monkeypatch.setattr(flex, "_warn_unfused_once", functools.cache(flex._warn_unfused_once.__wrapped__))
    with pytest.warns(UserWarning, match="unfused") as caught:
        for _ in range(2):
            got = window_attention(q, k, v, windows, backend="flex")
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dense_window_attention(q, k, v, windows), atol=1e-10, rtol=0)


def test_flex_refuses_gradients_on_cpu():
    q, k, v = make_inputs(1, 2, 2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="backend='blocked'"):
        window_attention(q, k, v, [4, 8], backend="flex")


@pytest.mark.slow  # compiling flex on CPU takes 10-30 s
def test_flex_compiled_forward_matches_dense_on_cpu():
    for windows, (heads, kv_heads, n) in [((1, 200, None, 64, 130, 5), (6, 3, 300)), ((16, 16, 40, 40), (4, 4, 256))]:
        q, k, v = make_inputs(1, heads, kv_heads, n, 16, torch.float32)
        with torch.no_grad():
            got = window_attention(q, k, v, windows, backend="flex")
            torch.testing.assert_close(got, dense_window_attention(q, k, v, windows), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- backend choice and bad inputs


def test_auto_is_blocked_on_cpu_and_in_float64():
    assert resolve_backend("auto", torch.device("cpu")) == "blocked"
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "blocked"  # flex is unfused there


def test_auto_on_cuda_without_compile_warns_once_and_uses_blocked(monkeypatch):
    monkeypatch.setattr(dispatch, "flex_available", lambda device: False)
    monkeypatch.setattr(dispatch, "_warned_flex_fallback", False)
    with pytest.warns(UserWarning, match="blocked"):
        assert resolve_backend("auto", torch.device("cuda")) == "blocked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", torch.device("cuda")) == "blocked"


def test_validate_windows_normalises():
    assert validate_windows([torch.tensor(3), None, 7], 3) == (3, None, 7)


@pytest.mark.parametrize(
    "windows, message",
    [
        ([[4, 4]], r"model.windows must be 2 layers x 2 heads"),
        ([[4, 4], [4]], r"model.windows must be 2 layers x 2 heads"),
        ([[4, 4], [0, 4]], r"model.windows\[1\]\[0\]=0: a window must be >= 1"),
        ([[4, "4"], [4, 4]], r"model.windows\[0\]\[1\]='4': a window must be an int"),
    ],
)
def test_model_config_refuses_bad_window_tables_before_building(windows, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(n_layer=2, n_head=2, d_model=16, windows=windows)
    assert ModelConfig(n_layer=2, n_head=2, d_model=16, windows=[[1, None], [3, 4]]).windows == [[1, None], [3, 4]]


BAD_WINDOWS = {
    "too few": ([4, 4, 4], "one window per head"),
    "zero": ([4, 0, 4, 4], r"windows\[1\]=0"),
    "negative": ([4, 4, -2, 4], r"windows\[2\]=-2"),
    "float": ([4, 2.5, 4, 4], r"windows\[1\]=2.5"),
    "bool": ([4, 4, 4, True], r"windows\[3\]=True"),
    "string": ("4444", "one window per head"),
}


@pytest.mark.parametrize("windows, message", BAD_WINDOWS.values(), ids=BAD_WINDOWS.keys())
def test_bad_windows_raise(windows, message):
    q, k, v = make_inputs(1, 4, 4, 8, 4)
    with pytest.raises(ValueError, match=message):
        window_attention(q, k, v, windows)


BAD_TENSORS = {
    "heads not divisible": ((1, 4, 8, 4), (1, 3, 8, 4), "not divisible"),
    "k/v lengths differ from q": ((1, 4, 8, 4), (1, 4, 9, 4), "share batch, seq and head_dim"),
    "3-D": ((4, 8, 4), (4, 8, 4), "4-D"),
}


@pytest.mark.parametrize("q_shape, kv_shape, message", BAD_TENSORS.values(), ids=BAD_TENSORS.keys())
def test_bad_tensors_raise(q_shape, kv_shape, message):
    with pytest.raises(ValueError, match=message):
        window_attention(torch.zeros(q_shape), torch.zeros(kv_shape), torch.zeros(kv_shape), [2] * q_shape[-3])


def test_unknown_backend_raises():
    q, k, v = make_inputs(1, 2, 2, 8, 4)
    with pytest.raises(ValueError, match="backend='fast' is unknown"):
        window_attention(q, k, v, [2, 2], backend="fast")


def test_mixed_dtypes_under_autocast_run_in_the_autocast_dtype():
    """fp32 RoPE on bf16 projections leaves q, k fp32 and v bf16; torch's SDPA accepts that under autocast, so must we."""
    q, k, v = make_inputs(1, 4, 2, 70, 16, torch.float32)
    windows = [4, 9, None, 30]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = window_attention(q, k, v.bfloat16(), windows, backend="blocked")
    reference = window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), windows, backend="dense")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=2e-2)
