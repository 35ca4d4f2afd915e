"""One training run of a composed config: check, build, fit, evaluate, write results.json.

train.py composes the config with Hydra and calls :func:`train` with it (a plain dict: it is what
results.json records); the run checks it into its typed form (mswa/config.py) and hands each part of
the house its settings. Tests, notebooks and other launchers call :func:`train` the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from mswa.atomic import write_atomic
from mswa.checks import check_checkpoint, check_config, check_memory, check_repeated_overrides, warn_full_attention
from mswa.config import ConfigError, DatasetConfig, RunConfig, WandbConfig, with_wandb_environment
from mswa.data.batches import eval_context
from mswa.data.corpus import Corpus
from mswa.factory import build_model, build_schedule, finish_pretrained, learned_spans, model_spec, with_pretrained_shape
from mswa.flops import training_flops_per_token
from mswa.folders import FolderLock
from mswa.lit import (
    AtomicCheckpointIO,
    CorpusDataModule,
    FolderCheckpoint,
    GracefulInterrupt,
    Heartbeat,
    LanguageModelTask,
    NonFiniteLossError,
    RunError,
    RunInterrupted,
    Throughput,
    read_checkpoint,
    save_resumable_checkpoint,
)
from mswa.model import LanguageModel
from mswa.progress import messages_shown, progress
from mswa.slurm import cluster_plugins, job_id, requeue
from mswa.sweeps import warn_if_repeating
from mswa.windows import WindowSchedule, corpus_label, custom_schedule_yaml

HEARTBEAT_EVERY_S = 60.0  # how often a live run rewrites results.json; the report reads it from there
# Lightning's output that is not ours to act on (matched by message: other warnings stay on)
QUIET_WARNINGS = (
    r"Experiment logs directory .* exists and is not empty",
    r"Checkpoint directory .* exists and is not empty",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
)
QUIET_INFO = ("💡 Tip: For seamless cloud logging",)
TRAIN_PATH_KEYS = ("ckpt_path", "hydra.run.dir")  # train.py's overrides that name a run's files (see quote_paths)
LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"  # the logger of Lightning's rank_zero_info messages
STEP_CONVENTION = "optimizer steps done"  # results.json says metrics.csv's steps are the measured weights' steps
log = logging.getLogger(__name__)


def check_corpus(cfg: RunConfig, corpus: Corpus, eval_seq_len: int) -> None:
    if cfg.pretrained and corpus.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"dataset {corpus.name!r} has {corpus.vocab_size} token ids but model.pretrained has {cfg.model.vocab_size}; "
            "tokenise with the model's tokenizer (dataset=packed_text does)"
        )
    for split, tokens in corpus.splits.items():
        needed = cfg.seq_len + 1 if split == "train" else 2
        if len(tokens) < needed:
            raise ConfigError(
                f"seq_len={cfg.seq_len} needs at least {needed} tokens in the {split} split of {corpus.name!r}, "
                f"which has {len(tokens)}; lower seq_len or use a larger dataset"
            )
        if corpus.source is not None and split != "train" and len(tokens) < eval_seq_len + 1:  # the user's fractions decide
            raise ConfigError(
                f"the {split} split of {corpus.name!r} holds {len(tokens):,} bytes, less than one evaluation window "
                f"({eval_seq_len + 1:,}); raise its share in dataset.loader.split_fractions or use a larger corpus"
            )
    warn_short_evaluations(corpus, eval_seq_len, cfg.data.val_max_tokens)


def warn_short_evaluations(corpus: Corpus, eval_seq_len: int, val_max_tokens: int | None = None) -> None:
    """Legal, but its loss says little: an evaluation that scores fewer targets than one evaluation window."""
    short = f"fewer than one evaluation window (eval.seq_len={eval_seq_len}), so its loss says little"
    for split in ("valid", "test"):
        if (targets := len(corpus.splits[split]) - 1) < eval_seq_len:
            print(
                f"warning: the {split} split of {corpus.name!r} holds {targets:,} target(s), {short}; use a larger corpus", file=sys.stderr
            )
    if val_max_tokens is not None and val_max_tokens < min(eval_seq_len, len(corpus.splits["valid"]) - 1):
        print(
            f"warning: validation during training scores data.val_max_tokens={val_max_tokens} target(s), {short}; "
            "raise data.val_max_tokens or set it null",
            file=sys.stderr,
        )


def load_corpus(dataset: DatasetConfig) -> Corpus:
    try:
        return instantiate(dataset.loader)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):  # the loader's own one-sentence DataError, not Hydra's wrapping
            raise error.__cause__ from None
        raise


def folder_name(name: str, limit: int = 200) -> str:
    """A run's folder name: its overrides, one folder whatever their values (a `/` becomes `%2F`), cut and
    given a hash of the whole when too long for the file system (255 bytes), so that distinct runs keep
    distinct folders."""
    name = name.replace("%", "%25").replace("/", "%2F")
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return name.encode()[: limit - 13].decode(errors="ignore") + "-" + digest


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except OSError:
        return None


class RunFolder:
    """Paths of one run, its results.json and its attempts log (written by rank 0 only).

    An attempt that finds the folder holding a run (checkpoints, or finished results) leaves that run's
    results.json, metrics.csv and checkpoints as they are until it owns the folder: when training starts
    (after a resumed checkpoint has loaded) or when it starts over (overwrite=true, all checks passed).
    Every attempt, refused or not, is appended to attempts.jsonl."""

    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.last = self.checkpoints / "last.ckpt"
        self.results_path = path / "results.json"
        self.attempts_path = path / "attempts.jsonl"
        self.wandb_id_path = path / "wandb_id"
        self.owned = not self.holds_run()

    def held(self):
        """The folder's lock for this attempt's life, taken by rank 0 (which alone writes)."""
        return FolderLock(self.path).held() if rank_zero_only.rank == 0 else contextlib.nullcontext()

    def holds_run(self) -> bool:
        """Something to keep: a checkpoint, or results of a finished run."""
        return any(self.checkpoints.glob("*.ckpt")) or self.status() == "finished"

    def status(self) -> str | None:
        """The status its results.json records (None: none readable)."""
        try:
            return json.loads(self.results_path.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return None

    def relative(self, path: str | Path | None) -> str | None:
        return None if path is None else Path(path).resolve().relative_to(self.path.resolve()).as_posix()

    def resolve_resume(self, ckpt_path: str | None, overwrite: bool) -> str | None:
        if ckpt_path == "last":
            if not self.last.exists():
                raise ConfigError(
                    f"ckpt_path=last but {self.last} does not exist; run without ckpt_path to start this run, or continue "
                    "another run's checkpoint with ckpt_path=PATH (an override that differs names another run folder)"
                )
            return str(self.last)
        if ckpt_path is not None:
            if not Path(ckpt_path).is_file():
                raise ConfigError(f"ckpt_path={ckpt_path} is not a file; give a .ckpt path or ckpt_path=last")
            return ckpt_path
        if self.last.exists() and not overwrite and self.status() == "preempted":  # what a requeued job runs
            if rank_zero_only.rank == 0:
                log.info(f"resuming: {self.path} from checkpoints/last.ckpt (preempted at step {checkpoint_step(self.last)})")
            return str(self.last)
        if self.last.exists() and not overwrite:
            raise ConfigError(
                f"{self.path} already holds a run (checkpoints/last.ckpt); resume it with ckpt_path=last or start over with overwrite=true"
            )
        if self.holds_run() and not overwrite:
            raise ConfigError(f"{self.path} already holds a finished run (results.json); start over with overwrite=true")
        return None

    def start_over(self) -> None:
        """A fresh run (overwrite=true) takes the folder: the earlier run's checkpoints and W&B id go."""
        if rank_zero_only.rank == 0 and not self.owned:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            self.wandb_id_path.unlink(missing_ok=True)
        self.owned = True

    def wandb_id(self) -> str:
        if not self.wandb_id_path.exists() and rank_zero_only.rank == 0:
            write_atomic(self.wandb_id_path, secrets.token_hex(4))
        return self.wandb_id_path.read_text().strip()

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    def set_aside_metrics(self) -> Path | None:
        """Lightning's CSVLogger starts metrics.csv afresh; keep a resumed run's earlier rows to merge back."""
        if not self.metrics_csv.exists() or rank_zero_only.rank != 0:
            return None
        return self.metrics_csv.rename(self.path / "metrics.before_resume.csv")

    def merge_metrics(self, earlier: Path, resumed_step: int) -> None:
        """The earlier rows measured on weights of fewer steps than the resumed checkpoint's (and its own
        evaluations, at its step), then the resumed attempt's rows; an attempt that never owned the folder puts
        the earlier file back as it was."""
        if not self.owned:
            earlier.replace(self.metrics_csv)
            return
        now = pd.read_csv(self.metrics_csv) if self.metrics_csv.exists() else pd.DataFrame(columns=["step"])
        before = pd.read_csv(earlier)
        evaluation = before.filter(regex=r"^(val|test)/").notna().any(axis=1)
        before = before[(before["step"] < resumed_step) | (evaluation & (before["step"] == resumed_step))]
        write_atomic(self.metrics_csv, pd.concat([before, now], ignore_index=True).to_csv(index=False))
        earlier.unlink()

    @rank_zero_only
    def write(self, results: dict) -> None:
        """results.json, only while this attempt owns the folder."""
        if self.owned:
            write_atomic(self.results_path, json.dumps(results, indent=2, default=str))

    @rank_zero_only
    def record_attempt(self, attempt: dict) -> None:
        """This attempt's line of attempts.jsonl: added when it starts (status ``running``), replaced by its end
        (the whole file rewritten and renamed, so never half a line). A line left ``running`` by a process that
        is gone is an attempt killed before it could record its end."""
        lines = self.attempts_path.read_text().splitlines() if self.attempts_path.exists() else []
        mine = [i for i, line in enumerate(lines) if attempt_id(line) == attempt["attempt"]]
        record = json.dumps(attempt, default=str)
        if mine:
            lines[mine[0]] = record
        else:
            lines.append(record)
        write_atomic(self.attempts_path, "\n".join(lines) + "\n")


