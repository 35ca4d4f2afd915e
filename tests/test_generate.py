"""Incremental decoding of the project's models (mswa.generate) and the sampling command (mswa.sample).

The reference for decoding is one full forward pass of the same model over the whole sequence (the
training kernels); cache sizes are checked against the closed form written out here."""

import shutil
import subprocess
import sys

import pytest
import torch

import mswa.generate as generate_module
from helpers.data import write_word_corpus
from helpers.runs import REPO, TINY_DATA, compose_config, run_bench
from mswa import native
from mswa.generate import DecodingCache, KVStore, cache_bytes, generate, sample_next
from mswa.model import LanguageModel, ModelConfig
from mswa.run import RunInfo, train
from mswa.sample import main as sample_main
from mswa.windows import make_schedule

VOCAB, LAYERS, HEADS, D_MODEL = 40, 4, 4, 32
HEAD_DIM = D_MODEL // HEADS
LENGTH, PROMPT = 48, 5  # past the largest window of every case: its rings wrap, the small ones many times
CASES = {  # name -> ModelConfig keywords
    "full": {},
    "swa": {"windows": make_schedule("uniform", w=6, n_layer=LAYERS, n_head=HEADS).as_lists()},
    "mswa": {"windows": make_schedule("mswa", w=4, n_layer=LAYERS, n_head=HEADS).as_lists()},  # windows 1..16
    # W = 1 (no keys kept), W >= the length, non-contiguous groups, full heads beside windowed ones
    "custom": {"windows": [[1, 1, 1, 1], [1, 100, 1, 100], [None, 3, None, 3], [2, 7, 48, 5]]},
    "hybrid": {"windows": make_schedule("mswa", w=4, n_layer=LAYERS, n_head=HEADS).as_lists(), "mixer": "hybrid"},
    "hybrid_parallel": {"windows": [[1, 2, 3, 4]] * LAYERS, "mixer": "hybrid", "layout": "parallel"},
    "linear_taylor": {"mixer": "linear", "linear_feature_map": "taylor", "linear_feature_dim": 4},
    "learned_positions": {"windows": [[3, 5, 3, 5]] * LAYERS, "positions": "learned"},
    "adaptive_output": {"windows": [[2, 4, 8, 16]] * LAYERS, "output": "adaptive", "adaptive_cutoffs": [10, 20]},
}


def tiny_model(**kwargs) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, d_model=D_MODEL, max_seq_len=64, **kwargs)).eval()


def expected_bytes(cfg: ModelConfig, seen: int, batch: int) -> int:
    """Per attention layer, per head: min(seen, W) keys and values (full heads: seen); per linear layer,
    the fp32 running sums heads x (M x head_dim + M), M the mapped feature size."""
    total = 0
    for layer in range(cfg.n_layer):
        kind = cfg.layer_mixer(layer)
        if kind != "linear":
            windows = cfg.windows[layer] if cfg.windows else [None] * cfg.n_head
            total += batch * sum(seen if w is None else min(seen, w) for w in windows) * 2 * HEAD_DIM * 4
        if kind != "window":
            features = cfg.linear_feature_dim if cfg.linear_feature_map == "elu" else 1 + cfg.linear_feature_dim**2 + cfg.linear_feature_dim
            total += batch * cfg.n_head * (features * HEAD_DIM + features) * 4
    return total


def decode_step_by_step(model, ids, prompt, cache):
    """Logits of the prompt in one call, then of every later token fed one at a time."""
    with torch.no_grad():
        return torch.cat([model(ids[:, :prompt], cache)] + [model(ids[:, t : t + 1], cache) for t in range(prompt, ids.shape[1])], 1)


ATTENTION_PATHS = {  # (native kernel, ONE_CALL_SCORES, PRODUCTS_FROM_KEYS, batch): each decoding path forced
    "a fused call per window group": (False, 0, 1 << 30, 2),
    "batched products per window group": (False, 0, 0, 2),
    "one masked call per layer": (False, 1 << 30, 1 << 30, 1),  # one sequence only
    "the native ring step, one sequence": (True, 0, 0, 1),
    "the native ring step, several sequences": (True, 0, 0, 3),
}


