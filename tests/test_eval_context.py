"""Sliding evaluation (eval.seq_len, eval.stride), loss by distance, per-kind bpc, and the verified synthetic cache."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mswa.data.batches import IGNORE, EvalChunks, eval_context
from mswa.data.corpus import DataError
from mswa.data.synthetic import load as load_synthetic
from mswa.lit import CorpusDataModule, LanguageModelTask
from mswa.metrics import SummedNLL, by_distance
from mswa.model import LanguageModel, ModelConfig

TINY = {"n_layer": 2, "n_head": 2, "d_model": 16, "vocab_size": 256, "windows": [[4, None], [8, 3]]}
SMALL_CORPUS = {"n_bytes": 20_000, "valid_fraction": 0.1, "test_fraction": 0.05}


def tiny_model(positions: str = "rope", max_seq_len: int = 64) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**TINY, positions=positions, max_seq_len=max_seq_len)).eval()


def scored(chunks: EvalChunks) -> dict[int, tuple[int, int]]:
    """Target index -> (its context inside the chunk, how often it was scored), over all items."""
    seen: dict[int, tuple[int, int]] = {}
    for i in range(len(chunks)):
        x, y = chunks[i][:2]
        for p in torch.nonzero(y != IGNORE).flatten().tolist():
            t = chunks.start(i) + p
            assert y[p] == chunks.tokens[t + 1] and x[p] == chunks.tokens[t]
            seen[t] = (p + 1, seen.get(t, (0, 0))[1] + 1)
    return seen


@pytest.mark.parametrize("n_tokens", [2, 3, 18, 101, 258, 1000])
@pytest.mark.parametrize("seq_len", [1, 4, 7, 64])
def test_every_target_is_scored_once_with_the_promised_context(n_tokens, seq_len):
    tokens = np.arange(n_tokens, dtype=np.int64) * 7 % 251
    for stride in sorted({1, max(1, seq_len // 3), max(1, seq_len - 1), seq_len}):
        for world in (1, 2, 3):
            shards = [EvalChunks(tokens, seq_len, rank, world, stride=stride) for rank in range(world)]
            seen = {}
            for shard in shards:
                for t, (context, times) in scored(shard).items():
                    assert t not in seen and times == 1, (t, stride, world)
                    seen[t] = context
            assert sorted(seen) == list(range(n_tokens - 1)), (stride, world)
            for t, context in seen.items():  # all tokens before it, up to at least seq_len - stride + 1
                assert min(t + 1, seq_len - stride + 1) <= context <= min(t + 1, seq_len)
            assert sum(len(s) for s in shards) == shards[0].n_chunks


def test_stride_1_equals_an_independent_loop_that_feeds_each_target_its_last_seq_len_tokens():
    model, seq_len = tiny_model(), 12
    tokens = np.random.default_rng(0).integers(0, 256, 60)
    chunks = EvalChunks(tokens, seq_len, stride=1)
    per_target = {}
    with torch.no_grad():
        for i in range(len(chunks)):
            x, y = chunks[i]
            nll = model.token_nll(x[None], y[None])[0]
            for p in torch.nonzero(y != IGNORE).flatten().tolist():
                per_target[chunks.start(i) + p] = nll[p].item()
        expected = {}
        for t in range(len(tokens) - 1):
            context = torch.as_tensor(tokens[max(0, t + 1 - seq_len) : t + 1])[None]
            logits = model(context)[0, -1]
            expected[t] = (torch.logsumexp(logits, -1) - logits[tokens[t + 1]]).item()
    assert sorted(per_target) == sorted(expected)
    np.testing.assert_allclose([per_target[t] for t in expected], list(expected.values()), rtol=0, atol=1e-6)


def old_non_overlapping_chunks(tokens: np.ndarray, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation before eval.stride existed: consecutive chunks, the last one padded."""
    rows = []
    for start in range(0, len(tokens) - 1, seq_len):
        piece = torch.as_tensor(np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64))
        x, y = torch.zeros(seq_len, dtype=torch.int64), torch.full((seq_len,), IGNORE)
        x[: len(piece) - 1], y[: len(piece) - 1] = piece[:-1], piece[1:]
        rows.append((x, y))
    return rows


