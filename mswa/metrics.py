"""Summed NLL and target counts -> loss, bits per byte (bpc) and perplexity (ppl).

Sums, never per-batch averages: loss = sum(NLL) / count over the whole split, accumulated in
float64 and summed across DDP ranks by torchmetrics before anything is divided.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


def metrics_from_sums(nll_sum: float, count: int, unit: str) -> dict[str, float]:
    """``unit`` 'byte' adds bpc = loss / ln 2; 'word' and 'token' add ppl = exp(loss)."""
    if count <= 0:
        raise ValueError("no targets were evaluated; the evaluation split is empty")
    loss = nll_sum / count
    extra = {"bpc": loss / math.log(2)} if unit == "byte" else {"ppl": math.exp(loss)}
    return {"loss": loss, **extra}


class SummedNLL(Metric):
    """Accumulates per-token NLL of valid targets; DDP-safe (states are summed across ranks)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, valid: torch.Tensor) -> None:
        self.nll_sum += nll.detach().to(torch.float64)[valid].sum()
        self.count += valid.sum()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.nll_sum, self.count
