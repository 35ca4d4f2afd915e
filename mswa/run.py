"""One training run from a plain config dict: validate, build, fit, evaluate, write results.json.

train.py composes the config with Hydra and calls :func:`train`; nothing here imports Hydra, so
the same function serves tests, notebooks and other launchers.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from mswa.data.corpus import Corpus
from mswa.data.loading import eval_context
from mswa.lit import GracefulInterrupt, CorpusDataModule, LanguageModelTask, Throughput
from mswa.sweeps import warn_if_repeating
from mswa.windows import WindowSchedule, make_schedule

MODEL_KEYS = ("n_layer", "n_head", "d_model", "mlp_ratio", "dropout", "positions", "attn_backend", "output",
              "adaptive_cutoffs", "mixer", "layout", "pattern", "linear_feature_map", "linear_feature_dim")

PRETRAINED_KEYS = ("pretrained", "dtype", "lora", "gradient_checkpointing", "attn_backend")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def build_schedule(cfg: dict) -> WindowSchedule:
    ws, model = cfg["window_schedule"], cfg["model"]
    w = None if ws["name"] == "full" else cfg["window"]
    return make_schedule(
        ws["name"], w=w, n_layer=model["n_layer"], n_head=model["n_head"],
        head_ratios=ws.get("head_ratios"), layer_ratios=ws.get("layer_ratios"), windows=ws.get("windows"),
    )


def check_config(cfg: dict) -> None:
    """Checks that need no data; run before anything is loaded."""
    for key in ("seq_len", "data.batch_size", "data.eval_batch_size", "trainer.max_steps"):
        value = cfg
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer")
    if cfg["hardware"]["accelerator"] in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.accelerator={cfg['hardware']['accelerator']} but this machine has no CUDA GPU; "
            "add hardware=cpu to run here (an experiment= that picks the GPU keeps its other settings)"
        )
    model, schedule = cfg["model"]["name"], cfg["window_schedule"]["name"]
    if cfg["model"]["windowed"] is not None and cfg["model"]["windowed"] == (schedule == "full"):
        raise ConfigError(
            f"model={model} cannot use window_schedule={schedule}; models without window attention (full, linear) "
            "take only the 'full' schedule, windowed models any other: pick a matching model or schedule"
        )
    if not is_pretrained(cfg) and cfg["model"]["d_model"] % cfg["model"]["n_head"]:
        raise ConfigError(f"model.d_model={cfg['model']['d_model']} is not divisible by model.n_head={cfg['model']['n_head']}")


def is_pretrained(cfg: dict) -> bool:
    return "pretrained" in cfg["model"]


def read_pretrained_shape(cfg: dict) -> None:
    """A pretrained model's layers and heads come from its checkpoint; the schedule needs them."""
    from mswa.hf.backbone import pretrained_shape

    try:
        cfg["model"].update(pretrained_shape(cfg["model"]["pretrained"]))
    except ValueError as error:
        raise ConfigError(str(error)) from error


def check_corpus(cfg: dict, corpus: Corpus) -> None:
    if is_pretrained(cfg) and corpus.vocab_size > cfg["model"]["vocab_size"]:
        raise ConfigError(
            f"dataset {corpus.name!r} has {corpus.vocab_size} token ids but model.pretrained has {cfg['model']['vocab_size']}; "
            "tokenise with the model's tokenizer (dataset=packed_text does)"
        )
    seq_len = cfg["seq_len"]
    for split, tokens in corpus.splits.items():
        needed = seq_len + 1 if split == "train" else 2
        if len(tokens) < needed:
            raise ConfigError(
                f"seq_len={seq_len} needs at least {needed} tokens in the {split} split of {corpus.name!r}, "
                f"which has {len(tokens)}; lower seq_len or use a larger dataset"
            )


def load_corpus(cfg: dict) -> Corpus:
    try:
        return instantiate(cfg["dataset"]["loader"])
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError):  # the loader's own one-sentence DataError, not Hydra's wrapping
            raise error.__cause__ from None
        raise


def model_kwargs(cfg: dict, corpus: Corpus, schedule: WindowSchedule) -> dict:
    windows = None if schedule.is_full else schedule.as_lists()
    if is_pretrained(cfg):
        return {key: cfg["model"][key] for key in PRETRAINED_KEYS} | {"windows": windows}
    kwargs = {key: cfg["model"][key] for key in MODEL_KEYS if key in cfg["model"]}
    return {**kwargs, "vocab_size": corpus.vocab_size, "max_seq_len": cfg["seq_len"], "windows": windows}


