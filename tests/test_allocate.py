"""Searched windows (python -m mswa.allocate): the exact choice against brute force, a tiny run profiled and its
schedule trained with one override, and the refusals (one sentence, nothing written)."""

import hashlib
import itertools
import json
import random
import shutil

import pytest
import yaml

from helpers.runs import compose_config
from mswa.allocate import AllocationError, allocate, check_source_windows, choose_windows, main
from mswa.run import RunInfo, train
from mswa.windows import attended_pairs, make_schedule, mswa_budget


def brute_force(options, capacity):
    """The least total loss over every combination within capacity (None when none fits)."""
    best = None
    for combo in itertools.product(*options):
        cost, loss = sum(c for c, _ in combo), sum(lo for _, lo in combo)
        if cost <= capacity and (best is None or loss < best):
            best = loss
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_choice_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    seq_len = 64
    windows = [2, 4, 8, 16, 32]
    # costs are real attended pairs; losses fall with the window, as a head's do, but unevenly
    options = [[(attended_pairs(w, seq_len), rng.random() / (1 + i) ** rng.random()) for i, w in enumerate(windows)] for _ in range(5)]
    capacity = rng.randint(5 * attended_pairs(2, seq_len), 5 * attended_pairs(32, seq_len))
    picks, cost, loss = choose_windows(options, capacity)
    assert cost == sum(options[i][p][0] for i, p in enumerate(picks)) <= capacity
    assert loss == pytest.approx(sum(options[i][p][1] for i, p in enumerate(picks)))
    assert loss == pytest.approx(brute_force(options, capacity))


def test_nothing_fits_is_refused():
    with pytest.raises(AllocationError, match="no choice of windows fits"):
        choose_windows([[(5, 0.0)], [(5, 0.0)]], 9)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A few steps of full attention on the small synthetic corpus (windows >= any candidate)."""
    tmp = tmp_path_factory.mktemp("allocate")
    results = train(compose_config(["debug=smoke", "dataset.loader.n_bytes=60000", "model=full"], tmp), RunInfo(str(tmp / "full")))
    assert results["status"] == "finished", results["error"]
    return tmp / "full"


def test_a_searched_schedule_meets_its_budget_and_trains_with_one_override(source_run, tmp_path, capsys):
    conf = tmp_path / "conf" / "window_schedule"
    out = allocate(str(source_run), "mswa", "4,16,64", 1, str(conf / "searched_tiny.yaml"))  # not the repo's file
    text = out.read_text()
    budget = mswa_budget(16, 4, 4, 64)  # debug=smoke: w=16, 4 x 4 heads, seq_len=64
    assert hashlib.sha256((source_run / "results.json").read_bytes()).hexdigest() in text
    assert "candidates: [4, 16, 64]" in text and "dynamic programming" in text and "1 validation batch(es)" in text
    schedule = yaml.safe_load(text)
    assert schedule["name"] == "searched_tiny" and schedule["kind"] == "custom"  # named by its file
    built = make_schedule("custom", w=16, n_layer=4, n_head=4, windows=schedule["windows"])
    assert built.budget(64)["pairs_vs_swa"] <= budget + 1e-12
    assert {w for row in schedule["windows"] for w in row} <= {4, 16, 64}
    shown = capsys.readouterr().out
    assert "exact forward passes over them in" in shown  # how many, and how long
    # off a terminal (here), one line per layer instead of a bar: 1 + 4 layers x 4 heads x 3 candidates = 49 passes
    assert [line.split(",")[0] for line in shown.splitlines() if line.startswith("profiled layer")] == [
        f"profiled layer {layer}/4: {1 + 12 * layer}/49 passes" for layer in range(1, 5)
    ]

    overrides = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "window_schedule=searched_tiny"]
    cfg = compose_config(["debug=smoke", "dataset.loader.n_bytes=60000", "trainer.max_steps=2", *overrides], tmp_path)
    results = train(cfg, RunInfo(str(tmp_path / "searched")))
    assert results["status"] == "finished", results["error"]
    assert results["windows"] == schedule["windows"] and results["schedule"] == "searched_tiny"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "0"], "--budget 0 must be a number > 0"),
        (["--budget", "9"], "outside what the candidates"),
        (["--budget", "1", "--candidates", "8,x"], "must be positive integers"),
        (["--budget", "1", "--candidates", "0,8"], "must be positive integers"),
        (["--budget", "1", "--checkpoint", "missing.ckpt"], "is not a file"),
    ],
)
def test_bad_input_is_one_sentence_and_writes_nothing(source_run, tmp_path, capsys, args, message):
    out = tmp_path / "s.yaml"
    with pytest.raises(SystemExit) as stop:
        main([str(source_run), "--out", str(out), "--batches", "1", *args])
    assert message in str(stop.value) and str(stop.value).count("\n") == 0
    assert not out.exists()


def test_a_run_without_checkpoints_or_with_narrow_windows_is_refused(source_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(source_run / "results.json", bare / "results.json")
    with pytest.raises(ValueError, match="does not exist"):
        allocate(str(bare), "1", None, 1, str(tmp_path / "s.yaml"))
    with pytest.raises(AllocationError, match="smaller than the largest candidate 64"):
        check_source_windows([[16, None], [64, 64]], 64)
    assert json.loads((bare / "results.json").read_text())["status"] == "finished" and not (tmp_path / "s.yaml").exists()
