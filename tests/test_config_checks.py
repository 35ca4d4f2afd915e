"""Bad inputs are refused in one sentence that names the key, before anything is built.

Most cases compose the real conf/ and call the checks in-process; a few run train.py end to end.
"""

import inspect
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from helpers.runs import REPO, TINY_DATA, compose_config, run_train
from mswa.checks import ConfigError, check_checkpoint, check_config, check_launcher
from mswa.config import PRETRAINED_KEYS, parse_config
from mswa.factory import build_schedule, model_spec
from mswa.run import RunInfo, train

CHECKED = ["debug=smoke", "logger=none"]  # composed and checked; no data is loaded
SMOKE = [*CHECKED, *TINY_DATA]  # runs

# (overrides, words the message must hold: the key, and the value where there is one)
BAD_VALUES = [
    (["seq_len=0"], "seq_len=0 must be an integer >= 1"),
    (["seq_len=abc"], "seq_len='abc'"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.eval_batch_size=-2"], "data.eval_batch_size=-2"),
    (["data.val_max_tokens=0"], "data.val_max_tokens=0 must be an integer >= 1, or null"),
    (["data.aligned_chunks=maybe"], "data.aligned_chunks='maybe' must be true or false"),
    (["trainer.max_steps=1.5"], "trainer.max_steps=1.5"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["checkpoint.every_n_train_steps=0"], "checkpoint.every_n_train_steps=0"),
    (["model.n_head=0"], "model.n_head=0"),
    (["model.n_layer=0"], "model.n_layer=0"),
    (["model.d_model=0"], "model.d_model=0"),
    (["model.mlp_ratio=0"], "model.mlp_ratio=0"),
    (["model.dropout=1.5"], "model.dropout=1.5 must be a number in [0, 1)"),
    (["model.linear_feature_dim=0"], "model.linear_feature_dim=0"),
    (["model=mswa_linear", "model.linear_feature_map=relu"], "model.linear_feature_map='relu' must be one of elu, taylor"),
    (["model.positions=alibi"], "model.positions='alibi' is unknown"),
    (["model.n_head=3"], "model.d_model=32 is not divisible by model.n_head=3"),
    (["model.attn_backend=flash"], "model.attn_backend='flash' must be one of auto, dense, blocked, flex"),
    (["model.attn_backend=flex"], "model.attn_backend=flex cannot train on hardware.accelerator=cpu"),
    (["optim.lr=-1"], "optim.lr=-1 must be a finite number >= 0"),
    (["optim.lr=abc"], "optim.lr='abc'"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9]"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be an integer >= 0"),
    (["optim.warmup_steps=100"], "optim.warmup_steps=100 is longer than trainer.max_steps=6"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio=2 must be a number in [0, 1]"),
    (["seed=-1"], "seed=-1 must be an integer in [0, 4294967295]"),
    (["seed=1.5"], "seed=1.5"),
    (["torch_threads=0"], "torch_threads=0 must be an integer >= 1, or null"),
    (["compile=maybe"], "compile='maybe' must be true or false"),
    (["overwrite=2"], "overwrite=2 must be true or false"),
    (["hardware.num_nodes=0"], "hardware.num_nodes=0"),
    (["hardware.precision=bf17"], "hardware.precision='bf17' must be one of"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode='bogus' must be one of offline, online, disabled"),
]

PRETRAINED = ["model=hf_causal_lm", "model.pretrained=some/model"]
UNKNOWN_KEYS = [
    (["+model.n_layers=3"], "model.n_layers is not a setting that anything reads; did you mean model.n_layer?"),
    (["+optim.learning_rate=1e-3"], "optim.learning_rate is not a setting that anything reads; the settings of optim are"),
    (["+data.batchsize=4"], "data.batchsize is not a setting that anything reads; did you mean data.batch_size?"),
    (["+trainer.max_step=5"], "did you mean trainer.max_steps?"),
    (["+trainer.logger=false"], "trainer.logger is not a setting here: it comes from the run"),
    (["+trainer.devices=2"], "trainer.devices is not a setting here: it comes from hardware.devices"),
    (["+hardware.device=2"], "did you mean hardware.devices?"),
    (["+window_schedule.head_ratio=[1]"], "did you mean window_schedule.head_ratios?"),
    (["+dataset.paths=x"], "did you mean dataset.path?"),
    (["dataset=wikitext2", "+dataset.loader.hf_cach_dir=x"], "did you mean dataset.loader.hf_cache_dir?"),
    (["+checkpoint.every_n_steps=5"], "did you mean checkpoint.every_n_train_steps?"),
    (["+paths.data=x"], "did you mean paths.data_dir?"),
    (["+eval.strid=4"], "did you mean eval.stride?"),
    (["logger=wandb", "+logger.projct=x"], "did you mean logger.project?"),
    (["+seq_length=128"], "seq_length is not a setting that anything reads; did you mean seq_len?"),
    (["+model.vocab_size=100"], "model.vocab_size is not a setting here: it comes from the dataset"),
    ([*PRETRAINED, "+model.lora.rank=4"], "model.lora.rank is not a setting that anything reads; the settings of model.lora are alpha"),
    ([*PRETRAINED, "+model.d_model=64"], "model.d_model is not a setting here: it comes from model.pretrained's config"),
    ([*PRETRAINED, "model.n_layer=4"], "model.n_layer=4 is read from model.pretrained's config"),
    (["+lm_eval.tasks=[piqa]"], "lm_eval scores pretrained models (model=hf_causal_lm) only"),
    (["experiment=llama2_7b_mswa", "hardware=cpu", "lm_eval.num_fewshot=-1"], "lm_eval.num_fewshot=-1: give the number"),
]


@pytest.mark.parametrize("overrides, words", BAD_VALUES + UNKNOWN_KEYS)
def test_bad_input_is_refused_in_one_sentence_naming_the_key(tmp_path, overrides, words):
    pretrained = {"model=hf_causal_lm", "experiment=llama2_7b_mswa"} & set(overrides)  # debug=smoke's shape is not theirs
    cfg = compose_config([*(["logger=none"] if pretrained else CHECKED), *overrides], tmp_path)
    with pytest.raises(ConfigError) as refused:
        check_config(cfg)
    assert words in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "outputs").exists()


def test_folders_that_are_files_are_refused(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for key, words in (("paths.data_dir", "is a file"), ("paths.log_dir", "is a file")):
        with pytest.raises(ConfigError, match=f"{key}={a_file} {words}; give a folder"):
            check_config(compose_config([*CHECKED, f"{key}={a_file}"], tmp_path))
    with pytest.raises(ConfigError, match=f"paths.data_dir={a_file}/cache is inside the file {a_file}"):
        check_config(compose_config([*CHECKED, f"paths.data_dir={a_file}/cache"], tmp_path))
    assert a_file.read_text() == "not a folder"


GOOD = [
    ["model=full"],
    ["model=linear"],
    ["model=swa_linear_parallel"],
    ["experiment=laptop"],
    ["launcher=joblib"],
    ["launcher=slurm", "hardware=cpu"],
    ["logger=wandb"],
    ["logger=csv"],
    ["dataset=wikitext2"],
    ["dataset=enwik8"],
    ["experiment=enwik8_mswa", "hardware=cpu"],
    ["experiment=wt103_full", "hardware=cpu"],
    ["experiment=llama2_7b_mswa", "hardware=cpu"],
    ["+dataset.loader.n_words=16"],
    ["optim.lr=0", "seed=4294967295"],
]


@pytest.mark.parametrize("overrides", GOOD, ids=" ".join)
def test_every_shipped_choice_passes_the_checks(tmp_path, overrides):
    extra = [] if any(o.startswith("experiment=") for o in overrides) else CHECKED
    check_config(compose_config([*extra, *overrides], tmp_path))


def test_every_value_of_every_sweep_passes_the_checks(tmp_path):
    for sweep in sorted(p.stem for p in (REPO / "sweep").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            params = compose("train", overrides=[f"+sweep={sweep}"], return_hydra_config=True).hydra.sweeper.params
        for key, values in params.items():
            for value in str(values).split(","):
                check_config(compose_config([f"+sweep={sweep}", f"{key}={value}"], tmp_path))


def test_model_lm_is_not_a_choice(tmp_path):
    with pytest.raises(MissingConfigException, match="Could not find 'model/lm'") as refused:
        compose_config(["model=lm"], tmp_path)
    options = str(refused.value).split("Available options in 'model':")[1].split("Config search path")[0].split()
    assert "mswa" in options and "lm" not in options


def test_pretrained_keys_are_the_pretrained_models_keywords():
    backbone = pytest.importorskip("mswa.hf.backbone")
    keywords = set(inspect.signature(backbone.PretrainedCausalLM.__init__).parameters) - {"self", "windows"}
    assert keywords == set(PRETRAINED_KEYS)


def test_a_launcher_without_multirun_is_refused(tmp_path):
    check_launcher("basic", multirun=False)
    check_launcher("slurm", multirun=True)
    with pytest.raises(ConfigError, match=r"launcher=slurm starts the jobs of a multirun, so it needs -m"):
        check_launcher("slurm", multirun=False)
    proc = run_train(["launcher=joblib", *SMOKE], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: launcher=joblib starts the jobs of a multirun")
    assert not list((tmp_path / "outputs").rglob("results.json"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real run of train.py's smoke model (n_layer 4), with its checkpoints."""
    tmp_path = tmp_path_factory.mktemp("finished")
    cfg = compose_config([*SMOKE, "trainer.max_steps=2", "trainer.val_check_interval=2", "optim.warmup_steps=1"], tmp_path)
    train(cfg, RunInfo(str(tmp_path / "run")))
    return tmp_path / "run"


def planned_model(overrides: list[str], finished_run: Path) -> dict:
    """The model kwargs train() would build for these overrides (data cached beside the finished run)."""
    from mswa.data.synthetic import load

    cfg = compose_config([*SMOKE, *overrides], finished_run.parent)
    corpus = load(**{k: v for k, v in cfg["dataset"]["loader"].items() if k != "_target_"})
    settings = parse_config(cfg)
    return model_spec(settings, corpus.vocab_size, build_schedule(settings))


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.n_layer=8"], "model.n_layer 4 there, 8 here"),
        (["model=full"], r"windows \(from window and window_schedule\) \[\[1, 2, 4, 8\], .* there, None here"),
        (["seq_len=32"], r"max_seq_len \(from seq_len\) 64 there, 32 here"),
        (["model.positions=learned"], "model.positions 'rope' there, 'learned' here"),
    ],
)
def test_a_checkpoint_of_another_model_is_refused(finished_run, overrides, words):
    last = finished_run / "checkpoints" / "last.ckpt"
    check_checkpoint(str(last), planned_model(["model.attn_backend=dense"], finished_run))  # a kernel choice: same model
    with pytest.raises(ConfigError, match=f"ckpt_path={last} belongs to another model: .*{words}"):
        check_checkpoint(str(last), planned_model(overrides, finished_run))


def test_a_file_that_is_not_a_checkpoint_of_train_py_is_refused(tmp_path):
    text, foreign = tmp_path / "notes.ckpt", tmp_path / "foreign.ckpt"
    text.write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ConfigError, match=f"ckpt_path={text} is not a checkpoint"):
        check_checkpoint(str(text), {})
    with pytest.raises(ConfigError, match=f"ckpt_path={foreign} is not a checkpoint of train.py"):
        check_checkpoint(str(foreign), {})


def test_resuming_another_models_checkpoint_stops_before_fit_and_leaves_it_alone(finished_run, tmp_path):
    source = [finished_run / "checkpoints" / "last.ckpt", finished_run / "results.json"]
    before = [p.read_bytes() for p in source]
    cfg = compose_config([*SMOKE, "model.n_layer=8", f"ckpt_path={source[0]}"], tmp_path)
    with pytest.raises(ConfigError, match="model.n_layer 4 there, 8 here"):
        train(cfg, RunInfo(str(tmp_path / "run")))
    assert [p.read_bytes() for p in source] == before
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.csv").exists()


def test_typo_through_train_py_is_one_line_and_trains_nothing(tmp_path):
    proc = run_train(["+model.n_layers=3", *SMOKE], tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.n_layers is not a setting that anything reads; did you mean model.n_layer?"
    )
    (results,) = (tmp_path / "outputs").rglob("results.json")
    assert json.loads(results.read_text())["status"] == "failed"  # a refused fresh run records its failure
    assert not list((tmp_path / "outputs").rglob("*.ckpt")) and not list((tmp_path / "outputs").rglob("metrics.csv"))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--model", "no such file or folder; give a local folder or a hub id (owner/name)"),
        ("--adapter", "no such file or folder; give a local folder or a hub id (owner/name)"),
        ("--include-path", "no such file or folder; give an existing folder"),
    ],
)
def test_hf_evaluate_names_a_missing_path(tmp_path, capsys, flag, message):
    evaluate = pytest.importorskip("mswa.hf.evaluate")
    missing = tmp_path / "missing"
    model = [] if flag == "--model" else ["--model", str(tmp_path)]
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([*model, flag, str(missing), "--out", str(tmp_path / "eval")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {flag} {missing}: {message}\n"
    assert not (tmp_path / "eval").exists()
