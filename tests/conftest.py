"""Fixtures every test gets: W&B never touches the network. Shared helpers live in tests/helpers/."""

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` runs one test process per core: one thread each (and in the train.py subprocesses they
    # start, which inherit this), so two workers never oversubscribe the cores.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def threads(request):
    """torch's thread count for the test: at 3, the blocked kernel's chunks go to 3 workers (more than this
    machine may have cores), whose key and value gradients overlap and are summed."""
    import torch  # here, not above: the thread settings above come first

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=["native", "python"], ids=["native chunk bodies", "python chunk bodies"])
def chunk_bodies(request, monkeypatch):
    """The blocked kernel's chunks through the compiled bodies (`mswa.native`; skipped where they cannot be
    built) or through the Python ones they replace, which machines without a compiler run."""
    from mswa import native

    if request.param == "native" and native.kernel() is None:
        pytest.skip("the native CPU kernels could not be built here (no compiler, or MSWA_NATIVE=0)")
    if request.param == "python":
        monkeypatch.setattr(native, "kernel", lambda: None)
    return request.param