def attempt_id(line: str) -> str | None:
    """The id of the attempt an attempts.jsonl line records (lines written before ids have none)."""
    try:
        return json.loads(line).get("attempt")
    except ValueError:
        return None


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint was saved at (memory-mapped: the tensors are not read)."""
    try:
        return read_checkpoint(path)["global_step"]
    except Exception:  # noqa: BLE001 - a missing or unreadable checkpoint has no step to tell
        return None


def checkpoint_dataset(path: str, stored: dict) -> str | None:
    """The dataset a checkpoint trained on: recorded in it, else (one written before checkpoints recorded it) in
    the results.json of the run folder holding it; None when neither says."""
    name = stored["hyper_parameters"].get("dataset")
    folder = Path(path).resolve().parent
    if name is None and folder.name == "checkpoints":
        try:
            return json.loads((folder.parent / "results.json").read_text()).get("dataset")
        except (OSError, ValueError):
            return None
    return name


@rank_zero_only
def warn_if_other_dataset(path: str, trained_on: str | None, dataset: str) -> None:
    """A resume on another dataset is a fine-tune, or a mistake: one line says which."""
    if trained_on not in (None, dataset):
        message = f"warning: ckpt_path={path} was trained on dataset {trained_on!r}; this run trains and evaluates on {dataset!r}"
        print(message, file=sys.stderr)


def build_loggers(cfg: RunConfig, folder: RunFolder, run: RunInfo, plain: dict) -> list:
    """The CSV log every run writes, and W&B when logger=wandb and not disabled (its run config: ``plain``, as results.json
    has it)."""
    loggers = [CSVLogger(save_dir=str(folder.path), name="", version="")]
    log = cfg.logger
    if isinstance(log, WandbConfig) and log.mode != "disabled":
        import wandb

        tags = [f"dataset={cfg.dataset.name}", f"model={cfg.model.name}", f"schedule={cfg.window_schedule.name}", *log.tags]
        loggers.append(
            WandbLogger(
                project=log.project,
                entity=log.entity,
                name=run.name,
                group=log.group or run.group,
                job_type=log.job_type,
                tags=tags,
                mode=log.mode,
                save_dir=log.dir or str(folder.path),
                id=folder.wandb_id(),
                resume="allow",
                config=plain,
                settings=wandb.Settings(quiet=True),  # its history table repeats metrics.csv; the summary says where the run is
            )
        )
    return loggers


def build_trainer(cfg: RunConfig, folder: RunFolder, loggers: list, callbacks: list) -> L.Trainer:
    """Lightning's Trainer: one endless epoch stopped by trainer.max_steps, validated every val_check_interval steps."""
    return L.Trainer(
        **{"enable_model_summary": False, **cfg.hardware, **cfg.trainer},
        logger=loggers,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        callbacks=callbacks,
        default_root_dir=str(folder.path),
        use_distributed_sampler=False,
        deterministic=False,
    )


