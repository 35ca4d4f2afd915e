import math

import numpy as np
import pytest
import torch

from mswa.data.batches import IGNORE, EvalChunks, RandomCrops
from mswa.metrics import SummedNLL, metrics_from_sums

TOKENS = np.arange(1000, dtype=np.int32) % 251


def test_crops_are_a_function_of_batch_index():
    crops = RandomCrops(TOKENS, seq_len=16, batch_size=3, seed=7)
    first = [b for _, b in zip(range(5), crops)]
    resumed = RandomCrops(TOKENS, seq_len=16, batch_size=3, seed=7, start_batch=3)
    again = [b for _, b in zip(range(2), resumed)]
    for (x1, y1), (x2, y2) in zip(first[3:], again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the crops one process has always drawn: starts from numpy's generator keyed (seed, 0, batch index)
    starts = np.random.default_rng([7, 0, 0]).integers(0, len(TOKENS) - 16, size=3)
    assert torch.equal(first[0][0], torch.as_tensor(np.stack([TOKENS[s : s + 16] for s in starts]), dtype=torch.int64))


def test_ranks_share_the_global_batch_one_process_draws():
    """Two DDP ranks of batch 3 train on the 6 crops of one process at batch 6: same run, any process count."""
    one = RandomCrops(TOKENS, seq_len=16, batch_size=6, seed=7).batch(4)
    ranks = [RandomCrops(TOKENS, seq_len=16, batch_size=3, seed=7, rank=r, world_size=2).batch(4) for r in (0, 1)]
    assert torch.equal(torch.cat([x for x, _ in ranks]), one[0]) and torch.equal(torch.cat([y for _, y in ranks]), one[1])
    assert not torch.equal(ranks[0][0], ranks[1][0])


def test_crops_are_contiguous_and_shifted():
    x, y = RandomCrops(TOKENS, seq_len=16, batch_size=4, seed=0).batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 251, torch.ones(4, 15, dtype=torch.int64))


def test_crops_refuse_a_too_short_split():
    with pytest.raises(ValueError, match="lower seq_len"):
        RandomCrops(TOKENS[:10], seq_len=16, batch_size=1, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_chunks_count_every_target_once(world_size):
    seq_len, tokens = 64, TOKENS[:999]
    seen = []
    for rank in range(world_size):
        for x, y in EvalChunks(tokens, seq_len, rank, world_size):
            keep = y != IGNORE
            assert torch.equal(x[1:][keep[:-1] & keep[1:]], y[:-1][keep[:-1] & keep[1:]])
            seen.extend(y[keep].tolist())
    assert sorted(seen) == sorted(tokens[1:].tolist())
    assert len(seen) == len(tokens) - 1


def test_eval_chunks_walk_in_order_without_overlap():
    chunks = EvalChunks(TOKENS[:200], seq_len=64)
    starts = [int(chunks[i][0][0]) for i in range(len(chunks))]
    assert starts == [int(TOKENS[s]) for s in (0, 64, 128, 192)]
    assert int((chunks[3][1] != IGNORE).sum()) == 199 - 192


def test_metrics_from_sums():
    out = metrics_from_sums(10 * math.log(256), 10, "byte")
    assert out["bpc"] == pytest.approx(8.0, abs=1e-12)
    assert metrics_from_sums(2 * math.log(50), 2, "word")["ppl"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="empty"):
        metrics_from_sums(0.0, 0, "byte")


def test_summed_nll_skips_padding_and_sums_in_float64():
    metric = SummedNLL()
    metric.update(torch.tensor([[1.0, 2.0, 99.0]]), torch.tensor([[True, True, False]]))
    metric.update(torch.tensor([[0.5]]), torch.tensor([[True]]))
    sums = metric.compute()
    nll, count = sums["nll_sum"], sums["count"]
    assert nll.dtype == torch.float64 and nll.item() == 3.5 and count.item() == 3
