"""Batches from token arrays: seeded random crops for training, an in-order walk for evaluation.

Training batch b is a pure function of (seed, rank, b), so a resumed run that starts at batch b
sees exactly the batches an uninterrupted run would have seen. Evaluation walks the whole split in
chunks of ``eval.seq_len`` inputs that advance by ``eval.stride``: the first chunk scores all its
targets, later ones their last ``stride``, so every target is predicted exactly once, with at least
``eval.seq_len - stride`` tokens before it after the first chunk (``stride = seq_len``: consecutive
non-overlapping chunks, where a chunk's first target sees one token). The last chunk is padded and
its padding ignored.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from mswa.rules import POSITIVE

IGNORE = -100  # target id that metrics skip (padding)


def _as_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(rows.astype(np.int64, copy=False))
    return rows[:, :-1], rows[:, 1:]


class RandomCrops(IterableDataset):
    """Endless batches of ``batch_size`` random contiguous crops of ``seq_len + 1`` tokens.

    Under DDP, batch ``index`` of ``rank`` is its share of one global batch of ``batch_size * world_size``
    crops (rank 0 the first ``batch_size``), so that N processes train on the crops one process would
    draw at batch ``batch_size * N``: the same run, whatever the number of processes.

    ``aligned``: crops start only at multiples of ``seq_len``, i.e. they are the fixed chunks of a
    packed stream (each chunk's inputs are its ``seq_len`` tokens, its last target the next one)."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        start_batch: int = 0,
        aligned: bool = False,
        world_size: int = 1,
    ):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"training split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower seq_len")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.start_batch, self.aligned = seed, rank, world_size, start_batch, aligned

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 0, index])  # the 0 once was the rank: one process draws what it always drew
        stride = self.seq_len if self.aligned else 1
        n_starts = (len(self.tokens) - 1 - self.seq_len) // stride + 1
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        starts = rng.integers(0, n_starts, size=self.batch_size * self.world_size)[mine] * stride
        return _as_batch(np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]))

    def __iter__(self):
        index = self.start_batch
        while True:
            yield self.batch(index)
            index += 1


class EvalChunks(Dataset):
    """Chunks of ``seq_len`` inputs advancing by ``stride`` (default ``seq_len``); this rank's share
    when ``world_size`` > 1 (ranks take interleaved chunks).

    The first chunk scores all its targets, every later one only its last ``stride``, so each target
    of the split is scored exactly once; the others carry ``IGNORE``, as does the padding of the last
    chunk. An item is ``(inputs, targets)``, plus the targets' kind ids when ``kinds`` (one label per
    token of ``tokens``) is given."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        max_tokens: int | None = None,
        stride: int | None = None,
        kinds: np.ndarray | None = None,
    ):
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]
            kinds = None if kinds is None else kinds[: max_tokens + 1]
        if len(tokens) < 2:
            raise ValueError("evaluation split has fewer than 2 tokens; nothing to predict")
        self.tokens, self.kinds, self.seq_len = tokens, kinds, seq_len
        self.stride = seq_len if stride is None else stride
        self.n_chunks = 1 + math.ceil(max(0, self.n_targets - seq_len) / self.stride)
        self.chunk_ids = list(range(rank, self.n_chunks, world_size))

    @property
    def n_targets(self) -> int:
        return len(self.tokens) - 1

    @property
    def forward_tokens_per_target(self) -> float:
        """The evaluation's cost: input tokens the model runs (all ranks, padding included) per scored target."""
        return self.n_chunks * self.seq_len / self.n_targets

    def start(self, i: int) -> int:
        """Index in ``tokens`` of item ``i``'s first input; its position p predicts ``tokens[start + p + 1]``."""
        return self.chunk_ids[i] * self.stride

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        start = self.start(i)
        piece = np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        n = len(piece) - 1
        x = np.zeros(self.seq_len, dtype=np.int64)
        y = np.full(self.seq_len, IGNORE, dtype=np.int64)
        x[:n], y[:n] = piece[:-1], piece[1:]
        if self.chunk_ids[i] > 0:  # the previous chunk scored all but this one's last `stride` targets
            y[: self.seq_len - self.stride] = IGNORE
        if self.kinds is None:
            return torch.from_numpy(x), torch.from_numpy(y)
        kind = np.zeros(self.seq_len, dtype=np.int64)
        kind[:n] = self.kinds[start + 1 : start + n + 1]
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(kind)


def eval_context(cfg: dict) -> tuple[int, int]:
    """(eval.seq_len, eval.stride) of a run config, defaults filled in (the training ``seq_len``, then
    ``eval.seq_len``); a ValueError in one sentence when they cannot work. Learned positions stop at
    the training length; rotary models (and pretrained ones) may be evaluated beyond it."""
    settings = cfg.get("eval") or {}
    seq_len = cfg["seq_len"] if settings.get("seq_len") is None else settings["seq_len"]
    if not POSITIVE.ok(seq_len):
        raise ValueError(f"eval.seq_len={seq_len!r} must be a positive integer (null: the training seq_len)")
    stride = seq_len if settings.get("stride") is None else settings["stride"]
    if not POSITIVE.ok(stride) or stride > seq_len:
        raise ValueError(
            f"eval.stride={stride!r} must be an integer from 1 to eval.seq_len={seq_len} "
            "(each chunk scores its last `stride` targets; null: eval.seq_len)"
        )
    if seq_len > cfg["seq_len"] and cfg["model"].get("positions") == "learned":
        raise ValueError(
            f"eval.seq_len={seq_len} is longer than the training seq_len={cfg['seq_len']}, which learned positions "
            f"(model.positions=learned) cannot go beyond; set eval.seq_len<={cfg['seq_len']} or train with model.positions=rope"
        )
    return seq_len, stride
