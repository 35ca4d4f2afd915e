"""experiment=cpu composes and builds with every sweep; the data-repetition warning; variant identity; the
report's references and paired intervals on rows made from the real configs."""

import itertools
import statistics

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers.runs import REPO, run_train
from mswa.checks import check_config
from mswa.data.synthetic import SyntheticSettings
from mswa.factory import build_model, build_schedule, model_spec
from mswa.sweeps import comparison_id, continue_job, repetition_warning, training_tokens, variant_id, variant_name

SWEEPS = sorted(p.stem for p in (REPO / "sweep").glob("*.yaml"))


def compose_plain(overrides, hydra=False):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.data_dir=/tmp/unused", *overrides], return_hydra_config=hydra)
    return cfg if hydra else OmegaConf.to_container(cfg, resolve=True)


def sweep_jobs(name, *extra):
    params = compose_plain([f"+sweep={name}", *extra], hydra=True).hydra.sweeper.params
    grid = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
    return list(itertools.product(*grid))


@pytest.mark.parametrize("name", SWEEPS)
def test_cpu_experiment_composes_checks_and_builds_with_every_sweep(name):
    for job in sweep_jobs(name, "experiment=cpu"):
        cfg = compose_plain(["experiment=cpu", f"+sweep={name}", *job])
        settings = check_config(cfg)
        model = build_model(settings.model, model_spec(settings, 256, build_schedule(settings)))
        assert model.n_params() > 0
        assert cfg["dataset"]["name"] == "synthetic"
        # one pass at most: the corpus is sized for the run (see conf/experiment/cpu.yaml)
        settings = {k: v for k, v in cfg["dataset"]["loader"].items() if k not in ("_target_", "data_dir")}
        assert repetition_warning(cfg, SyntheticSettings(**settings).split_sizes["train"]) is None, job


def test_cpu_experiment_leaves_other_datasets_alone():
    cfg = compose_plain(["experiment=cpu", "dataset=enwik8", "dataset.loader.split_fractions=[0.9,0.05,0.05]"])
    assert cfg["dataset"]["name"] == "enwik8" and "n_bytes" not in cfg["dataset"]["loader"]
    assert cfg["seq_len"] == compose_plain(["experiment=cpu"])["seq_len"]  # the experiment's other settings stay


def small_cfg(steps=10, batch=4, seq_len=64, accumulate=1, devices=1, nodes=1):
    return {
        "seq_len": seq_len,
        "data": {"batch_size": batch},
        "dataset": {"name": "synthetic"},
        "trainer": {"max_steps": steps, "accumulate_grad_batches": accumulate},
        "hardware": {"accelerator": "cpu", "devices": devices, "num_nodes": nodes},
    }


def test_repetition_warning_counts_every_token_read():
    cfg = small_cfg()  # 10 steps x 4 x 64 = 2560 tokens
    assert training_tokens(cfg) == 2560
    assert repetition_warning(cfg, 2560) is None
    assert repetition_warning(cfg, 100_000) is None
    message = repetition_warning(cfg, 1280)
    assert message.startswith("warning: training reads 2,560 tokens, 2.0 passes over the 1,280-token train split")
    assert "1.0 passes" in repetition_warning(cfg, 2559)
    # accumulation and processes multiply what is read
    assert training_tokens(small_cfg(accumulate=2, devices=2, nodes=3)) == 2560 * 12
    assert repetition_warning(small_cfg(devices=2), 4000) is not None


def test_a_run_over_its_data_warns_once(tmp_path):
    # debug=smoke reads 6 x 4 x 64 = 1536 tokens; 90% of n_bytes is the train split. (A run within its data
    # stays silent: tests/test_sweep_protocol.py checks that on its real runs.)
    over = run_train(["debug=smoke", "logger=none", "dataset.loader.n_bytes=1200"], tmp_path)
    assert over.stderr.count("warning: training reads") == 1
    assert "1,536 tokens, 1.4 passes over the 1,080-token train split of 'synthetic'" in over.stderr


def test_variant_identity_ignores_spelling_seed_and_places_not_settings():
    swa = compose_plain(["model=swa"])
    assert variant_id(swa) == variant_id(compose_plain(["model=swa", "window_schedule=uniform"]))
    assert variant_id(compose_plain(["model=mswa"])) == variant_id(compose_plain(["model=swa", "window_schedule=mswa"]))
    same = ["seed=3", "paths.data_dir=/elsewhere", "paths.log_dir=/x", "logger=csv", "hardware=ddp_cpu", "torch_threads=1"]
    assert variant_id(swa) == variant_id(compose_plain(["model=swa", *same]))
    for different in (
        ["window=64"],
        ["model=mswa"],
        ["trainer.max_steps=7"],
        ["dataset.loader.n_bytes=5000"],
        ["window_schedule=uniform_mswa_budget"],
        ["eval.stride=128"],
    ):
        assert variant_id(swa) != variant_id(compose_plain(["model=swa", *different])), different
    # the comparison id leaves out only the attention: full, swa, mswa and swa at mswa's budget share it
    ids = {
        comparison_id(compose_plain(o))
        for o in (["model=full"], ["model=swa"], ["model=mswa"], ["model=swa", "window_schedule=uniform_mswa_budget"])
    }
    assert len(ids) == 1
    assert comparison_id(swa) != comparison_id(compose_plain(["model=swa", "window=64"]))


