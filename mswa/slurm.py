"""SLURM: how a run knows it is a SLURM job, and how a preempted one asks to be requeued.

SLURM stops a job with SIGTERM (preemption, ``scancel``, the time limit), after a warning signal some seconds
before the time limit when the job asked for one (``--signal=USR1@120``: conf/launcher/slurm.yaml sets it). Either
stops a run at a step boundary with its checkpoint (:class:`mswa.lit.GracefulInterrupt`); rank 0 records the run
as ``preempted``, then runs ``scontrol requeue <job id>``. SLURM puts the job back in the queue, and when it starts
again it runs the same command, which resumes a preempted run from ``checkpoints/last.ckpt`` (same W&B run id).

Lightning's own requeue (``SLURMEnvironment(auto_requeue=True)``, its default under SLURM) is turned off: it
saves a checkpoint from inside the signal handler, mid-step, and trains on until SLURM kills the job. Submitit's
checkpoint protocol works the same way (its handler runs mid-step and pickles the job to resubmit) and only
under the submitit launcher; ours needs no pickled state (the run folder holds it) and serves a plain
``sbatch``/``srun python train.py`` as well.
"""

from __future__ import annotations

import os
import subprocess

from lightning.fabric.plugins.environments import SLURMEnvironment


def job_id() -> str | None:
    """This process's SLURM job (``<array job>_<task>`` for an array task), or None when it is not a SLURM batch job
    (an interactive ``srun --pty bash`` is not requeued)."""
    if not SLURMEnvironment.detect():
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def cluster_plugins() -> list:
    """Lightning's SLURM environment (ranks, nodes, master address from SLURM) without its mid-step auto-requeue."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def requeue(job: str) -> str:
    """Ask SLURM to put ``job`` back in the queue; one line that says how it went."""
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"warning: could not requeue SLURM job {job} ({error}); resubmit the job to resume the run"
    if done.returncode:
        why = done.stderr.strip() or f"exit status {done.returncode}"
        return f"warning: {' '.join(command)} failed ({why}); resubmit the job to resume the run"
    return f"requeued: SLURM job {job} ({' '.join(command)}); it resumes from its checkpoint when it starts again"
