"""Batches from token arrays: seeded random crops for training, an in-order walk for evaluation.

Training batch b is a pure function of (seed, rank, b), so a resumed run that starts at batch b
sees exactly the batches an uninterrupted run would have seen. Evaluation splits the whole split
into consecutive non-overlapping chunks of ``seq_len`` targets; each target is predicted once, with
the tokens of its own chunk before it as context (the first token of a chunk has none). The last
chunk is padded and its padding ignored, so every target of the split is counted exactly once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

IGNORE = -100  # target id that metrics skip (padding)


def _as_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(rows.astype(np.int64, copy=False))
    return rows[:, :-1], rows[:, 1:]


class RandomCrops(IterableDataset):
    """Endless batches of ``batch_size`` random contiguous crops of ``seq_len + 1`` tokens.

    ``aligned``: crops start only at multiples of ``seq_len``, i.e. they are the fixed chunks of a
    packed stream (each chunk's inputs are its ``seq_len`` tokens, its last target the next one)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, start_batch: int = 0,
                 aligned: bool = False):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"training split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower seq_len")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.start_batch, self.aligned = seed, rank, start_batch, aligned

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, index])
        stride = self.seq_len if self.aligned else 1
        n_starts = (len(self.tokens) - 1 - self.seq_len) // stride + 1
        starts = rng.integers(0, n_starts, size=self.batch_size) * stride
        return _as_batch(np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]))

    def __iter__(self):
        index = self.start_batch
        while True:
            yield self.batch(index)
            index += 1


class EvalChunks(Dataset):
    """Non-overlapping chunks of a split in order; this rank's share when ``world_size`` > 1."""

    def __init__(self, tokens: np.ndarray, seq_len: int, rank: int = 0, world_size: int = 1, max_tokens: int | None = None):
        if max_tokens is not None:
            tokens = tokens[: max_tokens + 1]
        if len(tokens) < 2:
            raise ValueError("evaluation split has fewer than 2 tokens; nothing to predict")
        self.tokens, self.seq_len = tokens, seq_len
        n_chunks = math.ceil((len(tokens) - 1) / seq_len)
        self.chunk_ids = list(range(rank, n_chunks, world_size))

    @property
    def n_targets(self) -> int:
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.chunk_ids[i] * self.seq_len
        piece = np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        x = np.zeros(self.seq_len, dtype=np.int64)
        y = np.full(self.seq_len, IGNORE, dtype=np.int64)
        x[: len(piece) - 1], y[: len(piece) - 1] = piece[:-1], piece[1:]
        return torch.from_numpy(x), torch.from_numpy(y)
