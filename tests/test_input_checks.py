"""Issue 27's bad inputs: each is answered in one sentence naming the key (or path) and the fix, before any data
is loaded or model built; legal but likely unmeant settings get a one-line warning. The real conf/ is composed,
train.py and the commands run as a user runs them, the data loaders read real files."""

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers.runs import REPO, TINY_DATA, compose_config, run_train
from mswa import report
from mswa.bench.cli import main as bench_main
from mswa.checks import ConfigError, check_config, check_evaluation, warn_full_attention
from mswa.config import parse_config
from mswa.data import bytes as byte_corpus
from mswa.data import enwik8
from mswa.data.corpus import DataError
from mswa.evaluate import check_overrides, evaluate
from mswa.factory import build_schedule
from mswa.folders import check_folder
from mswa.run import RunInfo, train, warn_short_evaluations
from mswa.sample import main as sample_main

CHECKED = ["debug=smoke", "logger=none"]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def compose_evaluate(overrides: list[str]) -> dict:
    """conf/evaluate.yaml composed as `python -m mswa.evaluate OVERRIDES` composes it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("evaluate", overrides=overrides), resolve=True)


def stopped_run(tmp_path: Path, overrides: list[str] = ()) -> Path:
    """A run folder as train.py leaves it before its first checkpoint: results.json with the run's config."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"config": compose_config([*CHECKED, *overrides], tmp_path)}))
    return folder


