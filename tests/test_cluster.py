"""Runs that survive a cluster: SLURM's preemption signal ends in a requeue that resumes the run (same W&B run);
DDP on CPU reduces metrics as sums and equals one process at the same global batch; one live run per folder."""

import errno
import fcntl
import json
import math
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers.runs import (
    REPO,
    TINY_DATA,
    Train,
    checkpoint_at_step,
    compose_config,
    fake_slurm,
    killed_after,
    only_run_dir,
    results_under,
    run_train,
)
from mswa.data.batches import IGNORE, EvalChunks
from mswa.folders import FolderInUse, FolderLock
from mswa.metrics import SummedNLL, metrics_from_sums
from mswa.run import RunInfo, train

SMOKE = ["debug=smoke", *TINY_DATA]


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def attempts_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigusr1_under_slurm_requeues_the_job_which_resumes_the_run_with_its_wandb_run(tmp_path):
    """SLURM's warning signal before the time limit: the run checkpoints at the step boundary, records preempted,
    exits 75 and calls ``scontrol requeue <job>``; the requeued job (the same command) resumes it in the same W&B run,
    and is preempted in its turn (the final numbers of a resumed run: test_run_integrity)."""
    env, calls = fake_slurm(tmp_path)
    args = [*SMOKE, "trainer.max_steps=100000", "checkpoint.every_n_train_steps=1"]
    steps, outputs = [], []
    for attempt, restarts in enumerate(("0", "1")):  # SLURM counts a requeued job's starts in SLURM_RESTART_COUNT
        job, run_dir = killed_after(args, tmp_path, (steps or [0])[-1] + 1, signal.SIGUSR1, {**env, "SLURM_RESTART_COUNT": restarts})
        steps.append(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"])
        assert job.proc.returncode == 75 and "Traceback" not in job.output
        assert calls.read_text() == "requeue 4242\n" * (attempt + 1)
        outputs.append(job.output)
    command = f"python train.py paths.log_dir={tmp_path}/outputs {' '.join(args)}"
    assert outputs[0].strip().splitlines()[-1] == f"preempted: stopped by SIGUSR1; resume from step {steps[0]} with: {command}"
    train_steps = pd.read_csv(run_dir / "metrics.csv").dropna(subset="train/loss").step.tolist()
    assert train_steps == list(range(len(train_steps))) and len(train_steps) >= steps[1]  # resumed: every step once
    assert [a["status"] for a in attempts_of(run_dir)] == ["preempted", "preempted"]
    assert results_of(run_dir)["status"] == "preempted" and results_of(run_dir)["process"]["slurm_job"] == "4242"
    run_id = (run_dir / "wandb_id").read_text()
    wandb_runs = sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*"))
    print(f"scontrol calls: {calls.read_text().splitlines()}; W&B run ids of the two attempts: {wandb_runs}; steps {steps}")
    assert wandb_runs == [run_id, run_id] and steps[0] < steps[1]


# ---------------------------------------------------------------- DDP on CPU


def test_ranks_sum_their_nll_rather_than_average_their_bpc():
    """The sum the metric reduces across ranks (its ``dist_reduce_fx``, applied by merge_state as a DDP sync applies
    it) gives the one-process bpc; the mean of per-rank bpc would not (the ranks score unequal shares)."""
    tokens = torch.randint(0, 256, (1000,)).numpy()
    nll_of_token = torch.rand(256, dtype=torch.float64) * 8  # a stand-in model: a fixed NLL per target byte

    def score(chunks: EvalChunks) -> SummedNLL:
        metric = SummedNLL()
        for i in range(len(chunks)):
            _, y = chunks[i][:2]
            metric.update(nll_of_token[y.clamp(min=0)].unsqueeze(0), (y != IGNORE).unsqueeze(0))
        return metric

    def bpc(metric: SummedNLL) -> float:
        return metrics_from_sums(metric.nll_sum.item(), metric.count.item(), "byte")["bpc"]

    ranks = [score(EvalChunks(tokens, 64, rank, 2)) for rank in (0, 1)]
    assert (ranks[0].count.item(), ranks[1].count.item()) == (512, 487)  # 16 chunks, the last one short
    mean_of_ranks = sum(map(bpc, ranks)) / 2
    ranks[0].merge_state(ranks[1])
    expected = nll_of_token[torch.as_tensor(tokens[1:]).long()].sum().item() / 999 / math.log(2)  # every target once
    assert bpc(ranks[0]) == pytest.approx(expected, abs=1e-12) == bpc(score(EvalChunks(tokens, 64)))
    assert abs(mean_of_ranks - expected) > 1e-4


DDP = [*SMOKE, "trainer.val_check_interval=2", "logger=none"]


def test_two_ddp_processes_train_and_validate_as_one_at_the_same_global_batch(tmp_path):
    args = [*DDP, "trainer.max_steps=4", "checkpoint.every_n_train_steps=2"]
    run_train([*args, "task_name=single", "data.batch_size=8"], tmp_path)
    run_train([*args, "task_name=ddp", "hardware=ddp_cpu", "data.batch_size=4"], tmp_path)
    single, ddp = (results_under(tmp_path / "outputs" / name)[0] for name in ("single", "ddp"))
    print(f"val/bpc: 1 process {single['metrics']['val/bpc']!r}, 2 processes {ddp['metrics']['val/bpc']!r}")
    for key in ("val/bpc", "test/bpc"):  # fp32 gradients all-reduced in another order: equal to ~1e-9 after 4 steps
        assert ddp["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6)
    assert ddp["evaluation"]["test"]["targets"] == single["evaluation"]["test"]["targets"]  # every target once, both ranks
    ddp_dir = ddp["found_in"]
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert [a["status"] for a in attempts_of(ddp_dir)] == ["finished"]  # rank 1 wrote no line
    assert pd.read_csv(ddp_dir / "metrics.csv").dropna(subset="train/loss").step.tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_signal_to_a_ddp_job_ends_both_ranks_at_one_step_and_the_rerun_resumes(tmp_path):
    """SIGTERM to rank 0 alone: the ranks agree at the next step boundary, both stop, rank 0 checkpoints; the same
    command resumes both ranks to the uninterrupted run's numbers."""
    args = [*DDP, "trainer.max_steps=12", "checkpoint.every_n_train_steps=1", "hardware=ddp_cpu", "data.batch_size=4"]
    straight = run_train([*args, "task_name=straight"], tmp_path)
    assert straight.returncode == 0
    job, run_dir = killed_after(args, tmp_path, step=1, signum=signal.SIGTERM)
    assert job.proc.returncode == 75 and "Traceback" not in job.output
    assert job.output.count("preempted: stopped by SIGTERM") == 1  # rank 0 alone speaks
    assert results_of(run_dir)["status"] == "preempted"
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    rank1 = subprocess.run(["pgrep", "-f", f"{run_dir}"], capture_output=True, text=True).stdout.split()
    assert not rank1  # no process of the job is left
    run_train(args, tmp_path)
    reference = results_under(tmp_path / "outputs" / "straight")[0]["metrics"]
    resumed = results_of(run_dir)["metrics"]
    difference = resumed["val/bpc"] - reference["val/bpc"]
    print(f"DDP SIGTERM at step {stopped_at} then rerun: val/bpc difference {difference:.3e}")
    assert abs(difference) <= 1e-6


# ---------------------------------------------------------------- one live run per folder


@pytest.mark.slow
def test_a_second_start_in_a_live_runs_folder_is_refused_and_overwrite_never_takes_it(tmp_path):
    """The same command twice, then overwrite=true, while the first run is alive: both are refused in one sentence
    that names the live process, before anything in its folder is written; the first run finishes alone."""
    args = [*SMOKE, "logger=none", "trainer.max_steps=20", "checkpoint.every_n_train_steps=1"]
    first = Train(args, tmp_path)
    first.wait_for(lambda: list((tmp_path / "outputs").glob("train/runs/*/checkpoints")), "a run folder")
    run_dir = only_run_dir(tmp_path / "outputs")
    first.wait_for(checkpoint_at_step(run_dir, 1), "a checkpoint")
    hydra_config = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    for extra in ([], ["overwrite=true"]):
        second = run_train([*args, *extra], tmp_path, check=False)
        message = second.stderr.strip().splitlines()[-1]
        print(message)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert message.startswith(f"error: {run_dir} is in use by a live run (process {first.proc.pid} on {socket.gethostname()}, ")
        assert first.proc.poll() is None
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == hydra_config  # refused before Hydra wrote into it
    first.finish()
    assert first.proc.returncode == 0
    assert [a["status"] for a in attempts_of(run_dir)] == ["finished"]
    steps = pd.read_csv(run_dir / "metrics.csv").dropna(subset="train/loss").step
    assert steps.tolist() == list(range(20))  # every step once


def test_a_live_run_holds_its_folder_until_its_process_ends(tmp_path):
    """Another process holding the folder: a run there is refused in one sentence naming it, overwrite=true too,
    and nothing is written; the OS releases the lock when that process is killed."""
    folder = tmp_path / "run"
    hold = (
        "import sys, time; from mswa.folders import FolderInUse, FolderLock; FolderLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        for extra in ([], ["overwrite=true"]):
            with pytest.raises(FolderInUse) as refused:
                train(compose_config([*SMOKE, "logger=none", *extra], tmp_path), RunInfo(str(folder)))
            assert str(refused.value).startswith(f"{folder} is in use by a live run (process {holder.pid} on {socket.gethostname()}, ")
            assert str(refused.value).endswith("(overwrite=true never takes the folder of a live run)")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before == {"run.lock": b"", "run.lock.json": before["run.lock.json"]}
        assert FolderLock(folder).alive()
    finally:
        holder.kill()
        holder.wait()
    assert not FolderLock(folder).alive()  # released by the OS with the killed process


def test_a_file_system_without_locks_is_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with FolderLock(tmp_path / "run").held():
        pass
    message = f"warning: {tmp_path / 'run'} cannot be locked (No locks available); a second run there would not be stopped\n"
    assert capsys.readouterr().err == message
