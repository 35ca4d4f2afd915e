"""The native CPU kernels (`mswa.native`): exact against a float64 reference written here, and a machine that
cannot build them keeps the PyTorch path with one warning."""

import os
import subprocess
import sys

import pytest
import torch

from helpers.attention import assert_matches_dense, make_inputs
from mswa import native
from mswa.attention import blocked
from mswa.attention.blocked import blocked_window_attention


def reference_step(q, k, v, keys, values, first, windows, position):
    """Row by row in float64: write the new key and value at slot position % W, then softmax over the filled slots."""
    keys, values, outs = keys.double().clone(), values.double().clone(), []
    for i, (start, window) in enumerate(zip(first.tolist(), windows.tolist())):
        keys[start + position % window], values[start + position % window] = k[i].double(), v[i].double()
        filled = slice(start, start + min(window, position + 1))
        scores = keys[filled] @ q[i].double() / q.shape[1] ** 0.5
        outs.append(torch.softmax(scores, 0) @ values[filled])
    return torch.stack(outs), keys, values


@pytest.mark.parametrize("dim", [5, 32, 64, 72, 128])  # the compiled head sizes, and others under and between 8 lanes
@pytest.mark.parametrize("position", [0, 17, 300])  # first token, rings partly filled, every ring wrapped
def test_ring_step_matches_a_float64_reference(dim, position):
    kernel = native.kernel()
    if kernel is None:
        pytest.skip("the native CPU kernels could not be built here (no compiler, or MSWA_NATIVE=0)")
    torch.manual_seed(dim + position)
    windows = torch.tensor([1, 3, 16, 40, 40, 129, 256, 7])
    placed = torch.randperm(len(windows))  # the rings lie in another order than the rows, as window groups do
    first = torch.empty_like(windows)
    first[placed] = torch.cumsum(windows[placed], 0) - windows[placed]
    keys, values = torch.randn(int(windows.sum()), dim), torch.randn(int(windows.sum()), dim)
    q, k, v = (torch.randn(len(windows), dim) * 3 for _ in range(3))
    expected, expected_keys, expected_values = reference_step(q, k, v, keys, values, first, windows, position)
    out = kernel.ring_step(q, k, v, keys, values, first, windows, first.argsort(), position, dim**-0.5)
    torch.testing.assert_close(out.double(), expected, rtol=2e-6, atol=2e-6)  # fp32: a few ulps
    torch.testing.assert_close(keys.double(), expected_keys, rtol=0, atol=0)
    torch.testing.assert_close(values.double(), expected_values, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [32, 64, 72])  # compiled for their size, and one read at run time
def test_direct_bands_match_dense_with_gradients(dim, threads):
    """Bands of windows up to DIRECT_WINDOW attend directly (grouped-query k/v, two sequences, rows of N not a
    multiple of any block); one band above it stays blocked beside them."""
    if native.kernel() is None:
        pytest.skip("the native CPU kernels could not be built here (no compiler, or MSWA_NATIVE=0)")
    windows = [1, 7, blocked.DIRECT_WINDOW, blocked.DIRECT_WINDOW + 1]
    q, k, v = make_inputs(2, 4, 2, 150, dim, dtype=torch.float32, seed=dim)
    assert_matches_dense(lambda *x: blocked_window_attention(*x, windows), q, k, v, windows)