@pytest.mark.parametrize("path", sorted(ATTENTION_PATHS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_by_step_logits_equal_one_forward_pass_at_every_position(case, path, monkeypatch):
    use_native, one_call_scores, products_from_keys, batch = ATTENTION_PATHS[path]
    if use_native and native.kernel() is None:
        pytest.skip("the native CPU kernels could not be built here (no compiler, or MSWA_NATIVE=0)")
    if not use_native:
        monkeypatch.setattr(native, "kernel", lambda: None)
    monkeypatch.setattr(generate_module, "ONE_CALL_SCORES", one_call_scores)
    monkeypatch.setattr(generate_module, "PRODUCTS_FROM_KEYS", products_from_keys)
    model = tiny_model(**CASES[case])
    ids = torch.randint(0, VOCAB, (batch, LENGTH))
    cache = DecodingCache(model, reserve=LENGTH)
    stepped = decode_step_by_step(model, ids, PROMPT, cache)
    with torch.no_grad():
        torch.testing.assert_close(stepped, model(ids), rtol=0, atol=1e-5)
    assert cache.seen == LENGTH
    assert cache.nbytes()["total"] == expected_bytes(model.cfg, LENGTH, batch) == cache_bytes(model.cfg, LENGTH, batch)["total"]


def test_chunks_continue_the_cache_like_single_tokens():
    model = tiny_model(**CASES["hybrid_parallel"])
    ids = torch.randint(0, VOCAB, (1, LENGTH))
    cache = DecodingCache(model)
    with torch.no_grad():
        chunked = torch.cat([model(ids[:, a:b], cache) for a, b in ((0, 3), (3, 20), (20, 21), (21, LENGTH))], 1)
        torch.testing.assert_close(chunked, model(ids), rtol=0, atol=1e-5)


def test_windowed_cache_is_exactly_the_windows_and_stays_flat():
    model = tiny_model(**CASES["mswa"])
    sizes = []
    cache = DecodingCache(model)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 20)), cache)
        for step in range(180):
            model(torch.randint(0, VOCAB, (1, 1)), cache)
            if step in (79, 179):
                sizes.append(cache.nbytes()["kv"])
    windows = [w for layer in CASES["mswa"]["windows"] for w in layer]
    assert sizes == [sum(windows) * 2 * HEAD_DIM * 4] * 2  # every ring full, none larger


def test_mswa_over_swa_cache_is_the_sum_of_windows_the_budget(capsys):
    shape = dict(vocab_size=256, n_layer=8, n_head=8, d_model=256)
    mswa, swa = (make_schedule(name, w=128, n_layer=8, n_head=8) for name in ("mswa", "uniform"))
    ratio = (
        cache_bytes(ModelConfig(windows=mswa.as_lists(), **shape), 32768)["kv"]
        / cache_bytes(ModelConfig(windows=swa.as_lists(), **shape), 32768)["kv"]
    )
    windows = [w for layer in mswa.windows for w in layer]
    assert ratio == pytest.approx(sum(windows) / (64 * 128), abs=1e-12)
    print(f"mswa / swa cache {ratio:.3f} vs budget {mswa.mean_window_over_w():.3f}")
    assert round(ratio, 3) == round(mswa.mean_window_over_w(), 3) == 0.879


def test_ring_buffer_keeps_the_last_w_minus_1_positions_in_order():
    store, seen = KVStore(limit=5), []

    def positions(a, b):  # key = value = the position, one head, one feature
        return torch.arange(a, b, dtype=torch.float32).view(1, 1, -1, 1)

    for a, b in ((0, 2), (2, 3), (3, 11), (11, 12), (12, 13), (13, 14), (14, 30), (30, 31)):
        keys, values = store.extend(positions(a, b), positions(a, b))
        expected = seen[-5:] + list(range(a, b))
        assert keys.flatten().tolist() == values.flatten().tolist() == expected
        seen += list(range(a, b))
        assert store.keys.shape[2] <= 5 and store.stored == min(len(seen), 5)
    assert store.keys.shape[2] == 5
    full = KVStore(limit=None)
    full.extend(positions(0, 3), positions(0, 3))
    assert full.extend(positions(3, 4), positions(3, 4))[0].flatten().tolist() == [0, 1, 2, 3]
    nothing = KVStore(limit=0)  # window 1: the query sees only itself
    assert nothing.extend(positions(0, 4), positions(0, 4))[0].flatten().tolist() == [0, 1, 2, 3]
    assert nothing.extend(positions(4, 5), positions(4, 5))[0].flatten().tolist() == [4] and nothing.nbytes() == 0