def summarise_wandb(loggers: list, metric: str, entropy_floor: float | None) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            run = logger.experiment
            for stage in ("val", "test"):
                run.define_metric(f"{stage}/{metric}", summary="min")
            run.define_metric("val/loss", summary="min")
            if entropy_floor is not None:
                run.summary["data/entropy_floor_bpb"] = entropy_floor


def finish_wandb(loggers: list, results: dict, mirror: bool) -> None:
    """Mirror results.json into the W&B summary (what `mswa.report --wandb` reads) when this attempt wrote
    it, then close the run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0 and logger._experiment is not None:
            if mirror:
                logger._experiment.summary["results"] = json.loads(json.dumps(results, default=str))
            if results["status"] == "preempted":
                logger._experiment.mark_preempting()  # W&B shows it as preempted, not crashed
            logger._experiment.finish(exit_code=0 if results["status"] == "finished" else 1)


@dataclass
class RunInfo:
    """Where a run lives and how it is named (train.py fills it from Hydra)."""

    dir: str
    name: str = "default"
    variant: str = "default"  # the name without the seed: seeds of one variant are aggregated (mswa.sweeps.variant_name)
    overrides: list[str] = field(default_factory=list)
    group: str | None = None  # W&B group: the sweep folder of a multirun
    hydra_overrides: list[str] = field(default_factory=list)  # hydra.* ones a resume needs (e.g. hydra.run.dir=)
    job: str | None = None  # a multirun job's tag (``#3 model=swa,seed=1``), on its progress bars
    shares_output: bool = False  # parallel jobs write to one stream (a multirun's joblib launcher): lines, never bars

    def given_keys(self) -> set[str]:
        """The config keys the command line set."""
        return {override.split("=")[0].lstrip("+~") for override in self.overrides}


def resume_command(run: RunInfo, preempted: bool = False) -> str:
    """The command that continues this run from its last checkpoint: for a preempted run the same command (what a
    requeued job runs resumes it), for others with ckpt_path=last."""
    kept = [o for o in run.overrides if o.split("=")[0].lstrip("+~") not in ("ckpt_path", "overwrite")]
    return shlex.join(["python", "train.py", *kept, *run.hydra_overrides, *([] if preempted else ["ckpt_path=last"])])


def quiet_lightning() -> None:
    """Leave out Lightning's output that is not ours to act on; matched by message, other warnings stay.
    Safe to repeat: a filter added twice is kept once."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger(LIGHTNING_INFO).addFilter(not_ours)  # on the logger that makes them, wherever they are sent


