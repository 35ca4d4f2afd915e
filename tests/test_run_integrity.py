"""Runs never lose results: refusals and failed resumes keep a run's files, writes are atomic, paths are
folder-relative, faults get one sentence with what to run next, and resumes after any stop (Ctrl-C, two
Ctrl-C, SIGKILL, a full disk) end on the uninterrupted run's numbers."""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import mswa.atomic
from helpers.runs import (
    REPO,
    Train,
    checkpoint_at_step,
    compose_config,
    fake_slurm,
    killed_after,
    only_run_dir,
    run_printed_command,
    run_train,
)
from mswa import report
from mswa.lit import STOP_SIGNALS, AtomicCheckpointIO, GracefulInterrupt, LanguageModelTask, NonFiniteLossError, RunError, RunInterrupted
from mswa.run import ConfigError, RunInfo, folder_name, hydra_value, resume_command, train
from mswa.windows import ScheduleError

SMOKE = ["debug=smoke", "logger=none"]
EXACT = 1e-9  # resumed vs uninterrupted final val metric


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def attempts_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but what each attempt writes (its line in attempts.jsonl, its note as the lock's
    holder), by relative path."""
    attempts_own = ("attempts.jsonl", "run.lock.json")
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name not in attempts_own}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished smoke run (its data cache beside it); tests work on copies of its folder."""
    root = tmp_path_factory.mktemp("finished")
    train(compose_config(SMOKE, root), RunInfo(str(root / "run")))
    return root


def copy_run(finished: Path, to: Path) -> Path:
    shutil.copytree(finished / "run", to)
    return to


def smoke(finished: Path, *overrides: str) -> dict:
    return compose_config([*SMOKE, *overrides], finished)  # the finished run's data cache: nothing to generate


# ---------------------------------------------------------------- refusals keep the run


def test_a_refused_start_leaves_a_finished_run_as_it_was(finished, tmp_path):
    folder = copy_run(finished, tmp_path / "run")
    before = files_of(folder)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(smoke(finished), RunInfo(str(folder)))
    with pytest.raises(ScheduleError, match="window=0"):
        train(smoke(finished, "window=0"), RunInfo(str(folder)))
    shutil.rmtree(folder / "checkpoints")  # results alone are worth keeping too
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(smoke(finished), RunInfo(str(folder)))
    assert files_of(folder) == {name: data for name, data in before.items() if not name.startswith("checkpoints/")}
    refused = attempts_of(folder)[-3:]
    assert [a["status"] for a in refused] == ["refused"] * 3 and "window=0" in refused[1]["error"]
    runs = report.load_runs([folder])
    assert runs.status.tolist() == ["finished"] and len(report.refused_attempts(runs)) == 3


def test_a_refused_fresh_run_still_records_failed(finished, tmp_path):
    with pytest.raises(ScheduleError):
        train(smoke(finished, "window=0"), RunInfo(str(tmp_path / "run")))
    assert results_of(tmp_path / "run")["status"] == "failed"
    assert attempts_of(tmp_path / "run")[0]["status"] == "failed"
    with pytest.raises(ConfigError, match=r"does not exist; .* or continue another run's checkpoint with ckpt_path=PATH"):
        train(smoke(finished, "ckpt_path=last"), RunInfo(str(tmp_path / "other")))


def test_the_resume_command_finds_the_run_folder_again():
    single = RunInfo("outputs/x", overrides=["model=swa", "window_schedule.windows=[[1,2]]", "overwrite=true"])
    assert resume_command(single) == "python train.py model=swa 'window_schedule.windows=[[1,2]]' ckpt_path=last"
    job = RunInfo("m/0_a=1,b=2", overrides=["ckpt_path=x", "a=1"], hydra_overrides=[hydra_value("hydra.run.dir", "m/0_a=1,b=2")])
    assert resume_command(job) == """python train.py a=1 'hydra.run.dir="m/0_a=1,b=2"' ckpt_path=last"""


def test_a_resume_whose_checkpoint_fails_to_load_leaves_the_run_as_it_was(finished, tmp_path):
    folder = copy_run(finished, tmp_path / "run")
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    before = files_of(folder)
    with pytest.raises((RunError, ConfigError), match="ckpt_path"):
        train(smoke(finished, "ckpt_path=last"), RunInfo(str(folder)))
    assert files_of(folder) == before and results_of(folder)["status"] == "finished"
    assert attempts_of(folder)[-1]["status"] == "refused"