# one per variant of the synthetic and WikiText-2 protocol (cpu_*), written before schedules had a kind
STORED_RUNS = sorted((REPO / "sweep" / "results").glob("cpu_*/*seed=0*/results.json"))


@pytest.mark.parametrize("path", STORED_RUNS, ids=lambda p: p.parent.name.split("_")[0] + "_" + p.parent.parent.name)
def test_a_run_stored_before_schedules_had_a_kind_is_the_same_variant_now(path, tmp_path):
    """sweep/results/ holds runs whose schedules had only `name` (= the rule, `uniform` for uniform_mswa_budget):
    the same overrides composed now (name = the file, kind = the rule) are the same variant, of the same name, and
    a rerun sweep skips the finished job instead of refusing it as another config."""
    import json
    import shutil

    stored = json.loads(path.read_text())
    assert "kind" not in stored["config"]["window_schedule"]  # the old layout
    now = compose_plain(stored["overrides"], hydra=True)
    excluded = now.hydra.job.config.override_dirname.exclude_keys
    plain = compose_plain(stored["overrides"])
    assert plain["window_schedule"]["name"] == stored["schedule"] != "" and "kind" in plain["window_schedule"]
    assert variant_id(plain) == variant_id(stored["config"])
    assert variant_name(stored["overrides"], excluded) == stored["variant"]
    shutil.copy(path, tmp_path / "results.json")
    assert continue_job(plain, tmp_path) == stored
    plain["window_schedule"]["kind"] = "mswa_h" if plain["window_schedule"]["kind"] != "mswa_h" else "mswa"  # another rule
    with pytest.raises(ValueError, match="holds a finished run of another config"):
        continue_job(plain, tmp_path)


def test_report_finds_swa_at_w_and_at_budget_from_the_configs_and_pairs_by_seed():
    """Rows as train.py writes them, from the real composed configs: mswa's references are SWA at w and SWA at
    its mean window (0.875 w to the nearest whole window for mswa's 0.879 w), whatever the folder names."""
    from mswa import report
    from mswa.windows import make_schedule

    test_bpc = {"swa": [2.00, 2.10, 2.05], "budget": [2.03, 2.12, 2.09], "mswa": [1.95, 2.08, 2.01]}
    spelled = {
        "swa": ["model=swa"],
        "budget": ["model=swa", "window_schedule=uniform_mswa_budget"],
        "mswa": ["model=swa", "window_schedule=mswa"],
    }  # mswa spelled as in the budget_matched sweep
    rows = []
    for name, values in test_bpc.items():
        cfg = compose_plain(["experiment=cpu", *spelled[name]])
        ws = cfg["window_schedule"]
        schedule = make_schedule(ws["kind"], w=64, n_layer=4, n_head=4, head_ratios=ws["head_ratios"])
        for seed, value in enumerate(values):
            results = {
                "schema": 1,
                "status": "finished",
                "variant": name,
                "seed": seed,
                "config": {**cfg, "seed": seed},
                "dataset": "synthetic",
                "metric": "bpc",
                "model": "swa",
                "schedule": name,
                "window": 64,
                "budget": schedule.budget(1024),
                "metrics": {"val/bpc": value, "test/bpc": value},
            }
            rows.append(report.row_from_results(results, path=f"{name}/{seed}", history=None))
    table = report.summary_table(report.runs_frame(rows)).set_index("variant")
    assert table.loc["mswa", "swa_reference"] == "swa" and table.loc["mswa", "budget_reference"] == "budget"
    assert table.loc["budget", "swa_reference"] == "swa" and pd.isna(table.loc["budget", "budget_reference"])
    diffs = [m - b for m, b in zip(test_bpc["mswa"], test_bpc["budget"])]  # -0.08, -0.04, -0.08: [-0.124, -0.009]
    mean, sd = sum(diffs) / 3, statistics.stdev(diffs)
    half = 4.302652729911275 * sd / 3**0.5  # t(0.975, 2 degrees of freedom)
    row = table.loc["mswa"]
    assert (row.budget_diff, row.budget_low, row.budget_high) == pytest.approx((mean, mean - half, mean + half))
    assert row.budget_verdict == "better"  # the whole interval is below 0
    assert row.swa_verdict == "not distinguishable at 95%"  # -0.05, -0.02, -0.04: [-0.075, +0.001] holds 0