def not_ours(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(QUIET_INFO)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def train(cfg: dict, run: RunInfo) -> dict:
    """Check, build, fit, evaluate the best checkpoint on valid and test, and write (and return) the results. Faults a
    user can act on come out as one sentence: ConfigError, RunError (NaN, full disk, unloadable checkpoint),
    RunInterrupted (Ctrl-C, SIGTERM, SIGUSR1, with the resume command)."""
    with messages_shown():
        return Attempt(cfg, run).run()


class Attempt:
    """One call of train() on a run folder: its steps, its results, and what it records and cleans up however it ends.
    Each step leaves what the next one needs on the attempt."""

    def __init__(self, cfg: dict, run: RunInfo):
        self.plain, self.run_info, self.folder = cfg, run, RunFolder(Path(run.dir))
        self.process = {
            "attempt": secrets.token_hex(4),  # its line in attempts.jsonl
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now(),
            "heartbeat_every_s": HEARTBEAT_EVERY_S,
            "slurm_job": job_id(),  # requeued when preempted
        }
        self.results = {
            "schema": 1,
            "status": "running",
            "error": None,
            "run_name": run.name,
            "variant": run.variant,
            "seed": cfg["seed"],
            "overrides": run.overrides,
            "config": cfg,
            "dataset": cfg["dataset"]["name"],
            "model": cfg["model"]["name"],
            "schedule": cfg["window_schedule"]["name"],
            "git_commit": git_commit(),
            "process": self.process,
            "step_convention": STEP_CONVENTION,
        }
        self.loggers: list = []
        self.earlier_metrics: Path | None = None
        self.started, self.ended = time.time(), False

    def run(self) -> dict:
        quiet_lightning()
        with self.folder.held():  # first: a folder a live run holds is refused before anything in it is touched
            return self.attempt()

    def attempt(self) -> dict:
        try:
            self.record("running")  # first, so that even a kill leaves a line
            with GracefulInterrupt(str(self.folder.last)) as interrupt:
                self.check()
                self.build()
                self.fit(interrupt)
                self.evaluate()
            self.write()  # a finished run's results that cannot be saved are its error
            return self.results
        except BaseException as error:  # noqa: BLE001 - signals and crashes are recorded, then re-raised
            stop = explain(error, self.folder, self.run_info)
            if not self.ended:
                self.stopped(stop)
                self.write(after=stop)
            self.end_other_ranks()
            if self.results["status"] == "preempted" and self.process["slurm_job"] and rank_zero_only.rank == 0:
                log.info(requeue(self.process["slurm_job"]))  # last: SLURM ends the job as it requeues it
            if stop is error:
                raise
            raise stop from None

    def record(self, status: str) -> None:
        """This attempt's line of attempts.jsonl: ``running`` at its start, how it ended at its end."""
        ended = None if status == "running" else now()
        self.folder.record_attempt(
            {
                "attempt": self.process["attempt"],
                "started": self.process["started"],
                "ended": ended,
                "status": status,
                "error": self.results["error"],
                "pid": self.process["pid"],
                "host": self.process["host"],
                "overrides": self.run_info.overrides,
            }
        )

    def check(self) -> None:
        """Every check that needs no model, the data loaded on the way; nothing in the folder is touched but the
        metrics of a run to resume, set aside to merge back."""
        check_repeated_overrides(self.run_info.overrides)
        self.plain["logger"] = with_wandb_environment(self.plain["logger"], self.run_info.given_keys())
        self.cfg = cfg = check_config(self.plain)
        if cfg.pretrained:  # its shape is recorded with the run's config
            cfg.model = with_pretrained_shape(cfg.model)
            self.plain["model"].update(n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, vocab_size=cfg.model.vocab_size)
        self.eval_context = eval_context(self.plain)
        self.schedule = build_schedule(cfg)
        learned_spans(cfg, self.schedule)  # window_schedule=learned's settings, refused here rather than once data is loaded
        check_memory(cfg, self.schedule)
        warn_full_attention(cfg, self.schedule)
        self.resume = self.folder.resolve_resume(cfg.ckpt_path, cfg.overwrite)
        self.earlier_metrics = self.folder.set_aside_metrics() if self.resume else None
        self.resumed_step = checkpoint_step(Path(self.resume)) if self.resume else 0
        self.corpus = load_corpus(cfg.dataset)
        check_corpus(cfg, self.corpus, self.eval_context[0])
        check_memory(cfg, self.schedule, self.corpus.vocab_size)
        if self.corpus.source is not None:
            self.results["data_source"] = self.corpus.source

    def build(self) -> None:
        """The model (a checkpoint to resume must be of it) and its task; a fresh run then takes the folder."""
        cfg, corpus, schedule = self.cfg, self.corpus, self.schedule
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        spec = model_spec(cfg, corpus.vocab_size, schedule)
        stored = check_checkpoint(self.resume, spec)
        self.resumed_step = stored and stored["global_step"]
        if stored:
            warn_if_other_dataset(self.resume, checkpoint_dataset(self.resume, stored), cfg.dataset.name)
        model = build_model(cfg.model, spec)
        self.task = task = LanguageModelTask(model, cfg.optim, corpus.unit, cfg.compile, spec, cfg.dataset.name)
        self.results.update(
            unit=corpus.unit,
            metric=corpus.metric,
            window=schedule.w,
            windows=schedule.as_lists(),
            budget=schedule.budget(cfg.seq_len),
            n_params=task.model.n_params(),
            n_trainable=sum(p.numel() for p in task.parameters() if p.requires_grad),
            model_flops_per_token=training_flops_per_token(model.cfg, cfg.seq_len) if isinstance(model, LanguageModel) else None,
            entropy_floor_bpb=corpus.entropy_floor_bpb,
            evaluation=dict(zip(("seq_len", "stride"), self.eval_context)),
        )
        if not self.resume:
            self.folder.start_over()
        self.folder.write(self.results)

    def fit(self, interrupt: GracefulInterrupt) -> None:
        """Train to trainer.max_steps (from the checkpoint to resume), checkpointing the best and the last weights."""
        cfg, folder, data_cfg = self.cfg, self.folder, self.cfg.data
        self.data = CorpusDataModule(
            self.corpus,
            cfg.seq_len,
            data_cfg.batch_size,
            data_cfg.eval_batch_size,
            cfg.seed,
            data_cfg.val_max_tokens,
            data_cfg.aligned_chunks,
            *self.eval_context,
        )
        self.best = FolderCheckpoint(dirpath=folder.checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1)
        last = FolderCheckpoint(
            dirpath=folder.checkpoints, save_top_k=0, save_last=True, every_n_train_steps=cfg.checkpoint.every_n_train_steps
        )
        self.throughput = Throughput(data_cfg.batch_size, cfg.seq_len, self.results["model_flops_per_token"])
        self.loggers = build_loggers(cfg, folder, self.run_info, self.plain)
        self.trainer = build_trainer(
            cfg,
            folder,
            self.loggers,
            [
                self.best,
                last,
                self.throughput,
                interrupt,
                Heartbeat(self.beat, HEARTBEAT_EVERY_S),
                progress(self.run_info.job, self.run_info.shares_output),
            ],
        )
        summarise_wandb(self.loggers, self.corpus.metric, self.corpus.entropy_floor_bpb)
        if rank_zero_only.rank == 0:
            log.info(self.schedule.describe(cfg.seq_len))
            log.info(f"{self.results['n_params']:,} parameters, {self.results['n_trainable']:,} trained")
            warn_if_repeating(self.plain, len(self.corpus.splits["train"]))
        max_steps = cfg.trainer["max_steps"]
        trained_out = self.resumed_step is not None and self.resumed_step >= max_steps
        if trained_out and rank_zero_only.rank == 0:
            print(
                f"ckpt_path={self.resume} is already at step {self.resumed_step}, trainer.max_steps={max_steps}: nothing to train, "
                "so it is evaluated and kept as this run's checkpoints/last.ckpt; raise trainer.max_steps to train further"
            )
        fit_from(self.resume, self.trainer, self.task, self.data, folder)
        folder.owned = True  # a resume that had nothing left to train loaded fine too
        if trained_out and Path(self.resume).resolve() != folder.last.resolve():
            save_resumable_checkpoint(self.trainer, folder.last)  # another folder's checkpoint: this run's folder gets its own
        if interrupt.requested:
            raise interrupt.stop()

    def evaluate(self) -> None:
        """The best checkpoint (else the final weights) on full passes of valid and test; a pretrained model's adapter
        saved, and lm_eval run when configured."""
        trainer, task, data, results = self.trainer, self.task, self.data, self.results
        data.val_max_tokens = None  # the final numbers are full passes over each split
        evaluated = self.best.best_model_path or None
        trainer.validate(task, datamodule=data, ckpt_path=evaluated, verbose=False)
        trainer.test(task, datamodule=data, ckpt_path=evaluated, verbose=False)
        results.update(
            metrics=dict(task.eval_results),
            steps=trainer.global_step,
            tokens_per_s=self.throughput.mean_tokens_per_s,
            mfu=self.throughput.mean_mfu,
            matmul_flops_per_s=self.throughput.peak_flops_per_s,
            evaluated_checkpoint=self.folder.relative(evaluated),
            evaluated_step=evaluated and checkpoint_step(Path(evaluated)),
            evaluation={**data.eval_settings, **task.eval_details},
        )
        soft_ratio = task.model.soft_pairs_vs_swa() if hasattr(task.model, "soft_pairs_vs_swa") else None
        if soft_ratio is not None:
            self.evaluate_hardened(soft_ratio.detach().item(), task.model.harden_spans())
        if self.cfg.pretrained and rank_zero_only.rank == 0:
            record = {
                "schedule": results["schedule"],
                "pretrained": self.cfg.model.pretrained,
                "checkpoint": results["evaluated_checkpoint"],
            }
            wandb_run = next((logger.experiment for logger in self.loggers if isinstance(logger, WandbLogger)), None)
            results["lm_eval"] = finish_pretrained(self.cfg, task.model, self.folder.path, wandb_run, record)
        # only now: heartbeats during the evaluations above write results.json, and a run killed among them is not finished
        results["status"] = "finished"

    def evaluate_hardened(self, soft_pairs: float, windows: list[list]) -> None:
        """Learned spans, hardened to ``windows``: the final numbers are those of the hardened model (what the schedule
        file beside results.json trains), beside the soft mask's and their difference."""
        trainer, task, data, results = self.trainer, self.task, self.data, self.results
        soft = dict(task.eval_results)
        trainer.validate(task, datamodule=data, verbose=False)  # the loaded checkpoint's weights, hardened
        trainer.test(task, datamodule=data, verbose=False)
        schedule = WindowSchedule(f"learned_{corpus_label(self.corpus.name)}", self.schedule.w, tuple(map(tuple, windows)))
        budget = schedule.budget(self.cfg.seq_len)
        spans, hardened = task.model.cfg.learned_spans, dict(task.eval_results)
        results.update(
            metrics=hardened,
            windows=windows,
            budget=budget,
            evaluation={**data.eval_settings, **task.eval_details},
            learned={
                "budget_target": spans["budget"],
                "ramp": spans["ramp"],
                "soft_pairs_vs_swa": soft_pairs,
                "hardened_pairs_vs_swa": budget["pairs_vs_swa"],
                "multiplier": float(task.model.span_multiplier),
                "soft_metrics": soft,
                "hardened_minus_soft": {key: value - soft[key] for key, value in hardened.items() if key in soft},
                "schedule_file": f"{schedule.name}.yaml",
            },
        )
        if rank_zero_only.rank == 0:
            metric = f"test/{self.corpus.metric}"
            header = [
                f"{schedule.name}: windows learned by the run in {self.folder.path.resolve()} (seed {self.cfg.seed})",
                f"spans with a soft ramp of {spans['ramp']} tokens, budget {spans['budget']:.6f} x SWA(w={schedule.w}) in attended "
                f"pairs at seq_len={self.cfg.seq_len}; soft mask at the end: {soft_pairs:.6f}",
                f"hardened to the integer windows of the nearest attended pairs: {metric} {results['metrics'][metric]:.6f} "
                f"({results['learned']['hardened_minus_soft'][metric]:+.6f} against the soft mask)",
                *schedule.describe(self.cfg.seq_len).splitlines()[-2:],
            ]
            write_atomic(self.folder.path / f"{schedule.name}.yaml", custom_schedule_yaml(schedule.name, windows, header))
            log.info(schedule.describe(self.cfg.seq_len) + "\n" + header[2])

    def beat(self) -> None:
        """Training has started, so a resumed checkpoint has loaded: the folder is this run's."""
        self.folder.owned = True
        self.process["heartbeat"] = now()
        self.folder.write(self.results)

    def end_other_ranks(self) -> None:
        """Rank 0 of a DDP run it launched itself (hardware=ddp_cpu) has stopped: ranks still waiting for it in a collective
        (after a second signal, a fault) would wait until gloo's timeout (30 minutes). They write nothing, so they end now."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.strategy.launcher is not None and rank_zero_only.rank == 0:
            trainer.strategy.launcher.kill(signal.SIGKILL)

    def stopped(self, stop: BaseException) -> None:
        one_sentence = isinstance(stop, (ValueError, RunError, RunInterrupted))
        if isinstance(stop, RunInterrupted):
            status = stop.status
        else:
            status = "interrupted" if isinstance(stop, (KeyboardInterrupt, SystemExit)) else "failed"
        self.results.update(status=status, error=str(stop) if one_sentence else f"{type(stop).__name__}: {stop}")

    def write(self, after: BaseException | None = None) -> None:
        """results.json (if this attempt owns the folder), the attempts log, W&B, metrics.csv, the summary.
        ``after`` an error, a write that fails too (the same full disk) is reported, not raised over it."""
        self.ended = True
        folder, results = self.folder, self.results
        results["wall_time_s"] = time.time() - self.started
        try:
            folder.write(results)
            self.record(results["status"] if folder.owned else "refused")
        except OSError as error:
            if after is None:
                raise
            log.warning(
                f"warning: could not record how this attempt ended ({error.strerror}: {error.filename}); "
                "the report reads the run as stopped"
            )
        finish_wandb(self.loggers, results, mirror=folder.owned)
        if self.earlier_metrics is not None:
            folder.merge_metrics(self.earlier_metrics, self.resumed_step)
        if results["status"] == "finished" and rank_zero_only.rank == 0:
            log.info(summary_lines(results, folder))


def fit_from(resume: str | None, trainer: L.Trainer, task: LanguageModelTask, data: CorpusDataModule, folder: RunFolder) -> None:
    """trainer.fit from the checkpoint ``resume``; one that fails to load is refused in one sentence, the run's files kept."""
    try:
        trainer.fit(task, datamodule=data, ckpt_path=resume)
    except Exception as error:
        if not resume or folder.owned or isinstance(error, RunError):
            raise
        raise RunError(
            f"ckpt_path={resume} could not be resumed ({type(error).__name__}: {error}); the run's files are left as "
            "they were: give another checkpoint with ckpt_path=PATH, or start over with overwrite=true"
        ) from error


def explain(error: BaseException, folder: RunFolder, run: RunInfo) -> BaseException:
    """The one-sentence form of a fault the user can act on, with what to run next (the error itself for others)."""
    if isinstance(error, NonFiniteLossError):
        step = checkpoint_step(folder.last)
        retry = "lower optim.lr or raise optim.warmup_steps and start again"
        if step is not None:
            resume = shlex.quote(hydra_value("ckpt_path", folder.last.resolve()))
            retry += f", or continue from step {step} with {resume} (changed optim.* take effect)"
        return NonFiniteLossError(f"{error}; {retry}")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return RunError(
            f"no space left on the device writing {error.filename or folder.path}; free some space, then {what_next(folder, run)}"
        )
    if isinstance(error, KeyboardInterrupt):
        error = RunInterrupted("Ctrl-C")
    if isinstance(error, RunInterrupted):
        preempted = error.status == "preempted"
        return RunInterrupted(f"stopped by {error}; {what_next(folder, run, preempted)}", error.status)
    return error


def hydra_value(key: str, path: Path | str) -> str:
    """An override whose path may hold `=` or `,` (run folder names do), quoted for Hydra."""
    return f'{key}="{path}"'


def quote_paths(args: list[str], keys: tuple[str, ...]) -> list[str]:
    """Command-line overrides with the value of each of ``keys`` that names an existing file or folder quoted
    for Hydra, whose override grammar would parse the `=` and `,` of run folder names (``model=mswa,seed=0``):
    a path copied from our output works as typed."""

    def quoted(arg: str) -> str:
        key, _, value = arg.partition("=")
        if key.lstrip("+") not in keys or value[:1] in ("'", '"') or not Path(value).exists():
            return arg
        return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return [quoted(arg) for arg in args]


def what_next(folder: RunFolder, run: RunInfo, preempted: bool = False) -> str:
    step = checkpoint_step(folder.last)
    if step is None:
        return "start again with the same command (no checkpoint was written yet)"
    return f"resume from step {step} with: {resume_command(run, preempted)}"


def summary_lines(results: dict, folder: RunFolder) -> str:
    """The run's last words: its final metrics, the checkpoint they come from, where results.json is."""
    metric = results["metric"]
    scores = ", ".join(f"{split}/{metric} {results['metrics'][f'{split}/{metric}']:.6f}" for split in ("val", "test"))
    source = (
        f"{results['evaluated_checkpoint']} (step {results['evaluated_step']}, lowest val/loss)"
        if results["evaluated_checkpoint"]
        else "the final weights (no validation ran during training)"
    )
    lines = [f"finished {results['steps']} steps: {scores}, from {source}", f"results: {folder.results_path}"]
    last_step = checkpoint_step(folder.last)
    if last_step is not None:
        resume = shlex.quote(hydra_value("ckpt_path", folder.last.resolve()))
        lines.append(f"train further from step {last_step} with a higher trainer.max_steps and {resume}")
    logger = results["config"]["logger"]
    if logger["name"] == "wandb" and logger["mode"] == "offline":
        wandb_dir = Path(logger.get("dir") or folder.path) / "wandb"
        lines.append(f"W&B (offline): upload with wandb sync {shlex.quote(str(wandb_dir))}/offline-run-*")
    return "\n".join(lines)


def optimised_metric(results: dict) -> float:
    """What a Hydra sweeper minimises: the final validation bpc / ppl (inf when the run failed)."""
    value = results.get("metrics", {}).get(f"val/{results.get('metric', 'bpc')}")
    return float(value) if value is not None and math.isfinite(value) else math.inf
