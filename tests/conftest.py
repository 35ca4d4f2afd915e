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
