"""Runs that survive a cluster: SLURM's preemption signal ends in a requeue that resumes the run (same W&B run)."""

import json
import os
import signal
import stat
from pathlib import Path

import pandas as pd
import torch

from helpers.runs import TINY_DATA, killed_after

SMOKE = ["debug=smoke", *TINY_DATA]


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def attempts_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]


def fake_slurm(tmp_path: Path, job: str = "4242") -> tuple[dict, Path]:
    """The environment of a SLURM batch job with one task (what Lightning's SLURM environment reads), and a stub
    ``scontrol`` first on PATH that appends its arguments to the returned file."""
    stub_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    stub_dir.mkdir()
    stub = stub_dir / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "mswa",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{stub_dir}:{os.environ['PATH']}",
        "WANDB_MODE": "offline",
    }
    return env, calls


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
