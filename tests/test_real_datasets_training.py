"""enwik8 / WikiText through train.py on small local fixtures; adaptive-softmax perplexity; real WikiText-2 text."""

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from helpers.data import SHARED_WIKITEXT2_VALID, write_word_corpus
from helpers.runs import compose_config, run_train
from mswa.data.corpus import Corpus
from mswa.lit import CorpusDataModule, LanguageModelTask
from mswa.model import LanguageModel, ModelConfig
from mswa.run import RunInfo, train

SMOKE = ["debug=smoke", "logger=none"]


def only_results(root: Path) -> dict:
    (path,) = root.rglob("results.json")
    return json.loads(path.read_text())


def test_enwik8_from_a_local_byte_file_trains_through_train_py(tmp_path):
    raw = tmp_path / "raw_bytes"
    raw.write_bytes(b"<page><title>Anarchism</title><text>" * 2000)
    run_train(["dataset=enwik8", f"dataset.path={raw}", "dataset.loader.split_fractions=[0.9,0.05,0.05]", *SMOKE], tmp_path)
    r = only_results(tmp_path / "outputs")
    assert r["status"] == "finished" and r["dataset"] == "enwik8" and r["metric"] == "bpc"
    assert math.isfinite(r["metrics"]["test/bpc"]) and r["entropy_floor_bpb"] is None


def test_wikitext_local_files_train_with_adaptive_softmax_through_train_py(tmp_path):
    folder = write_word_corpus(tmp_path / "wt")
    run_train(["dataset=wikitext2", f"dataset.path={folder}", "model.output=adaptive", "model.adaptive_cutoffs=[20,60]", *SMOKE], tmp_path)
    r = only_results(tmp_path / "outputs")
    assert r["status"] == "finished" and r["metric"] == "ppl"
    assert r["metrics"]["val/ppl"] == pytest.approx(math.exp(r["metrics"]["val/loss"]))
    assert 1 < r["metrics"]["test/ppl"] < 300


def test_adaptive_softmax_perplexity_is_exp_of_mean_nll(tmp_path):
    torch.manual_seed(0)
    vocab = 300
    tokens = np.random.default_rng(0).integers(0, vocab, size=3000).astype(np.int32)
    corpus = Corpus("words", {"train": tokens, "valid": tokens[:1001], "test": tokens[:500]}, vocab, "word")
    cfg = dict(vocab_size=vocab, n_layer=2, n_head=4, d_model=32, max_seq_len=64, output="adaptive", adaptive_cutoffs=[50, 150])
    task = LanguageModelTask(LanguageModel(ModelConfig(**cfg)), None, "word")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.validate(task, datamodule=CorpusDataModule(corpus, 64, 4, 7, seed=0), verbose=False)

    # independently: full log-probabilities of every word, gathered at each target, over the same chunks
    model: LanguageModel = task.model.eval()
    valid = tokens[:1001].astype(np.int64)
    nll = []
    with torch.no_grad():
        for start in range(0, 1000, 64):
            piece = torch.from_numpy(valid[start : start + 65])
            log_probs = model(piece[None, :-1])[0]
            assert torch.allclose(log_probs.exp().sum(-1), torch.ones(len(piece) - 1), atol=1e-5)
            nll += (-log_probs.gather(1, piece[1:, None])).flatten().tolist()
    assert len(nll) == 1000
    assert task.eval_results["val/ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-6)


def test_adaptive_cutoffs_must_fit_the_vocabulary():
    with pytest.raises(ValueError, match="adaptive_cutoffs"):
        ModelConfig(vocab_size=1000, output="adaptive", adaptive_cutoffs=[20000, 40000, 200000])


@pytest.mark.skipif(not SHARED_WIKITEXT2_VALID.exists(), reason="../shared/data/wikitext-2/valid.txt is not here")
def test_trains_a_few_steps_on_real_wikitext2_text(tmp_path):
    folder = tmp_path / "wikitext2"
    folder.mkdir()
    (folder / "wiki.train.tokens").symlink_to(SHARED_WIKITEXT2_VALID)  # real text, linked, never copied into the project
    held_out = "".join(SHARED_WIKITEXT2_VALID.read_text().splitlines(keepends=True)[:120])  # a small evaluation slice
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(held_out)
    overrides = [
        *SMOKE,
        "dataset=wikitext2",
        f"dataset.path={folder}",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "optim.lr=3e-3",
        "model.output=adaptive",
        "model.adaptive_cutoffs=[2000,8000]",
        "model.d_model=64",
    ]
    r = train(compose_config(overrides, tmp_path), RunInfo(str(tmp_path / "run")))
    assert r["status"] == "finished"
    vocab = 13777  # the split's own vocabulary, <eos> included
    assert r["metrics"]["val/ppl"] < vocab / 10  # learnt much more than a uniform guess over the vocabulary