def test_a_resume_keeps_the_validation_at_the_step_it_resumes_from(finished, tmp_path):
    """Metrics sit at the optimizer steps of the weights they measured: validation after 3 steps at 3, the
    resumed attempt's first training loss (of the step-3 weights) at 3 too. The merge keeps the earlier
    attempt's evaluations of the checkpoint it resumes from and replaces its training rows from there on."""
    folder = tmp_path / "run"
    train(smoke(finished, "trainer.max_steps=3"), RunInfo(str(folder)))
    train(smoke(finished, "ckpt_path=last"), RunInfo(str(folder)))
    merged, straight = (pd.read_csv(run / "metrics.csv") for run in (folder, finished / "run"))
    assert merged["train/loss"].dropna().tolist() == straight["train/loss"].dropna().tolist()
    assert merged.dropna(subset="train/loss").step.tolist() == [0, 1, 2, 3, 4, 5]
    # at 3: the first attempt's validation during training, then its final passes; at 6: the same as a straight run
    assert merged.dropna(subset="val/bpc").step.tolist() == [3, 3, 6, 6] == [3, *straight.dropna(subset="val/bpc").step]
    assert merged.dropna(subset="val/bpc")["val/bpc"].iloc[0] == straight.dropna(subset="val/bpc")["val/bpc"].iloc[0]


# ---------------------------------------------------------------- paths relative to the run folder


def test_a_moved_run_resumes_and_evaluates_its_own_best(finished, tmp_path):
    original = copy_run(finished, tmp_path / "original")
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(original, moved)
    results = train(smoke(finished, "ckpt_path=last"), RunInfo(str(moved)))
    reference = results_of(finished / "run")
    assert results["status"] == "finished" and results["metrics"] == reference["metrics"]  # the same best.ckpt, bit for bit
    assert results["evaluated_checkpoint"] == "checkpoints/best.ckpt" and "run_dir" not in results
    assert str(original) not in (moved / "results.json").read_text()
    for name in ("best.ckpt", "last.ckpt"):
        callbacks = torch.load(moved / "checkpoints" / name, weights_only=True)["callbacks"]
        paths = [state[key] for state in callbacks.values() for key in ("best_model_path", "last_model_path") if key in state]
        assert paths and all("/" not in path for path in paths), paths


def test_folder_names_are_one_folder_whatever_the_override_values():
    assert folder_name("dataset.loader.data_dir=/data/cache,model=swa") == "dataset.loader.data_dir=%2Fdata%2Fcache,model=swa"
    names = {folder_name(name) for name in ("a=x/y", "a=x%2Fy", "a=x_y", "a=" + "/" * 300, "a=" + "/" * 301)}
    assert len(names) == 5 and not any("/" in name or len(name.encode()) > 255 for name in names)
    assert "${folder_name:${hydra:job.override_dirname}}" in (REPO / "conf" / "train.yaml").read_text()


# ---------------------------------------------------------------- faults: truthful sentences


def test_nan_advice_says_only_what_is_true(finished, tmp_path):
    diverge = ["optim.lr=1e6", "optim.warmup_steps=1", "trainer.gradient_clip_val=null", "trainer.max_steps=40"]
    with pytest.raises(NonFiniteLossError) as error:
        train(smoke(finished, *diverge, "checkpoint.every_n_train_steps=1000"), RunInfo(str(tmp_path / "none")))
    assert "start again" in str(error.value) and "ckpt_path" not in str(error.value) and "kept" not in str(error.value)
    assert not (tmp_path / "none" / "checkpoints").exists()

    with pytest.raises(NonFiniteLossError) as error:
        train(smoke(finished, *diverge, "checkpoint.every_n_train_steps=1"), RunInfo(str(tmp_path / "some")))
    last = tmp_path / "some" / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=True)["global_step"]
    assert f"""continue from step {step} with 'ckpt_path="{last}"'""" in str(error.value)
    assert results_of(tmp_path / "some")["status"] == "failed"


def test_a_changed_optim_lr_takes_effect_on_resume(finished, tmp_path):
    train(smoke(finished, "trainer.max_steps=3"), RunInfo(str(tmp_path / "first")))
    resumed = train(
        smoke(finished, "trainer.max_steps=6", "optim.lr=2e-3", f"ckpt_path={tmp_path}/first/checkpoints/last.ckpt"),
        RunInfo(str(tmp_path / "lower")),
    )
    assert resumed["status"] == "finished" and resumed["evaluated_checkpoint"] == "checkpoints/best.ckpt"
    state = torch.load(tmp_path / "lower" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6
    # warm-up 2 steps, then cosine to 0.1 of the peak at max_steps: at step 6 the factor is 0.1
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (6 - 2) / (6 - 2)))
    for group in state["optimizer_states"][0]["param_groups"]:
        assert group["lr"] == pytest.approx(2e-3 * factor, rel=1e-12) and group["initial_lr"] == 2e-3
    assert state["lr_schedulers"][0]["base_lrs"] == [2e-3, 2e-3]