def refusal(action) -> str:
    """The one-line message that ``action()`` is refused with."""
    with pytest.raises(ValueError) as refused:
        action()
    message = str(refused.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- settings train.py and mswa.evaluate share


@pytest.mark.parametrize(
    "override, message",
    [
        ("torch_threads=0", "torch_threads=0 must be an integer >= 1, or null (torch's default)"),
        ("hardware.devices=0", "hardware.devices=0 must be an integer >= 1, -1 (every device), auto, or a list of device indices"),
    ],
)
def test_a_setting_of_both_commands_is_refused_alike_by_train_and_evaluate(tmp_path, override, message):
    assert refusal(lambda: check_config(compose_config([*CHECKED, override], tmp_path))) == message
    options = compose_evaluate([f"run_dir={tmp_path}", "hardware=cpu", override])
    assert refusal(lambda: check_evaluation(options, options["hardware"], None)) == message


def test_evaluate_refuses_a_zero_batch_size_before_loading_anything(tmp_path):
    run = stopped_run(tmp_path)
    message = refusal(lambda: evaluate(compose_evaluate([f"run_dir={run}", "batch_size=0"])))
    assert message == "batch_size=0 must be an integer >= 1, or null (the run's data.eval_batch_size)"
    assert not (tmp_path / "data").exists()


@NO_GPU
def test_evaluate_on_a_gpu_this_machine_lacks_is_refused_before_loading_anything(tmp_path):
    run = stopped_run(tmp_path)
    message = refusal(lambda: evaluate(compose_evaluate([f"run_dir={run}", "hardware=gpu"])))
    assert message.startswith("hardware.accelerator=gpu but this machine has no CUDA GPU; add hardware=cpu")
    assert sorted(p.name for p in run.iterdir()) == ["results.json"] and not (tmp_path / "data").exists()


def test_a_repeated_override_is_refused_naming_the_key(tmp_path):
    cfg = compose_config([*CHECKED, *TINY_DATA, "seed=2"], tmp_path)
    with pytest.raises(ConfigError, match=r"^seed is given twice \(seed=1 and seed=2\), and only the last would count; give it once$"):
        train(cfg, RunInfo(str(tmp_path / "run"), overrides=["seed=1", "model=swa", "seed=2"]))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"  # recorded, as every refusal
    assert not (tmp_path / "data").exists()
    message = refusal(lambda: check_overrides([f"run_dir={tmp_path}", "hardware=cpu", "+hardware=gpu"]))
    assert message.startswith("hardware is given twice (hardware=cpu and +hardware=gpu)")


# ---------------------------------------------------------------- the machine: W&B login, memory


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch) -> Path:
    """No W&B credentials anywhere wandb looks; returns the netrc path (absent)."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_wandb_online_without_a_login_is_refused_before_building(tmp_path, no_wandb_login, monkeypatch):
    online = [*CHECKED, "logger=wandb", "logger.mode=online"]
    assert refusal(lambda: check_config(compose_config(online, tmp_path))).startswith(
        "logger.mode=online but W&B finds no credentials here (no WANDB_API_KEY, no netrc entry); run wandb login first"
    )
    check_config(compose_config([*CHECKED, "logger=wandb", "logger.mode=offline"], tmp_path))
    no_wandb_login.write_text("machine api.wandb.ai login user password " + "a" * 40 + "\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    check_config(compose_config(online, tmp_path))  # what `wandb login` writes is found


def test_evaluating_a_run_that_logged_online_needs_the_login_first(tmp_path, no_wandb_login):
    run = stopped_run(tmp_path, ["logger=wandb", "logger.mode=online"])
    (run / "wandb_id").write_text("abc123")  # the run logged to W&B: the evaluations join its summary
    message = refusal(lambda: evaluate(compose_evaluate([f"run_dir={run}"])))
    assert message.startswith("logger.mode=online but W&B finds no credentials here")


def test_a_model_too_large_for_memory_is_refused_before_the_data_loads(tmp_path):
    cfg = compose_config([*CHECKED, *TINY_DATA, "model.d_model=1000000"], tmp_path)
    with pytest.raises(ConfigError) as refused:
        train(cfg, RunInfo(str(tmp_path / "run")))
    message = str(refused.value)
    assert message.startswith("the model (model.n_layer=4, model.d_model=1000000: 48,000,019,000,000 parameters) needs ")
    assert "GiB for its weights, gradients and AdamW state, more than the " in message and "lower model.d_model" in message
    assert not (tmp_path / "data").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


# ---------------------------------------------------------------- where commands write


@pytest.mark.parametrize("system_folder", ["/proc", "/sys"])
def test_a_folder_under_proc_or_sys_is_refused_in_one_sentence(tmp_path, system_folder):
    if not Path(system_folder).is_dir():
        pytest.skip(f"no {system_folder} here")
    target = f"{system_folder}/mswa_outputs"
    message = refusal(lambda: check_config(compose_config([*CHECKED, f"paths.log_dir={target}"], tmp_path)))
    assert message.startswith(f"paths.log_dir={target} cannot be written (no folder can be made in {system_folder}: ")
    assert message.endswith("give a folder you can write to")


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("kept")
    return path


def test_train_py_checks_where_hydra_would_make_the_run_folder(tmp_path, a_file):
    """Hydra makes the run's folder before train.py's main; these are refused before, and nothing is made."""
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    for overrides, message in [
        ([f"hydra.run.dir={a_file}"], f"error: hydra.run.dir={a_file} is a file; give a folder"),
        ([f"task_name=../../{outside.name}"], f"error: task_name='../../{outside.name}' must be a plain folder name"),
        (["paths.log_dir=/proc/mswa_outputs"], "error: paths.log_dir=/proc/mswa_outputs cannot be written"),
    ]:
        proc = run_train([*CHECKED, *TINY_DATA, *overrides], tmp_path, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert a_file.read_text() == "kept" and not outside.exists() and not (tmp_path / "outputs").exists()


def test_every_command_checks_its_output_folder_before_working(tmp_path, a_file, capsys):
    assert report.main([str(tmp_path), "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: --out={a_file} is a file; give a folder\n"
    with pytest.raises(SystemExit) as stopped:
        bench_main(["model", "--tiny", "--output", f"{a_file}/model.json"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: --output={a_file}/model.json is inside the file {a_file}; give a folder\n"
    assert refusal(lambda: check_overrides(["run_dir=/proc/self"])).startswith("run_dir=/proc/self cannot be written")
    assert a_file.read_text() == "kept"


def test_hf_evaluate_checks_its_output_folder_with_the_same_check(tmp_path, a_file, capsys):
    hf_evaluate = pytest.importorskip("mswa.hf.evaluate")
    with pytest.raises(SystemExit) as stopped:
        hf_evaluate.main(["--model", str(tmp_path), "--out", "/proc/mswa_eval"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith("error: --out=/proc/mswa_eval cannot be written (no folder can be made in /proc")


def test_the_folder_check_leaves_nothing_behind(tmp_path):
    check_folder("paths.log_dir", tmp_path / "new" / "deeper")  # it makes a folder to know it can, then removes it
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- values accepted silently before


@pytest.mark.parametrize("temperature", ["inf", "nan", "-1"])
def test_sampling_refuses_a_temperature_that_is_not_a_finite_number_at_least_zero(tmp_path, temperature):
    with pytest.raises(SystemExit) as stopped:
        sample_main([str(tmp_path), "--prompt", "x", "--temperature", temperature])
    value = float(temperature)
    assert stopped.value.code == f"error: temperature={value!r} must be a finite number >= 0 (0 = greedy, 1 = the model's distribution)"


def test_sampling_refuses_zero_threads(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --threads=0 must be an integer >= 1$"):
        sample_main([str(tmp_path), "--prompt", "x", "--threads", "0"])


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["model=swa", "window=64", "seq_len=64"], True),
        (["model=mswa", "window=1024", "seq_len=64"], True),  # its narrowest window, w/16, still covers 64 tokens
        (["model=swa", "window=32", "seq_len=64"], False),
        (["model=full", "seq_len=64"], False),
    ],
)
def test_windows_that_all_cover_the_sequence_are_named_full_attention(tmp_path, capsys, overrides, warned):
    cfg = parse_config(compose_config([*CHECKED, *overrides], tmp_path))
    warn_full_attention(cfg, build_schedule(cfg))
    err = capsys.readouterr().err
    assert (err != "") == warned
    if warned:
        assert err.startswith(
            f"warning: every window of window_schedule={cfg.window_schedule.name} (window={cfg.window}) covers seq_len=64"
        )
        assert err.count("\n") == 1 and f"so model={cfg.model.name} trains full attention" in err


def test_an_evaluation_shorter_than_one_window_is_warned_about(tmp_path, capsys):
    source = tmp_path / "tiny.txt"
    source.write_bytes(bytes(range(100)))  # split 90 / 5 / 5: valid and test hold 4 targets
    corpus = byte_corpus.load(tmp_path / "data", source)
    capsys.readouterr()
    warn_short_evaluations(corpus, eval_seq_len=16, val_max_tokens=1)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "warning: the valid split of 'tiny.txt' holds 4 target(s), fewer than one evaluation window (eval.seq_len=16), "
        "so its loss says little; use a larger corpus",
        "warning: the test split of 'tiny.txt' holds 4 target(s), fewer than one evaluation window (eval.seq_len=16), "
        "so its loss says little; use a larger corpus",
        "warning: validation during training scores data.val_max_tokens=1 target(s), fewer than one evaluation window "
        "(eval.seq_len=16), so its loss says little; raise data.val_max_tokens or set it null",
    ]
    warn_short_evaluations(corpus, eval_seq_len=4, val_max_tokens=4)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- data


def test_an_edited_local_byte_file_is_read_again_though_its_size_and_time_are_kept(tmp_path):
    source = tmp_path / "enwik8-like"
    source.write_bytes(b"a" * 1000)
    before = source.stat()
    first = enwik8.load(tmp_path / "data", path=source, split_fractions=[0.9, 0.05, 0.05])
    assert bytes(first.splits["train"][:3]) == b"aaa"
    source.write_bytes(b"b" * 1000)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (source.stat().st_size, source.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = enwik8.load(tmp_path / "data", path=source, split_fractions=[0.9, 0.05, 0.05])
    assert bytes(again.splits["train"][:3]) == b"bbb"


def test_a_file_url_is_a_local_mirror(tmp_path):
    mirror = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(mirror, "w") as archive:
        archive.writestr("enwik8", bytes(range(256)) * 4)
    corpus = enwik8.load(tmp_path / "data", url=mirror.as_uri(), split_fractions=[0.5, 0.25, 0.25])
    np.testing.assert_array_equal(corpus.splits["valid"], np.arange(256, dtype=np.uint8))
    missing = (tmp_path / "missing.zip").as_uri()
    with pytest.raises(DataError, match=f"^downloading {missing} failed .*No such file or directory"):
        enwik8.load(tmp_path / "data", url=missing, split_fractions=[0.5, 0.25, 0.25])