def test_sampling_rules():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]))
    generator = torch.Generator().manual_seed(0)

    def drawn(**kwargs):
        return {tuple(sample_next(logits, generator=generator, **kwargs).tolist()) for _ in range(300)}

    assert drawn(temperature=0) == {(0, 2)}
    assert drawn(top_k=1) == {(0, 2)}
    assert drawn(top_p=0.5) == {(0, 2)}  # 0.6 and 0.7 alone reach the mass
    assert {row[0] for row in drawn(top_p=0.8)} == {0, 1}  # 0.6 + 0.3 needed; 0.1 never
    assert {row[0] for row in drawn(top_k=2)} == {0, 1}
    assert {row[0] for row in drawn()} == {0, 1, 2}


def test_generate_greedy_matches_rerunning_the_whole_sequence_and_seeds_repeat():
    model = tiny_model(**CASES["mswa"]).train()
    prompt = torch.randint(0, VOCAB, (2, 7))
    expected = prompt
    with torch.no_grad():
        for _ in range(40):
            expected = torch.cat([expected, model.eval()(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    model.train()
    assert torch.equal(generate(model, prompt, 40, temperature=0), expected)
    assert model.training  # put back as it was
    first, again = (generate(model, prompt, 30, top_k=10, top_p=0.9, seed=3) for _ in range(2))
    assert torch.equal(first, again) and first.shape == (2, 37)
    assert not torch.equal(first, generate(model, prompt, 30, top_k=10, top_p=0.9, seed=4))


# ----------------------------------------------------------------------------- python -m mswa.sample


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A real (tiny) training run on the synthetic corpus, with learned positions (64 of them)."""
    tmp = tmp_path_factory.mktemp("byte_run")
    cfg = compose_config(["debug=smoke", *TINY_DATA, "logger=none", "model.positions=learned"], tmp)
    train(cfg, RunInfo(str(tmp / "run")))
    return tmp / "run"


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("word_run")
    folder = write_word_corpus(tmp / "wt")
    cfg = compose_config(
        [
            "debug=smoke",
            "logger=none",
            "dataset=wikitext2",
            f"dataset.path={folder}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ],
        tmp,
    )
    train(cfg, RunInfo(str(tmp / "run")))
    return tmp / "run"


def sample_text(run, *args, capsys):
    sample_main([str(run), *args])
    return capsys.readouterr().out.rstrip("\n")


def test_sampling_a_byte_run_continues_the_prompt(byte_run, capsys):
    text = sample_text(byte_run, "--prompt", "the cat ", "--max-new-tokens", "40", "--temperature", "0", capsys=capsys)
    assert text.startswith("the cat ") and len(text.encode("utf-8", errors="surrogateescape")) >= len("the cat ")
    again = sample_text(
        byte_run, "--prompt", "the cat ", "--max-new-tokens", "40", "--temperature", "0", "--checkpoint", "last", capsys=capsys
    )
    assert again.startswith("the cat ")
    seeded = [sample_text(byte_run, "--prompt", "ab", "--max-new-tokens", "20", "--seed", "5", capsys=capsys) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_sampling_a_word_run_speaks_its_vocabulary(word_run, capsys):
    text = sample_text(word_run, "--prompt", "w1 w2 w3", "--max-new-tokens", "30", capsys=capsys)
    words = text.split()
    assert words[:3] == ["w1", "w2", "w3"] and len(words) > 3
    vocabulary = set((word_run.parent / "wt" / "wiki.train.tokens").read_text().split())
    assert set(words) <= vocabulary  # <eos> comes out as a line end
    with pytest.raises(SystemExit, match=r"prompt word 'zebra' is not in the wikitext-2 vocabulary"):
        sample_main([str(word_run), "--prompt", "w1 zebra", "--max-new-tokens", "3"])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--prompt", "x" * 60, "--max-new-tokens", "5"],
            r"prompt of 60 tokens \+ max_new_tokens=5 = 65 tokens exceeds model.max_seq_len=64 of this learned-position model",
        ),
        (["--prompt", "", "--max-new-tokens", "5"], "the prompt is empty"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens=0 must be an integer >= 1"),
        (["--prompt", "x", "--top-p", "0"], r"top_p=0.0 must be a number in \(0, 1\]"),
        (["--prompt", "x", "--top-p", "1.5"], r"top_p=1.5 must be a number in \(0, 1\]"),
        (["--prompt", "x", "--top-k", "0"], "top_k=0 must be an integer >= 1"),
        (["--prompt", "x", "--temperature", "-1"], "temperature=-1.0 must be a finite number >= 0"),
    ],
)
def test_bad_input_is_one_sentence(byte_run, args, message):
    with pytest.raises(SystemExit, match=f"^error: {message}") as stop:
        sample_main([str(byte_run), *args])
    assert stop.value.code.count(". ") == 0 and "\n" not in stop.value.code


def test_a_run_without_checkpoints_is_refused_before_any_work(byte_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(byte_run, bare, ignore=shutil.ignore_patterns("*.ckpt"))
    proc = subprocess.run(
        [sys.executable, "-m", "mswa.sample", str(bare), "--prompt", "x"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"error: --checkpoint best but {bare}/checkpoints/best.ckpt does not exist; "
        "pass --checkpoint last or --checkpoint <path of a .ckpt>"
    )
    with pytest.raises(SystemExit, match="holds neither results.json with a config nor .hydra/config.yaml"):
        sample_main([str(tmp_path), "--prompt", "x"])


def test_generate_benchmark_runs_at_tiny_size_and_reports_exact_flat_caches(tmp_path):
    out = tmp_path / "generate.json"
    rows, stdout = run_bench("generate", out, "--batch", "2")
    assert [(r["model"], r["context"]) for r in rows] == [(m, n) for m in ("full", "swa", "mswa", "mswa_linear") for n in (64, 256)]
    for row in rows:
        assert row["reached"] == row["context"] and row["latency_s"] > 0 and row["tokens_per_s"] == 2 / row["latency_s"]
        assert row["cache_bytes"] == row["cache_bytes_closed_form"]  # of two sequences
        assert row["latency_vs_swa"] > 0 and len(row["samples_s"]) == row["runs"]
    kv = {(r["model"], r["context"]): r["cache_bytes"]["kv"] for r in rows}
    assert kv[("swa", 64)] == kv[("swa", 256)] and kv[("mswa", 64)] == kv[("mswa", 256)] < kv[("swa", 64)]
    assert kv[("full", 256)] > kv[("full", 64)]
    assert "mswa / swa cache bytes" in stdout
    # a step reads the same parameters for every model of one shape, and its caches; its FLOPs differ by the keys
    # attended: 4 x head_dim FLOPs per key against 2 x head_dim x 4 bytes stored per key (fp32)
    row = {(r["model"], r["context"]): r for r in rows}
    for n in (64, 256):
        swa, mswa = row[("swa", n)], row[("mswa", n)]
        parameters = {r["step_bytes"] - r["cache_bytes"]["total"] for r in (swa, mswa, row[("full", n)])}
        assert len(parameters) == 1 and parameters.pop() > 0
        assert swa["step_flops"] - mswa["step_flops"] == pytest.approx((swa["cache_bytes"]["kv"] - mswa["cache_bytes"]["kv"]) / 2)
        assert mswa["bytes_vs_swa"] == mswa["step_bytes"] / swa["step_bytes"] and swa["flops_vs_swa"] == 1.0
    assert "bytes/swa" in stdout