def test_a_full_disk_never_leaves_half_a_file_and_the_run_resumes_to_the_same_metric(finished, tmp_path, monkeypatch):
    """ENOSPC injected at the write of best.ckpt (the slow test below fills a real file system)."""
    real_open = open

    def full_disk_for_best(path, *args, **kwargs):
        if "best.ckpt.part-" in str(path):  # the temporary file of best.ckpt (mswa.atomic.temporary_sibling)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(mswa.atomic, "open", full_disk_for_best, raising=False)
    folder = tmp_path / "run"
    with pytest.raises(RunError, match=r"no space left on the device writing .*best\.ckpt; free some space, then resume from step 3"):
        train(smoke(finished), RunInfo(str(folder)))
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["last.ckpt"]
    assert results_of(folder)["status"] == "failed" and "no space left" in results_of(folder)["error"]
    monkeypatch.undo()
    resumed = train(smoke(finished, "ckpt_path=last"), RunInfo(str(folder)))
    difference = resumed["metrics"]["val/bpc"] - results_of(finished / "run")["metrics"]["val/bpc"]
    print(f"full disk (injected) then resume: val/bpc difference {difference:.3e}")
    assert abs(difference) <= EXACT
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_atomic_writes_keep_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mswa.atomic.os, "fsync", no_space)
    with pytest.raises(OSError) as error:
        mswa.atomic.write_atomic(target, "new")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(target)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "best.ckpt")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ---------------------------------------------------------------- Ctrl-C and preemption signals


