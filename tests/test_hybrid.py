"""Linear attention and window/linear hybrids as models: configs, layouts, training, stability."""

import json
import math

import torch

from helpers.runs import SCHEDULES, TINY_DATA, compose_config, run_train
from mswa.config import parse_config
from mswa.data.synthetic import load as load_synthetic
from mswa.factory import build_model, build_schedule, model_spec
from mswa.model import LanguageModel, LinearAttention, ModelConfig, ParallelHybridAttention, WindowedSelfAttention

HYBRIDS = ["swa_linear", "mswa_linear", "swa_linear_parallel", "mswa_linear_parallel"]


def test_every_hybrid_and_schedule_composes_and_builds(tmp_path):
    corpus = load_synthetic(str(tmp_path / "data"), n_bytes=20000)
    combos = [("linear", None)] + [(m, s) for m in HYBRIDS for s in SCHEDULES]
    for model, schedule in combos:
        picked = [f"window_schedule={schedule}"] if schedule else []
        cfg = compose_config([f"model={model}", *picked, "model.n_layer=8", "model.d_model=32", "seq_len=32"], tmp_path)
        settings = parse_config(cfg)
        lm = build_model(settings.model, model_spec(settings, corpus.vocab_size, build_schedule(settings)))
        assert torch.isfinite(lm(torch.randint(0, 256, (2, 32)))).all(), (model, schedule)


def mixers(model: LanguageModel) -> list[type]:
    return [type(block.mixer) for block in model.blocks]


def test_layouts_build_the_stated_layers():
    interleave = LanguageModel(ModelConfig(n_layer=4, d_model=32, n_head=4, mixer="hybrid", windows=[[4] * 4] * 4))
    assert mixers(interleave) == [LinearAttention, WindowedSelfAttention] * 2
    custom = LanguageModel(ModelConfig(n_layer=3, d_model=32, n_head=4, mixer="hybrid", pattern=["window", "window", "linear"]))
    assert mixers(custom) == [WindowedSelfAttention, WindowedSelfAttention, LinearAttention]
    parallel = LanguageModel(ModelConfig(n_layer=2, d_model=32, n_head=4, mixer="hybrid", layout="parallel"))
    assert mixers(parallel) == [ParallelHybridAttention] * 2
    assert mixers(LanguageModel(ModelConfig(n_layer=2, d_model=32, n_head=4, mixer="linear"))) == [LinearAttention] * 2


def test_parallel_gate_mixes_window_and_linear_outputs():
    torch.manual_seed(0)
    mixer = ParallelHybridAttention(ModelConfig(n_layer=1, d_model=32, n_head=4), [2, 2, 8, 8])
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        mixer.gate.fill_(30.0)  # sigmoid -> 1: pure window attention
        assert torch.allclose(mixer(x), WindowedSelfAttention.forward(mixer, x), atol=1e-6)
        mixer.gate.fill_(0.0)
        assert not torch.allclose(mixer(x), WindowedSelfAttention.forward(mixer, x), atol=1e-3)


def test_large_input_scale_stays_finite():
    torch.manual_seed(0)
    for layout in ("interleave", "parallel"):
        model = LanguageModel(ModelConfig(n_layer=2, d_model=32, n_head=4, mixer="hybrid", layout=layout, windows=[[4] * 4] * 2))
        for block in model.blocks:
            x = (1000 * torch.randn(2, 64, 32)).requires_grad_()
            out = block.mixer(x)
            out.square().mean().backward()
            assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), layout


def test_hybrids_of_both_layouts_smoke_train_through_train_py(tmp_path):
    run_train(["-m", "model=linear,mswa_linear,mswa_linear_parallel", "debug=smoke", *TINY_DATA], tmp_path)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("results.json")]
    assert sorted(r["model"] for r in runs) == ["linear", "mswa_linear", "mswa_linear_parallel"]
    for r in runs:
        assert r["status"] == "finished" and math.isfinite(r["metrics"]["val/bpc"]), r