def test_a_failed_build_warns_once_and_leaves_the_pytorch_path(tmp_path):
    """A compiler that fails: `kernel()` is None after one warning naming the cause, and decoding still runs."""
    script = (
        "import warnings, torch\n"
        "from mswa import native\n"
        "from mswa.model import LanguageModel, ModelConfig\n"
        "from mswa.generate import DecodingCache\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert native.kernel() is None and native.kernel() is None\n"
        "print(len(caught), caught[0].message)\n"
        "model = LanguageModel(ModelConfig(vocab_size=11, n_layer=1, n_head=2, d_model=8, max_seq_len=16, windows=[[2, 4]])).eval()\n"
        "cache = DecodingCache(model)\n"
        "with torch.no_grad():\n"
        "    model(torch.tensor([[1, 2, 3]]), cache)\n"
        "    print(model(torch.tensor([[4]]), cache).shape)\n"
    )
    env = {**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, message = done.stdout.splitlines()[0].split(" ", 1)
    assert count == "1" and message.startswith("mswa: native CPU kernels unavailable, using the PyTorch path (")
    assert done.stdout.splitlines()[1] == "torch.Size([1, 1, 11])"


def test_a_lock_left_by_a_killed_build_does_not_stop_later_builds(tmp_path):
    """torch waits for ever on a build lock whose build was killed; an old one is removed (the build then runs:
    here it fails at once, with a compiler that fails, and says so)."""
    env = {**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    script = "from mswa import native; print(native.build_folder())"
    folder = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.strip()
    lock = tmp_path / "mswa" / os.path.basename(folder) / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (0, 0))  # a leftover from long ago
    script = "from mswa import native; print(native.kernel())"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "None" and "removed a build lock" in done.stderr and not lock.exists()


def test_a_finished_build_loads_without_ninja_or_a_compiler():
    """Once built, the kernels load without asking ninja (two ninja versions on one machine each rebuilt the
    other's build), so a PATH without ninja and a compiler still has them."""
    if native.kernel() is None:
        pytest.skip("the native CPU kernels could not be built here (no compiler, or MSWA_NATIVE=0)")
    env = {**os.environ, "PATH": "/nonexistent"}
    script = "from mswa import native; print(native.kernel() is not None)"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr


def test_the_build_name_follows_the_source():
    assert native.build_name("a") != native.build_name("b")
    assert native.build_name("a") == native.build_name("a")


def test_the_native_workers_start_afresh_in_a_forked_child():
    """A forked child (a DataLoader worker, a launcher job) has none of its parent's worker threads: the kernel's
    pool is forgotten there and started anew, not waited on forever."""
    if native.kernel() is None:
        pytest.skip("the native CPU kernels could not be built here (no compiler, or MSWA_NATIVE=0)")
    script = (
        "import os, torch\n"
        "from mswa.attention.blocked import blocked_window_attention\n"
        "torch.set_num_threads(2)\n"
        "torch.manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 4, 300, 16) for _ in range(3))\n"
        "expected = blocked_window_attention(q, k, v, [5, 5, 40, 40])  # the parent's pool starts here\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    same = torch.equal(blocked_window_attention(q, k, v, [5, 5, 40, 40]), expected)\n"
        "    os._exit(0 if same else 3)\n"
        "print(os.waitpid(pid, 0)[1] >> 8, torch.equal(blocked_window_attention(q, k, v, [5, 5, 40, 40]), expected))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True"]


def test_an_error_on_a_native_worker_is_raised_and_the_pool_still_works():
    kernel = native.kernel()
    if kernel is None:
        pytest.skip("the native CPU kernels could not be built here (no compiler, or MSWA_NATIVE=0)")
    blocks, block, span, dim = 6, 4, 8, 5
    queries, keys = torch.randn(blocks, block, dim), torch.randn(blocks, span, dim)
    probs, out, mask, before = (
        torch.empty(blocks, block, span),
        torch.empty(blocks, block, dim),
        torch.zeros(block, span),
        torch.zeros(1, 1, span),
    )
    chunks = torch.tensor([[0, 0, b, b + 1, 1, 0] for b in range(blocks)])  # blocked chunks of one block each
    sizes = ([span], [0], [block], blocks * block)  # window, reach, block size; positions per layout row
    wrong_values = torch.randn(blocks, span, dim, dtype=torch.float64)  # a product of mixed dtypes fails
    with pytest.raises(RuntimeError):
        kernel.band_forward([probs], [queries], [keys], [wrong_values], [out], [mask], [before], *sizes, chunks, 1.0, 3)
    values = torch.randn(blocks, span, dim)
    kernel.band_forward([probs], [queries], [keys], [values], [out], [mask], [before], *sizes, chunks, 1.0, 3)
    expected = torch.softmax(queries @ keys.mT, -1) @ values
    torch.testing.assert_close(out, expected)