def test_stop_signals_outside_training_or_twice_stop_at_once(tmp_path):
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    with GracefulInterrupt(str(tmp_path / "last.ckpt")) as interrupt:
        for signum, (name, status) in {signal.SIGINT: ("Ctrl-C", "interrupted"), signal.SIGTERM: ("SIGTERM", "preempted")}.items():
            with pytest.raises(RunInterrupted, match=f"^{name}$") as stop:
                os.kill(os.getpid(), signum)
                time.sleep(5)
            assert stop.value.status == status
        interrupt.training = True
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert interrupt.received == signal.SIGINT and not interrupt.requested  # the ranks agree at the next step boundary
        with pytest.raises(RunInterrupted, match="^a second Ctrl-C$"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        interrupt.received = None
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning before the time limit, then its SIGTERM
        time.sleep(0.1)
        with pytest.raises(RunInterrupted, match="^SIGTERM after SIGUSR1$") as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert stop.value.status == "preempted"
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == previous


# where a preemption signal arrives: the method that sends it (the first time it runs)
STOP_POINTS = {
    "a training step": (LanguageModelTask, "training_step"),
    "validation during training": (LanguageModelTask, "validation_step"),
    "checkpoint writing": (AtomicCheckpointIO, "save_checkpoint"),
    "the final evaluation": (LanguageModelTask, "test_step"),
}


@pytest.mark.parametrize(
    "signum, where",
    [
        (signal.SIGTERM, "a training step"),
        pytest.param(signal.SIGINT, "a training step", marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR1, "a training step", marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR1, "validation during training", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, "checkpoint writing", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, "the final evaluation", marks=pytest.mark.slow),
    ],
    ids=lambda value: value.name if isinstance(value, signal.Signals) else value.replace(" ", "_"),
)
def test_a_signalled_run_is_recorded_and_resumes_to_the_same_numbers(finished, tmp_path, monkeypatch, signum, where):
    """SIGTERM / SIGUSR1 stop at the step boundary (at once during the final evaluation) with a checkpoint there, and
    record ``preempted`` with the command that resumes it: the same command, as a requeued job runs it; in a SLURM
    job (a fake one: its environment, a stub scontrol) they ask for the requeue. Ctrl-C records ``interrupted``,
    resumed with ckpt_path=last, and asks nothing."""
    owner, method = STOP_POINTS[where]
    real, sent = getattr(owner, method), []

    def signalling(self, *args, **kwargs):
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    folder = tmp_path / "run"
    run = RunInfo(str(folder), overrides=["debug=smoke"])
    slurm, calls = fake_slurm(tmp_path)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(owner, method, signalling)
    with pytest.raises(RunInterrupted) as stop:
        train(smoke(finished), run)
    monkeypatch.undo()
    step = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    name, status = STOP_SIGNALS[signum]
    resume = [] if status == "preempted" else ["ckpt_path=last"]
    assert str(stop.value) == f"stopped by {name}; resume from step {step} with: python train.py {' '.join(['debug=smoke', *resume])}"
    assert (stop.value.status, results_of(folder)["status"], results_of(folder)["error"]) == (status, status, str(stop.value))
    assert [(a["status"], a["error"]) for a in attempts_of(folder)] == [(status, str(stop.value))]
    assert results_of(folder)["process"]["slurm_job"] == "4242"
    assert (calls.read_text() if calls.exists() else "") == ("requeue 4242\n" if status == "preempted" else "")
    assert step == (6 if where == "the final evaluation" else 1 if where == "a training step" else 3)

    if resume:  # an interrupted run keeps today's refusal without ckpt_path=last
        with pytest.raises(ConfigError, match="already holds a run"):
            train(smoke(finished), run)
    resumed = train(smoke(finished, *resume), run)  # no ckpt_path: a preempted run resumes
    reference = results_of(finished / "run")["metrics"]
    difference = {split: resumed["metrics"][f"{split}/bpc"] - reference[f"{split}/bpc"] for split in ("val", "test")}
    print(f"{name} during {where}: {status} at step {step}: {stop.value}; resumed minus uninterrupted bpc {difference}")
    assert resumed["status"] == "finished" and all(abs(d) <= EXACT for d in difference.values())
    assert [a["status"] for a in attempts_of(folder)] == [status, *(["refused"] if resume else []), "finished"]
    with pytest.raises(ConfigError, match="already holds a run"):  # a finished run keeps today's refusal
        train(smoke(finished), run)


def test_ctrl_c_during_the_final_evaluation_is_recorded_with_the_resume_command(finished, tmp_path, monkeypatch):
    def ctrl_c(self, batch, batch_idx):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    folder = copy_run(finished, tmp_path / "run")
    monkeypatch.setattr(LanguageModelTask, "test_step", ctrl_c)
    run = RunInfo(str(folder), overrides=["debug=smoke", "model.d_model=32"])
    with pytest.raises(RunInterrupted) as stop:
        train(smoke(finished, "ckpt_path=last"), run)
    assert str(stop.value) == "stopped by Ctrl-C; resume from step 6 with: python train.py debug=smoke model.d_model=32 ckpt_path=last"
    assert results_of(folder)["status"] == "interrupted" and results_of(folder)["error"] == str(stop.value)


# ---------------------------------------------------------------- train.py end to end


def test_a_failed_multirun_job_prints_one_line_and_the_sweep_goes_on(tmp_path):
    proc = run_train(["-m", *SMOKE, "window=0,-3"], tmp_path, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "error: window=0 is not a valid base window" in proc.stderr and "error: window=-3" in proc.stderr
    statuses = [json.loads(p.read_text())["status"] for p in (tmp_path / "outputs").rglob("results.json")]
    assert statuses == ["failed", "failed"]


def test_a_killed_attempt_leaves_its_start_line_and_reads_stopped(tmp_path):
    """attempts.jsonl gets an attempt's line when it starts: SIGKILL mid-training leaves it ``running``, which the
    report reads as stopped (its process is gone); the next attempt adds its own line."""
    args = ["debug=smoke", "logger=none", "trainer.max_steps=100000"]
    job, run_dir = killed_after(args, tmp_path, step=3)
    (killed,) = attempts_of(run_dir)
    assert (killed["status"], killed["ended"], killed["pid"]) == ("running", None, job.proc.pid)
    assert results_of(run_dir)["process"]["attempt"] == killed["attempt"]
    with pytest.raises(ConfigError, match="already holds a run"):
        train(compose_config(args, tmp_path), RunInfo(str(run_dir)))
    assert [a["status"] for a in attempts_of(run_dir)] == ["running", "refused"]
    recorded = report.attempts(report.load_runs([run_dir]))
    assert recorded.status.tolist() == [report.STOPPED, "refused"]
    assert f"its process ({job.proc.pid}) ended without recording an end (killed?)" == recorded.error[0]


# ---------------------------------------------------------------- slow: real faults, resumed to the same numbers

RESUME = [
    "debug=smoke",
    "dataset.loader.n_bytes=200000",
    "trainer.max_steps=60",
    "trainer.val_check_interval=20",
    "checkpoint.every_n_train_steps=5",
    "data.batch_size=32",
    "logger=none",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("straight")
    run_train(RESUME, tmp_path)
    return results_of(only_run_dir(tmp_path / "outputs"))


def assert_resumed_equal(run_dir: Path, straight: dict, what: str) -> None:
    resumed = results_of(run_dir)
    assert resumed["status"] == "finished" and resumed["steps"] == 60
    difference = resumed["metrics"]["val/bpc"] - straight["metrics"]["val/bpc"]
    print(f"{what} then resume: val/bpc difference {difference:.3e}")
    assert abs(difference) <= EXACT
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_sigkill_reads_stopped_then_resumes_to_the_same_metric(straight, tmp_path):
    job, run_dir = killed_after(RESUME, tmp_path, step=10)
    assert results_of(run_dir)["status"] == "running"
    (row,) = report.load_runs([run_dir]).itertuples()
    assert row.status == "stopped" and f"its process ({job.proc.pid} " in row.error
    run_train([*RESUME, "ckpt_path=last"], tmp_path)
    assert_resumed_equal(run_dir, straight, "SIGKILL")
    assert [a["status"] for a in attempts_of(run_dir)] == ["running", "finished"]  # the killed attempt's line stays
    validated = pd.read_csv(run_dir / "metrics.csv").dropna(subset="val/bpc").step
    assert sorted(set(validated)) == [20, 40, 60]  # at the optimizer steps done, across the kill


@pytest.mark.slow
def test_two_ctrl_c_stop_at_once_with_the_resume_command(straight, tmp_path):
    job = Train([*RESUME, "dataset.loader.data_dir=" + str(tmp_path / "data" / "synthetic")], tmp_path)
    job.wait_for(lambda: list((tmp_path / "outputs").glob("train/runs/*/checkpoints")), "a run folder")
    run_dir = only_run_dir(tmp_path / "outputs")  # one folder, although an override holds "/"
    job.wait_for(checkpoint_at_step(run_dir, 10), "a checkpoint at step 10")
    job.proc.send_signal(signal.SIGINT)
    job.wait_for(lambda: any("Ctrl-C again stops at once" in line for line in job.lines), "the first Ctrl-C's notice")
    job.proc.send_signal(signal.SIGINT)
    stderr = job.finish()
    assert job.proc.returncode == 1 and "Traceback" not in stderr and "SystemExit" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    print(last_line)
    assert last_line.startswith("interrupted: stopped by ") and "ckpt_path=last" in last_line, last_line
    assert results_of(run_dir)["status"] == "interrupted"
    run_printed_command(stderr, tmp_path)
    assert_resumed_equal(run_dir, straight, "two Ctrl-C")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_a_real_full_disk_then_resume_to_the_same_metric(straight, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        job = Train(RESUME, tmp_path, log_dir=disk / "outputs")
        job.wait_for(lambda: list((disk / "outputs").glob("train/runs/*/checkpoints")), "a run folder")
        run_dir = only_run_dir(disk / "outputs")
        job.wait_for(checkpoint_at_step(run_dir, 5), "a checkpoint at step 5")
        filler = disk / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as error:
                assert error.errno == errno.ENOSPC
        stderr = job.finish()
        last_line = stderr.strip().splitlines()[-1]
        assert job.proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert last_line.startswith("error: no space left on the device writing "), last_line
        for checkpoint in (run_dir / "checkpoints").iterdir():
            torch.load(checkpoint, weights_only=True)  # whole, or not there: never half a file
        assert not list(run_dir.rglob("*.part-*"))
        assert results_of(run_dir)["status"] in ("failed", "running")  # running only if even results.json could not be written
        filler.unlink()
        run_printed_command(stderr, tmp_path)
        assert_resumed_equal(run_dir, straight, "full disk (tmpfs)")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_the_summary_says_how_to_upload_an_offline_wandb_run(tmp_path):
    from mswa.run import RunFolder, summary_lines

    results = {
        "metric": "bpc",
        "metrics": {"val/bpc": 1.5, "test/bpc": 1.25},
        "steps": 10,
        "evaluated_checkpoint": "checkpoints/best.ckpt",
        "evaluated_step": 10,
        "config": {"logger": {"name": "wandb", "mode": "offline"}},
    }
    folder = RunFolder(tmp_path / "model=swa,seed=1")  # = and , need no shell quotes
    lines = summary_lines(results, folder).splitlines()
    assert lines[0] == "finished 10 steps: val/bpc 1.500000, test/bpc 1.250000, from checkpoints/best.ckpt (step 10, lowest val/loss)"
    assert lines[-1] == f"W&B (offline): upload with wandb sync {tmp_path}/model=swa,seed=1/wandb/offline-run-*"
    results["config"]["logger"] = {"name": "csv"}
    assert len(summary_lines(results, folder).splitlines()) == 2