def folder_name(name: str, limit: int = 200) -> str:
    """A run's folder name: its overrides, cut and given a hash of the whole when too long for the
    file system (255 bytes), so that distinct runs keep distinct folders."""
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
    """Paths of one run and its results.json (written by rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.last = self.checkpoints / "last.ckpt"
        self.results_path = path / "results.json"
        self.wandb_id_path = path / "wandb_id"

    def resolve_resume(self, ckpt_path: str | None, overwrite: bool) -> str | None:
        if ckpt_path == "last":
            if not self.last.exists():
                raise ConfigError(f"ckpt_path=last but {self.last} does not exist; run without ckpt_path to start this run")
            return str(self.last)
        if ckpt_path is not None:
            if not Path(ckpt_path).is_file():
                raise ConfigError(f"ckpt_path={ckpt_path} is not a file; give a .ckpt path or ckpt_path=last")
            return ckpt_path
        if self.last.exists() and not overwrite:
            raise ConfigError(
                f"{self.path} already holds a run (checkpoints/last.ckpt); resume it with ckpt_path=last "
                "or start over with overwrite=true"
            )
        if self.last.exists() and rank_zero_only.rank == 0:
            shutil.rmtree(self.checkpoints)
            self.wandb_id_path.unlink(missing_ok=True)
        return None

    def wandb_id(self) -> str:
        if not self.wandb_id_path.exists() and rank_zero_only.rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            self.wandb_id_path.write_text(secrets.token_hex(4))
        return self.wandb_id_path.read_text().strip()

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    def set_aside_metrics(self) -> Path | None:
        """Lightning's CSVLogger starts metrics.csv afresh; keep a resumed run's earlier rows to merge back."""
        if not self.metrics_csv.exists() or rank_zero_only.rank != 0:
            return None
        return self.metrics_csv.rename(self.path / "metrics.before_resume.csv")

    def merge_metrics(self, earlier: Path) -> None:
        """Earlier rows up to where the resumed attempt starts, then the resumed attempt's rows."""
        now = pd.read_csv(self.metrics_csv) if self.metrics_csv.exists() else pd.DataFrame(columns=["step"])
        before = pd.read_csv(earlier)
        if len(now):
            before = before[before["step"] < now["step"].min()]
        pd.concat([before, now], ignore_index=True).to_csv(self.metrics_csv, index=False)
        earlier.unlink()

    @rank_zero_only
    def write(self, results: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.results_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(self.results_path)


def build_loggers(cfg: dict, folder: RunFolder, run: RunInfo, schedule: str) -> list:
    loggers = [CSVLogger(save_dir=str(folder.path), name="", version="")]
    log_cfg = cfg["logger"]
    if log_cfg["name"] == "wandb":
        tags = [f"dataset={cfg['dataset']['name']}", f"model={cfg['model']['name']}", f"schedule={schedule}", *log_cfg.get("tags", [])]
        wandb_logger = WandbLogger(
            project=log_cfg["project"], entity=log_cfg.get("entity"), name=run.name, group=log_cfg.get("group") or run.group,
            job_type=log_cfg.get("job_type", "train"), tags=tags, mode=log_cfg["mode"], save_dir=str(folder.path),
            id=folder.wandb_id(), resume="allow", config=cfg,
        )
        loggers.append(wandb_logger)
    return loggers


def summarise_wandb(loggers: list, metric: str, entropy_floor: float | None) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0:
            run = logger.experiment
            for stage in ("val", "test"):
                run.define_metric(f"{stage}/{metric}", summary="min")
            run.define_metric("val/loss", summary="min")
            if entropy_floor is not None:
                run.summary["data/entropy_floor_bpb"] = entropy_floor


def finish_wandb(loggers: list, results: dict) -> None:
    """Mirror results.json into the W&B summary (what `mswa.report --wandb` reads), then close the run."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and rank_zero_only.rank == 0 and logger._experiment is not None:
            logger._experiment.summary["results"] = json.loads(json.dumps(results, default=str))
            logger._experiment.finish(exit_code=0 if results["status"] == "finished" else 1)


@dataclass
class RunInfo:
    """Where a run lives and how it is named (train.py fills it from Hydra)."""

    dir: str
    name: str = "default"
    variant: str = "default"  # the name without the seed: seeds of one variant are aggregated
    overrides: list[str] = field(default_factory=list)
    group: str | None = None  # W&B group: the sweep folder of a multirun
    schedule: str | None = None  # the window_schedule choice; defaults to the schedule's name


def train(cfg: dict, run: RunInfo) -> dict:
    """Fit, evaluate the best checkpoint on valid and test, and return (and write) the results."""
    folder = RunFolder(Path(run.dir))
    started = time.time()
    results = {
        "schema": 1, "status": "running", "error": None, "run_name": run.name, "variant": run.variant,
        "seed": cfg["seed"], "overrides": run.overrides, "run_dir": str(folder.path), "config": cfg,
        "dataset": cfg["dataset"]["name"], "model": cfg["model"]["name"],
        "schedule": run.schedule or cfg["window_schedule"]["name"], "git_commit": git_commit(),
    }
    loggers: list = []
    earlier_metrics = None
    try:
        if is_pretrained(cfg):
            read_pretrained_shape(cfg)
        check_config(cfg)
        eval_seq_len, eval_stride = eval_context(cfg)
        schedule = build_schedule(cfg)
        resume = folder.resolve_resume(cfg["ckpt_path"], cfg["overwrite"])
        earlier_metrics = folder.set_aside_metrics() if resume else None
        corpus = load_corpus(cfg)
        check_corpus(cfg, corpus)
        if cfg.get("torch_threads"):
            torch.set_num_threads(cfg["torch_threads"])
        L.seed_everything(cfg["seed"], workers=True, verbose=False)
        task = LanguageModelTask(model_kwargs(cfg, corpus, schedule), cfg["optim"], corpus.unit, cfg["compile"])
        results.update(
            unit=corpus.unit, metric=corpus.metric, window=schedule.w, windows=schedule.as_lists(),
            budget=schedule.budget(cfg["seq_len"]), n_params=task.model.n_params(),
            n_trainable=sum(p.numel() for p in task.parameters() if p.requires_grad),
            entropy_floor_bpb=corpus.entropy_floor_bpb, evaluation={"seq_len": eval_seq_len, "stride": eval_stride},
        )
        folder.write(results)
        data = CorpusDataModule(corpus, cfg["seq_len"], cfg["data"]["batch_size"], cfg["data"]["eval_batch_size"],
                                cfg["seed"], cfg["data"]["val_max_tokens"], cfg["data"]["aligned_chunks"], eval_seq_len, eval_stride)
        loggers = build_loggers(cfg, folder, run, results["schedule"])
        interrupt = GracefulInterrupt(str(folder.last))
        throughput = Throughput(cfg["data"]["batch_size"] * cfg["seq_len"])
        best = ModelCheckpoint(dirpath=folder.checkpoints, filename="best", monitor="val/loss", mode="min", save_top_k=1)
        last = ModelCheckpoint(dirpath=folder.checkpoints, save_top_k=0, save_last=True,
                               every_n_train_steps=cfg["checkpoint"]["every_n_train_steps"])
        trainer = L.Trainer(
            **cfg["hardware"], **cfg["trainer"], logger=loggers, max_epochs=-1, check_val_every_n_epoch=None,
            callbacks=[best, last, throughput, interrupt],
            default_root_dir=str(folder.path), use_distributed_sampler=False, deterministic=False,
        )
        summarise_wandb(loggers, corpus.metric, corpus.entropy_floor_bpb)
        if rank_zero_only.rank == 0:
            print(schedule.describe(cfg["seq_len"]))
            warn_if_repeating(cfg, len(corpus.splits["train"]))
        trainer.fit(task, datamodule=data, ckpt_path=resume)
        if interrupt.requested:
            raise KeyboardInterrupt(f"stopped at step {trainer.global_step}; resume with ckpt_path=last")
        data.val_max_tokens = None  # the final numbers are full passes over each split
        evaluated = best.best_model_path or None
        trainer.validate(task, datamodule=data, ckpt_path=evaluated, verbose=False)
        trainer.test(task, datamodule=data, ckpt_path=evaluated, verbose=False)
        results.update(
            status="finished", metrics=dict(task.eval_results), steps=trainer.global_step,
            tokens_per_s=throughput.mean_tokens_per_s, evaluated_checkpoint=evaluated,
            evaluation={**data.eval_settings, **task.eval_details},
        )
        if is_pretrained(cfg) and rank_zero_only.rank == 0:
            record = {"schedule": results["schedule"], "pretrained": cfg["model"]["pretrained"], "checkpoint": evaluated}
            results["lm_eval"] = finish_pretrained(cfg, task, folder, loggers, record)
        return results
    except BaseException as error:  # noqa: BLE001 - Ctrl-C and crashes are recorded, then re-raised
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        message = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        results.update(status="interrupted" if interrupted else "failed", error=message)
        raise
    finally:
        results["wall_time_s"] = time.time() - started
        folder.write(results)
        finish_wandb(loggers, results)
        if earlier_metrics is not None:
            folder.merge_metrics(earlier_metrics)


def finish_pretrained(cfg: dict, task: LanguageModelTask, folder: RunFolder, loggers: list, record: dict) -> dict | None:
    """Save the fine-tuned adapter of the evaluated (best) weights to `adapter/`; then, when `lm_eval`
    is configured, score common-sense reasoning with them (`lm_eval.json`, and W&B)."""
    task.model.save_adapter(folder.path / "adapter")
    if not cfg.get("lm_eval"):
        return None
    from transformers import AutoTokenizer

    from mswa.hf.evaluate import evaluate_commonsense
    from mswa.hf.patch import hf_base_model

    options = cfg["lm_eval"]
    wandb_run = next((logger.experiment for logger in loggers if isinstance(logger, WandbLogger)), None)
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["pretrained"])
    return evaluate_commonsense(
        hf_base_model(task.model.lm).eval(), tokenizer, folder.path, tasks=options["tasks"], num_fewshot=options["num_fewshot"],
        batch_size=options["batch_size"], limit=options["limit"], include_path=options["include_path"],
        include_defaults=options["include_defaults"], max_length=cfg["seq_len"], logger=wandb_run,
        extra=record,
    )


def optimised_metric(results: dict) -> float:
    """What a Hydra sweeper minimises: the final validation bpc / ppl (inf when the run failed)."""
    value = results.get("metrics", {}).get(f"val/{results.get('metric', 'bpc')}")
    return float(value) if value is not None and math.isfinite(value) else math.inf
