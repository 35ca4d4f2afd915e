"""Train a full, SWA or MSWA language model: `python train.py model=mswa` (see README)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from mswa.checks import check_launcher
from mswa.lit import RunError, RunInterrupted
from mswa.progress import show_on_console
from mswa.run import TRAIN_PATH_KEYS, RunInfo, folder_name, hydra_value, optimised_metric, quote_paths, train
from mswa.sweeps import continue_job, variant_name

OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)
log = logging.getLogger("mswa.train")
# A preempted run's exit status: EX_TEMPFAIL of sysexits.h, "try again later" (slurm.conf's RequeueExit=75 requeues
# on it; under SLURM the run has already asked for its requeue). Other stops exit 1.
PREEMPTED_EXIT = 75


class JobFailed(CompactHydraException):
    """A failed multirun job, once its one-line error is printed: Hydra records the job as failed, goes on with
    the others, and at the end names the first failed job with this line (no traceback)."""


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    run_name = hydra_cfg.job.override_dirname or "default"
    variant = variant_name(overrides, hydra_cfg.job.config.override_dirname.exclude_keys)  # paths, hardware: not a variant
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    launcher = hydra_cfg.runtime.choices.get("launcher")
    job = f"#{hydra_cfg.job.num} {run_name}" if multirun else None
    show_on_console(job)  # Hydra's logging config writes the job's train.log; the console is ours
    group = hydra_cfg.sweep.dir.rstrip("/").split("/")[-1] if multirun else None
    # a resume must find this folder again: a multirun job's, or one the command named
    run_dir = (
        [hydra_value("hydra.run.dir", hydra_cfg.runtime.output_dir)]
        if multirun
        else [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.run.dir=")]
    )
    try:
        check_launcher(launcher, multirun)
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        if multirun and (earlier := continue_job(plain, hydra_cfg.runtime.output_dir)) is not None:
            return optimised_metric(earlier)  # a rerun sweep skips its finished jobs and resumes the others
        shares_output = multirun and launcher != "basic"  # other launchers run jobs side by side, or elsewhere
        run = RunInfo(hydra_cfg.runtime.output_dir, run_name, variant, overrides, group, run_dir, job, shares_output)
        results = train(plain, run)
    except (ValueError, MissingMandatoryValue, RunError) as error:  # ConfigError, ScheduleError are ValueErrors
        log.error(f"error: {error}")
        if multirun:  # the sweep records this job as failed and goes on with the others
            raise JobFailed("its error is printed above and recorded in its results.json") from None
        sys.exit(1)
    except RunInterrupted as stop:
        if rank_zero_only.rank == 0:  # every rank of a DDP run stops on the same signal; one says so
            log.error(f"{stop.status}: {stop}")
        sys.exit(PREEMPTED_EXIT if stop.status == "preempted" else 1)
    return optimised_metric(results)


if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:], TRAIN_PATH_KEYS)
    main()