def validate(task, data) -> dict:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.validate(task, datamodule=data, verbose=False)
    return task.eval_results


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_synthetic(str(tmp_path_factory.mktemp("data")), **SMALL_CORPUS)


def tiny_task(corpus) -> LanguageModelTask:
    torch.manual_seed(0)
    return LanguageModelTask(LanguageModel(ModelConfig(**TINY, max_seq_len=64)), optim=None, unit=corpus.unit)


def test_stride_equal_to_seq_len_reproduces_the_non_overlapping_numbers_exactly(corpus):
    task = tiny_task(corpus)
    results = validate(task, CorpusDataModule(corpus, 32, 4, 8, seed=0))
    total, count = torch.tensor(0.0, dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in DataLoader(old_non_overlapping_chunks(corpus.splits["valid"], 32), batch_size=8):
            valid = y != IGNORE
            total += task.model.token_nll(x, y).to(torch.float64)[valid].sum()
            count += int(valid.sum())
    assert results["val/loss"] == total.item() / count
    assert task.eval_details["val"]["forward_tokens_per_target"] == pytest.approx(1.0, abs=1e-2)


def test_per_kind_bpc_and_floors_add_back_and_distance_buckets_cover_every_target(corpus):
    task = tiny_task(corpus)
    results = validate(task, CorpusDataModule(corpus, 32, 4, 8, seed=0, eval_seq_len=48, eval_stride=12))
    details = task.eval_details["val"]
    kinds = details["by_kind"]
    n = sum(row["bytes"] for row in kinds)
    assert n == details["targets"] == len(corpus.splits["valid"]) - 1
    assert [row["kind"] for row in kinds] == corpus.kind_names
    assert sum(row["bpc"] * row["bytes"] for row in kinds) / n == pytest.approx(results["val/bpc"], abs=1e-9)
    # the floors weigh every byte of the split; the evaluation scores all but the first
    counts = np.bincount(np.asarray(corpus.kinds["valid"]), minlength=len(kinds))
    floors = [row["floor_bpc"] for row in kinds]
    assert float(np.dot(counts, floors) / counts.sum()) == pytest.approx(details["floor_bpc"], abs=1e-9)
    assert all(results[f"val/bpc_{row['kind']}"] == row["bpc"] for row in kinds)
    buckets = details["by_distance"]
    assert sum(row["targets"] for row in buckets) == n
    assert sum(row["loss"] * row["targets"] for row in buckets) / n == pytest.approx(results["val/loss"], abs=1e-9)
    assert buckets[-1]["context"][1] == 48 and min(row["context"][0] for row in buckets) == 1
    assert details["forward_tokens_per_target"] == pytest.approx(4.0, rel=0.02)


def test_distance_buckets_are_log_spaced_by_context_and_summed_across_ranks():
    nll = torch.rand(3, 10, dtype=torch.float32)
    valid = torch.ones(3, 10, dtype=torch.bool)
    single, ranks = SummedNLL(), [SummedNLL(), SummedNLL()]
    single.update(nll, valid)
    ranks[0].update(nll[:1], valid[:1])
    ranks[1].update(nll[1:], valid[1:])
    merged = {k: ranks[0].compute()[k] + ranks[1].compute()[k] for k in single.compute()}
    rows = by_distance(merged, "byte", 10)
    assert [row["context"] for row in rows] == [[1, 1], [2, 3], [4, 7], [8, 10]]
    assert [row["targets"] for row in rows] == [3, 6, 12, 9]
    expected = nll.double()[:, 3:7].mean().item()  # positions 3..6 see 4..7 tokens
    assert rows[2]["loss"] == pytest.approx(expected, abs=1e-12)
    assert merged["nll_sum"].item() == pytest.approx(single.compute()["nll_sum"].item(), abs=1e-12)


CFG = {"seq_len": 64, "model": {"positions": "rope"}}


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"stride": 0}, "eval.stride=0 must be an integer from 1 to eval.seq_len=64"),
        ({"seq_len": 32, "stride": 33}, "eval.stride=33 must be an integer from 1 to eval.seq_len=32"),
        ({"seq_len": 0}, "eval.seq_len=0 must be a positive integer"),
        ({"seq_len": 12.5}, "eval.seq_len=12.5 must be a positive integer"),
    ],
)
def test_bad_eval_settings_are_refused_in_one_sentence(settings, words):
    with pytest.raises(ValueError, match=words):
        eval_context({**CFG, "eval": settings})


