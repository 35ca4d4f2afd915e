"""Summed NLL and target counts -> loss, bits per byte (bpc) and perplexity (ppl); loss by distance and kind.

Sums, never per-batch averages: loss = sum(NLL) / count over the whole split, accumulated in
float64 and summed across DDP ranks by torchmetrics before anything is divided. The same sums are
kept per distance bucket (the context offered: tokens before the target inside its evaluation chunk,
buckets [1], [2, 3], [4, 7], ... [2^b, 2^(b+1) - 1]) and per token kind (corpora that label them), so
every breakdown adds back to the overall numbers.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

MAX_BUCKETS = 40  # contexts up to 2^40 tokens; fixed sizes keep the DDP sums a plain all-reduce
MAX_KINDS = 16  # token kinds a corpus may label (the synthetic corpus: a word kind and up to 10 copy scales)


def metrics_from_sums(nll_sum: float, count: int, unit: str) -> dict[str, float]:
    """``unit`` 'byte' adds bpc = loss / ln 2; 'word' and 'token' add ppl = exp(loss)."""
    if count <= 0:
        raise ValueError("no targets were evaluated; the evaluation split is empty")
    loss = nll_sum / count
    extra = {"bpc": loss / math.log(2)} if unit == "byte" else {"ppl": math.exp(loss)}
    return {"loss": loss, **extra}


def context_buckets(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bucket of each chunk position: position p offers p + 1 tokens of context, in bucket floor(log2(p + 1))."""
    return torch.tensor([(p + 1).bit_length() - 1 for p in range(seq_len)], device=device)


class SummedNLL(Metric):
    """Accumulates per-token NLL of valid targets, overall, by distance bucket and by kind; DDP-safe
    (every state is a sum, reduced across ranks)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        for name, size in (("bucket", MAX_BUCKETS), ("kind", MAX_KINDS)):
            self.add_state(f"{name}_nll", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_count", default=torch.zeros(size, dtype=torch.int64), dist_reduce_fx="sum")
        self._buckets: torch.Tensor | None = None

    def update(self, nll: torch.Tensor, valid: torch.Tensor, kinds: torch.Tensor | None = None) -> None:
        """``nll``, ``valid`` and ``kinds`` are (batch, chunk position)."""
        nll = nll.detach().to(torch.float64)
        self.nll_sum += nll[valid].sum()
        self.count += valid.sum()
        if self._buckets is None or len(self._buckets) != nll.shape[1] or self._buckets.device != nll.device:
            self._buckets = context_buckets(nll.shape[1], nll.device)
        self._add("bucket", self._buckets.expand_as(nll)[valid], nll[valid])
        if kinds is not None:
            self._add("kind", kinds[valid], nll[valid])

    def _add(self, name: str, index: torch.Tensor, nll: torch.Tensor) -> None:
        getattr(self, f"{name}_nll").index_add_(0, index, nll)
        getattr(self, f"{name}_count").index_add_(0, index, torch.ones_like(index))

    def compute(self) -> dict[str, torch.Tensor]:
        """All sums (reduced across ranks): nll_sum, count, bucket_nll/count, kind_nll/count."""
        names = ("nll_sum", "count", "bucket_nll", "bucket_count", "kind_nll", "kind_count")
        return {name: getattr(self, name).clone() for name in names}


def by_distance(sums: dict[str, torch.Tensor], unit: str, seq_len: int) -> list[dict]:
    """One row per non-empty bucket: its context range (capped at ``seq_len``), targets and metrics."""
    rows = []
    for b, (nll, count) in enumerate(zip(sums["bucket_nll"].tolist(), sums["bucket_count"].tolist())):
        if count:
            context = [2**b, min(2 ** (b + 1) - 1, seq_len)]
            rows.append({"context": context, "targets": count, **metrics_from_sums(nll, count, unit)})
    return rows


def by_kind(sums: dict[str, torch.Tensor], names: list[str], floors: list[float | None]) -> list[dict]:
    """One row per kind of a byte corpus: its bytes, bpc and entropy floor (bits per byte)."""
    rows = []
    for name, nll, count, floor in zip(names, sums["kind_nll"].tolist(), sums["kind_count"].tolist(), floors):
        if count:
            rows.append({"kind": name, "bytes": count, "bpc": nll / count / math.log(2), "floor_bpc": floor})
    return rows
