"""Learned windows: the blocked kernel's soft span mask against a dense reference written here (outputs and the
gradients of q, k, v and the spans), its cost following the spans, and a learned run end to end."""

import dataclasses
import json

import pytest
import torch
import yaml

from helpers.attention import fixed_grad_out, make_inputs
from helpers.runs import compose_config
from mswa import run as run_module
from mswa.attention import blocked, window_attention
from mswa.checks import check_config
from mswa.evaluate import load_run
from mswa.factory import build_schedule, learned_spans
from mswa.model import LanguageModel, ModelConfig
from mswa.rules import ConfigError
from mswa.run import RunInfo, train
from mswa.windows import attended_pairs, mswa_budget


def dense_soft_reference(q, k, v, spans, ramp, caps):
    """Every score plus log clamp((z + R - d) / R, 0, 1) at lag d >= 0 below the cap; -inf elsewhere."""
    n = q.shape[2]
    lag = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).to(q.dtype)
    cap = torch.tensor([n if c is None else c for c in caps], dtype=q.dtype)[:, None, None]
    weight = ((spans[:, None, None] + ramp - lag) / ramp).clamp(0, 1)
    visible = (lag >= 0) & (lag < cap) & (weight > 0)
    # log of 1 where masked, so that no inf * 0 gradient arises there
    log_mask = torch.where(visible, torch.log(torch.where(visible, weight, 1.0)), float("-inf"))
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = q @ k.mT / q.shape[-1] ** 0.5 + log_mask
    return torch.softmax(scores, dim=-1) @ v


# spans off the integers: at z = d the mask has a kink whose one-sided derivative is a convention
CASES = {  # batch, heads, kv heads, n, caps, spans, ramp
    "spans inside their caps, several bands": (2, 4, 4, 70, [64, 64, 64, 64], [3.5, 20.25, 0.1, 40.7], 8.0),
    "a span whose ramp passes N": (1, 3, 3, 40, [None, 80, 16], [35.2, 50.5, 2.2], 6.0),
    "span truncated by its cap": (1, 2, 2, 50, [10, 30], [9.4, 3.6], 4.0),
    "grouped-query k/v, ramp 1": (2, 4, 2, 45, [32, 32, 32, 32], [5.5, 5.5, 12.4, 0.3], 1.0),
    "several chunks per row": (1, 2, 2, 300, [128, 128], [60.3, 100.5], 16.0),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_soft_spans_match_the_dense_reference_forward_and_backward(case, monkeypatch, threads):
    batch, heads, kv_heads, n, caps, spans, ramp = case
    monkeypatch.setattr(blocked, "CHUNK_BYTES", 16 * 32 * 8 * 40)  # small chunks: pieces of rows too
    q, k, v = make_inputs(batch, heads, kv_heads, n, 8)
    results = []
    kernel = lambda q, k, v, z: window_attention(q, k, v, caps, spans=z, ramp=ramp)  # noqa: E731
    for fn in (kernel, lambda *x: dense_soft_reference(*x, ramp, caps)):
        z = torch.tensor(spans, dtype=torch.float64, requires_grad=True)
        out = fn(q, k, v, z)
        results.append((out, *torch.autograd.grad(out, (q, k, v, z), fixed_grad_out(out))))
    for name, got, want in zip(("out", "grad q", "grad k", "grad v", "grad spans"), *results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert results[1][4].abs().sum() > 0  # the spans do get a gradient


def test_the_cost_follows_the_spans_not_the_caps():
    """A head's band is its current window ceil(z + R): blocks beyond it are never computed."""
    caps = [256, 256, 256, 256]
    spans = torch.tensor([3.0, 20.5, 0.0, 200.0])
    assert blocked.soft_windows(spans, 4.0, caps, 1024) == [7, 25, 4, 204]
    assert blocked.soft_windows(spans, 4.0, caps, 100) == [7, 25, 4, 100]
    plans = []
    original = blocked._BandAttention.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocked._BandAttention, "apply", lambda *args: plans.append(args[3]) or original(*args))
        q, k, v = make_inputs(1, 4, 4, 128, 8, torch.float32)
        window_attention(q, k, v, caps, spans=spans, ramp=4.0)
    assert [band.window for band in plans[0].bands] == [7, 25, 4, 128]
    # keys per query block: window 7 and 4 -> 16 + 16, window 25 -> 32 + 32; the cap's band would be 256 + 32
    assert [band.span for band in plans[0].bands[:3]] == [32, 64, 32]


def tiny_learned_model(budget=0.6, w=16, n=128):
    spans = {"ramp": 4, "budget": budget, "w": w, "rate": 0.1, "penalty": 100.0}
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=16, max_seq_len=n, windows=[[4 * w] * 2] * 2, learned_spans=spans)
    return LanguageModel(cfg)