def test_longer_evaluation_is_for_rotary_models_only():
    assert eval_context(CFG) == (64, 64)
    assert eval_context({**CFG, "eval": {"seq_len": 256, "stride": None}}) == (256, 256)
    assert eval_context({**CFG, "eval": {"seq_len": 256, "stride": 64}}) == (256, 64)
    learned = {**CFG, "model": {"positions": "learned"}, "eval": {"seq_len": 65}}
    with pytest.raises(ValueError, match="eval.seq_len=65 is longer than the training seq_len=64.*model.positions=rope"):
        eval_context(learned)


def test_a_rotary_model_runs_at_four_times_its_training_length(corpus):
    task = tiny_task(corpus)
    results = validate(task, CorpusDataModule(corpus, 32, 4, 2, seed=0, eval_seq_len=128, eval_stride=32))
    assert math.isfinite(results["val/bpc"])


def test_the_synthetic_cache_is_verified_on_load(tmp_path):
    load_synthetic(str(tmp_path), **SMALL_CORPUS)
    (folder,) = tmp_path.iterdir()
    valid = folder / "valid.npy"
    raw = bytearray(valid.read_bytes())
    raw[-1] ^= 0xFF  # same size, one flipped byte
    valid.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{valid} does not match the sha256 .* delete {folder} and rerun"):
        load_synthetic(str(tmp_path), **SMALL_CORPUS)
    raw[-1] ^= 0xFF
    valid.write_bytes(bytes(raw))
    load_synthetic(str(tmp_path), **SMALL_CORPUS)  # restored: accepted again
    train = folder / "train.npy"
    train.write_bytes(train.read_bytes()[:-100])
    with pytest.raises(DataError, match=f"{train} has .* bytes, not .* \\(truncated or changed\\); delete {folder}"):
        load_synthetic(str(tmp_path), **SMALL_CORPUS)
    (folder / "test_kinds.npy").unlink()
    with pytest.raises(DataError, match="test_kinds.npy is missing|train.npy has"):
        load_synthetic(str(tmp_path), **SMALL_CORPUS)


def test_an_interrupted_synthetic_build_is_rebuilt(tmp_path):
    first = load_synthetic(str(tmp_path), **SMALL_CORPUS)
    (folder,) = tmp_path.iterdir()
    (folder / "manifest.json").unlink()  # what a build stopped before its manifest leaves
    again = load_synthetic(str(tmp_path), **SMALL_CORPUS)
    np.testing.assert_array_equal(again.splits["valid"], first.splits["valid"])
    np.testing.assert_array_equal(again.kinds["test"], first.kinds["test"])


@pytest.mark.slow
def test_ddp_cpu_sliding_evaluation_gives_the_single_process_numbers(tmp_path):
    from helpers.runs import TINY_DATA, results_under, run_train

    common = [
        "debug=smoke",
        *TINY_DATA,
        "optim.lr=0",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=none",
        "eval.stride=16",
        "eval.seq_len=96",
    ]
    run_train([*common, "task_name=single"], tmp_path)
    run_train([*common, "task_name=ddp", "hardware=ddp_cpu"], tmp_path)
    single, ddp = (results_under(tmp_path / "outputs" / name)[0] for name in ("single", "ddp"))
    assert ddp["metrics"]["test/loss"] == pytest.approx(single["metrics"]["test/loss"], abs=1e-6)
    for split in ("val", "test"):
        one, two = single["evaluation"][split], ddp["evaluation"][split]
        assert one["targets"] == two["targets"]
        assert [row["targets"] for row in one["by_distance"]] == [row["targets"] for row in two["by_distance"]]
        assert [row["bytes"] for row in one["by_kind"]] == [row["bytes"] for row in two["by_kind"]]
