"""Fixtures every test gets: W&B never touches the network. Shared helpers live in tests/helpers/."""

import pytest


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