def test_spans_start_at_the_budget_and_the_multiplier_drives_them_to_a_new_one():
    model = tiny_learned_model()
    assert model.soft_pairs_vs_swa().item() == pytest.approx(0.6, abs=1e-4)
    model.cfg.learned_spans["budget"] = 0.35  # from above the budget
    optimizer = torch.optim.Adam([p for name, p in model.named_parameters() if "span" in name], lr=0.02)
    for _ in range(300):
        term, logged = model.training_penalty()
        optimizer.zero_grad()
        (term - 0.5 * model.soft_pairs_vs_swa()).backward()  # a loss that gains 0.5 per unit of budget pulls up
        optimizer.step()
    # the constrained optimum: the budget held, the multiplier at the price of budget (0.5)
    assert model.soft_pairs_vs_swa().item() == pytest.approx(0.35, abs=0.005)
    assert logged["train/span_multiplier"] == pytest.approx(0.5, abs=0.25)


@pytest.mark.parametrize("long_head", [2.0, 5.0], ids=["near the budget", "far above it"])
def test_hardened_windows_meet_the_budget_and_replace_the_soft_mask(long_head):
    model = tiny_learned_model()
    with torch.no_grad():
        model.blocks[0].mixer.span_logits.copy_(torch.tensor([-3.0, long_head]))  # one short head, one long
    target = 0.6 * 4 * attended_pairs(16, 128)
    windows = model.harden_spans()
    assert sum(attended_pairs(w, 128) for row in windows for w in row) <= target
    assert windows[0][0] < windows[0][1] <= 64 and not model.learned_attention()
    x = torch.randint(0, 256, (1, 128))
    hard = LanguageModel(dataclasses.replace(model.cfg, learned_spans=None, windows=windows))
    hard.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model.token_nll(x, x), hard.token_nll(x, x))  # plain windowed attention now


def test_a_learned_run_writes_its_hardened_schedule_beside_results(tmp_path, monkeypatch):
    on_disk, harden = [], run_module.Attempt.evaluate_hardened

    def harden_then_read(attempt, *args):
        harden(attempt, *args)
        on_disk.append(json.loads((tmp_path / "learned" / "results.json").read_text())["status"])

    monkeypatch.setattr(run_module, "HEARTBEAT_EVERY_S", 0.0)  # a heartbeat at every batch, the hardened evaluation's too
    monkeypatch.setattr(run_module.Attempt, "evaluate_hardened", harden_then_read)
    overrides = ["debug=smoke", "dataset.loader.n_bytes=60000", "window_schedule=learned", "trainer.max_steps=3"]
    results = train(compose_config(overrides, tmp_path), RunInfo(str(tmp_path / "learned")))
    assert results["status"] == "finished", results["error"]
    assert on_disk == ["running"]  # not "finished" before the final numbers: a run killed there would claim the caps' windows
    learned = results["learned"]
    assert results["budget"]["pairs_vs_swa"] <= learned["budget_target"] + 1e-12  # mswa's at this shape and length
    assert learned["budget_target"] == pytest.approx(mswa_budget(16, 4, 4, 64))
    assert set(learned["hardened_minus_soft"]) == set(results["metrics"])
    assert results["metrics"]["test/loss"] - learned["soft_metrics"]["test/loss"] == learned["hardened_minus_soft"]["test/loss"]
    schedule = yaml.safe_load((tmp_path / "learned" / "learned_synthetic.yaml").read_text())
    assert schedule["kind"] == "custom" and schedule["windows"] == results["windows"]
    _, task, _ = load_run(tmp_path / "learned")  # evaluate, sample and allocate see the hardened windows
    assert [block.mixer.windows for block in task.model.blocks] == results["windows"] and not task.model.learned_attention()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("window_schedule.ramp=0", "window_schedule.ramp=0 must be an integer >= 1 below the cap 64"),
        ("window_schedule.ramp=64", "window_schedule.ramp=64 must be an integer >= 1 below the cap 64"),
        ("window_schedule.budget_rate=-1", "window_schedule.budget_rate=-1.0 must be a number >= 0"),
        ("window_schedule.budget=9", "window_schedule.budget=9.0 must lie in (0, 2.3009)"),
    ],
)
def test_bad_learned_settings_are_refused_in_one_sentence(tmp_path, override, message):
    settings = check_config(compose_config(["debug=smoke", "window_schedule=learned", override], tmp_path))
    with pytest.raises(ConfigError) as refused:
        learned_spans(settings, build_schedule(settings))
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
