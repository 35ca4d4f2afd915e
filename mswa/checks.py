"""Config checks that run before anything is built or loaded.

Each refuses a bad config in one sentence that names the key, the value and the fix. They are plain
functions of the resolved config dict (what train.py hands to `mswa.run.train`): no Hydra, no trainer.
Every key a user can set is known here, so a typo (`+model.n_layers=3`) is refused rather than
silently ignored. A group's keys come from the code that takes them where it says so in its signature
(ModelConfig, CorpusDataModule, make_schedule, lightning.Trainer, a dataset loader), else from the
lists here, beside the rules for their values.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import sys
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_method
from lightning.fabric.connector import _PRECISION_INPUT

from mswa.attention import BACKENDS
from mswa.attention.linear import FEATURE_MAPS
from mswa.lit import CorpusDataModule
from mswa.model import ModelConfig
from mswa.windows import make_schedule


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


# Model keys the run fills in itself: the vocabulary from the data, the length from seq_len, the
# windows from window and window_schedule.
FILLED_BY_RUN = {"vocab_size": "the dataset", "max_seq_len": "seq_len", "windows": "window and window_schedule"}
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig) if f.name not in FILLED_BY_RUN)
# The keywords of mswa.hf.backbone.PretrainedCausalLM but its windows (a test keeps the two equal;
# importing it here would load transformers for every run).
PRETRAINED_KEYS = ("pretrained", "dtype", "lora", "gradient_checkpointing", "attn_backend")
PRETRAINED_SHAPE_KEYS = ("n_layer", "n_head")  # read from the pretrained checkpoint's config
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "trainable_modules")  # what backbone._with_lora reads
GROUP_KEYS = ("name", "windowed")  # every model file's identity and whether it takes windows

# Trainer keywords that run.train passes itself; the hardware group's keys go to the Trainer as well.
TRAINER_KEYS_SET_BY_RUN = ("logger", "callbacks", "max_epochs", "check_val_every_n_epoch", "default_root_dir",
                           "use_distributed_sampler", "deterministic", "plugins")
TRAINER_KEYWORDS = tuple(name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self")
PRECISIONS = tuple(value for literal in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(literal))

# CorpusDataModule's keywords that come from the data group (the rest from the data, seq_len and seed).
DATA_KEYS = tuple(name for name in inspect.signature(CorpusDataModule.__init__).parameters
                  if name not in ("self", "corpus", "seq_len", "seed"))
# make_schedule's keywords that come from the window_schedule group (w from window, the shape from model).
SCHEDULE_KEYS = tuple(name for name in inspect.signature(make_schedule).parameters if name not in ("w", "n_layer", "n_head"))

LOGGER_KEYS = {"wandb": ("name", "mode", "project", "entity", "group", "job_type", "tags"), "csv": ("name",), "none": ("name",)}
WANDB_MODES = ("offline", "online", "disabled")

GROUPS = {  # the keys of each group that some code reads
    "optim": ("lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio"),  # what lit.configure_optimizers reads
    "data": DATA_KEYS,
    "window_schedule": SCHEDULE_KEYS,
    "dataset": ("name", "path", "aligned_chunks", "loader"),
    "checkpoint": ("every_n_train_steps",),
    "paths": ("data_dir", "log_dir"),
    "lm_eval": ("tasks", "num_fewshot", "batch_size", "limit", "include_path", "include_defaults"),
    "slurm": ("nodes", "gpus_per_node", "time_min", "partition", "cpus_per_task", "mem_gb"),
    "eval": ("seq_len", "stride"),  # evaluation context (its values are checked where evaluation reads them)
}
TOP_LEVEL = ("task_name", "seed", "window", "seq_len", "compile", "torch_threads", "ckpt_path", "overwrite",
             "model", "trainer", "hardware", "logger", *GROUPS)


@dataclass(frozen=True)
class Rule:
    """What a value must be, as the sentence a refusal ends with, and the test of it."""

    must_be: str
    ok: Callable[[Any], bool]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


POSITIVE = Rule("an integer >= 1", lambda v: is_int(v) and v >= 1)
NON_NEGATIVE = Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
SEED = Rule(f"an integer in [0, {2**32 - 1}]", lambda v: is_int(v) and 0 <= v < 2**32)
POSITIVE_OR_NULL = Rule("an integer >= 1, or null", lambda v: v is None or POSITIVE.ok(v))
RATE = Rule("a finite number >= 0", lambda v: is_number(v) and v >= 0)
RATE_OR_NULL = Rule("a finite number >= 0, or null (no clipping)", lambda v: v is None or RATE.ok(v))
FRACTION = Rule("a number in [0, 1]", lambda v: is_number(v) and 0 <= v <= 1)
PROBABILITY = Rule("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1)
BETAS = Rule("two numbers in [0, 1), e.g. [0.9, 0.95]",
             lambda v: isinstance(v, list) and len(v) == 2 and all(PROBABILITY.ok(b) for b in v))
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))

RULES = {
    "seed": SEED,
    "seq_len": POSITIVE,
    "torch_threads": Rule("an integer >= 1, or null (torch's default)", POSITIVE_OR_NULL.ok),
    "compile": BOOLEAN,
    "overwrite": BOOLEAN,
    "optim.lr": RATE,
    "optim.weight_decay": RATE,
    "optim.betas": BETAS,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.min_lr_ratio": Rule("a number in [0, 1] (the final learning rate / optim.lr)", FRACTION.ok),
    "data.batch_size": POSITIVE,
    "data.eval_batch_size": POSITIVE,
    "data.val_max_tokens": Rule("an integer >= 1, or null (the whole validation split)", POSITIVE_OR_NULL.ok),
    "data.aligned_chunks": BOOLEAN,
    "trainer.max_steps": POSITIVE,
    "trainer.val_check_interval": Rule("an integer >= 1 (training steps between validations)", POSITIVE.ok),
    "trainer.log_every_n_steps": POSITIVE,
    "trainer.accumulate_grad_batches": POSITIVE,
    "trainer.gradient_clip_val": RATE_OR_NULL,
    "checkpoint.every_n_train_steps": POSITIVE,
    "hardware.num_nodes": POSITIVE,
    "logger.mode": Rule(f"one of {', '.join(WANDB_MODES)}", lambda v: v in WANDB_MODES),  # wandb only
    "hardware.precision": Rule(f"one of {', '.join(dict.fromkeys(map(str, PRECISIONS)))}", lambda v: v in PRECISIONS),
}
MODEL_RULES = {  # models built by mswa.model (a pretrained model brings its own shape)
    "model.n_layer": POSITIVE,
    "model.n_head": POSITIVE,
    "model.d_model": POSITIVE,
    "model.mlp_ratio": POSITIVE,
    "model.linear_feature_dim": POSITIVE,
    "model.dropout": PROBABILITY,
    "model.linear_feature_map": Rule(f"one of {', '.join(FEATURE_MAPS)}", lambda v: v in FEATURE_MAPS),
}
BACKEND = Rule(f"one of {', '.join(BACKENDS)}", lambda v: v in BACKENDS)


MISSING = object()


def lookup(cfg: dict, key: str) -> Any:
    """The value at a dotted key, or MISSING."""
    value = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def check_config(cfg: dict) -> None:
    """Every check that needs neither data nor a checkpoint; run first."""
    check_known_keys(cfg)
    pretrained = "pretrained" in cfg["model"]
    rules = RULES | {"model.attn_backend": BACKEND} | ({} if pretrained else MODEL_RULES)
    for key, rule in rules.items():
        value = lookup(cfg, key)
        if value is not MISSING and not rule.ok(value):
            raise ConfigError(f"{key}={value!r} must be {rule.must_be}")
    check_warmup(cfg)
    check_hardware(cfg)
    check_model(cfg)
    check_lm_eval(cfg)
    for key in ("paths.data_dir", "paths.log_dir", "dataset.loader.data_dir"):
        if lookup(cfg, key) is not MISSING:
            check_folder(key, lookup(cfg, key))


def check_known_keys(cfg: dict) -> None:
    """Refuse keys that no code reads: a typo would otherwise be ignored without a word."""
    refuse_unknown("", cfg, TOP_LEVEL)
    for group, known in GROUPS.items():
        if isinstance(cfg.get(group), dict):
            refuse_unknown(group, cfg[group], known)
    refuse_unknown("logger", cfg["logger"], LOGGER_KEYS.get(cfg["logger"].get("name"), ("name",)))
    set_by_run = dict.fromkeys(TRAINER_KEYS_SET_BY_RUN, "the run")
    refuse_unknown("hardware", cfg["hardware"], TRAINER_KEYWORDS, set_by_run)
    refuse_unknown("trainer", cfg["trainer"], TRAINER_KEYWORDS, set_by_run | {key: f"hardware.{key}" for key in cfg["hardware"]})
    check_model_keys(cfg["model"])
    loader = cfg["dataset"].get("loader")
    if isinstance(loader, dict) and "_target_" in loader:
        check_loader_keys(loader)


def check_model_keys(model: dict) -> None:
    if "pretrained" not in model:
        refuse_unknown("model", model, (*GROUP_KEYS, *MODEL_KEYS), FILLED_BY_RUN)
        return
    shape = dict.fromkeys((k for k in MODEL_KEYS if k not in (*PRETRAINED_KEYS, *PRETRAINED_SHAPE_KEYS)), "model.pretrained's config")
    refuse_unknown("model", model, (*GROUP_KEYS, *PRETRAINED_KEYS, *PRETRAINED_SHAPE_KEYS, *shape), shape)
    for key in PRETRAINED_SHAPE_KEYS:
        if model.get(key) is not None:
            raise ConfigError(f"model.{key}={model[key]!r} is read from model.pretrained's config; remove it (leave it null)")
    if isinstance(model.get("lora"), dict):
        refuse_unknown("model.lora", model["lora"], LORA_KEYS)


def check_loader_keys(loader: dict) -> None:
    """The loader's own keywords; a loader that takes **settings checks their names itself."""
    try:
        parameters = inspect.signature(get_method(loader["_target_"])).parameters
    except Exception as error:  # noqa: BLE001 - Hydra wraps import failures in several types
        target = loader["_target_"]
        raise ConfigError(f"dataset.loader._target_={target!r} cannot be imported ({error}); name a loader function") from None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        refuse_unknown("dataset.loader", loader, ("_target_", *parameters))


def refuse_unknown(group: str, values: dict, known: Collection[str], set_elsewhere: dict[str, str] | None = None) -> None:
    """Every key of `values` must be `known`; `set_elsewhere` maps known keys a user may not set to their source."""
    set_elsewhere = set_elsewhere or {}
    prefix = f"{group}." if group else ""
    settable = [key for key in known if key not in set_elsewhere]
    for key in values:
        if key in set_elsewhere:
            raise ConfigError(f"{prefix}{key} is not a setting here: it comes from {set_elsewhere[key]}; remove it")
        if key not in known:
            close = difflib.get_close_matches(key, settable, n=1, cutoff=0.6)
            where = f"of {group}" if group else "at the top"
            fix = f"did you mean {prefix}{close[0]}?" if close else f"the settings {where} are {', '.join(sorted(settable))}"
            raise ConfigError(f"{prefix}{key} is not a setting that anything reads; {fix}")


def check_warmup(cfg: dict) -> None:
    warmup, max_steps = cfg["optim"]["warmup_steps"], cfg["trainer"]["max_steps"]
    if warmup > max_steps:
        raise ConfigError(
            f"optim.warmup_steps={warmup} is longer than trainer.max_steps={max_steps}, so the learning rate never "
            f"reaches optim.lr; set optim.warmup_steps to at most {max_steps}"
        )


def check_hardware(cfg: dict) -> None:
    accelerator = cfg["hardware"]["accelerator"]
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.accelerator={accelerator} but this machine has no CUDA GPU; "
            "add hardware=cpu to run here (an experiment= that picks the GPU keeps its other settings)"
        )
    if cfg["model"].get("attn_backend") == "flex" and accelerator == "cpu":
        raise ConfigError(
            "model.attn_backend=flex cannot train on hardware.accelerator=cpu (torch has no FlexAttention backward on CPU); "
            "use model.attn_backend=blocked or auto"
        )


def check_model(cfg: dict) -> None:
    model, schedule = cfg["model"], cfg["window_schedule"]["name"]
    if model["windowed"] is not None and model["windowed"] == (schedule == "full"):
        raise ConfigError(
            f"model={model['name']} cannot use window_schedule={schedule}; models without window attention (full, linear) "
            "take only the 'full' schedule, windowed models any other: pick a matching model or schedule"
        )
    if "pretrained" in model:
        return
    try:  # the model's own checks of its settings; the vocabulary is checked once the data is loaded
        ModelConfig(**{key: model[key] for key in MODEL_KEYS if key in model}, vocab_size=sys.maxsize)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_lm_eval(cfg: dict) -> None:
    """lm-evaluation-harness runs after a pretrained model's training: its request is checked before it."""
    options = cfg.get("lm_eval")
    if not options:
        return
    if "pretrained" not in cfg["model"]:
        raise ConfigError("lm_eval scores pretrained models (model=hf_causal_lm) only; remove lm_eval or pick that model")
    from mswa.hf.evaluate import _check_request

    try:
        _check_request(options.get("tasks"), options.get("num_fewshot"), options.get("batch_size"))
    except ValueError as error:
        raise ConfigError(f"lm_eval.{error}") from None


def check_folder(key: str, path: str) -> None:
    """A folder the run writes into: not a file, nor under one, and writable."""
    folder = Path(path).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is inside the file {existing}"
        raise ConfigError(f"{key}={path} {where}; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} cannot be written ({existing} is read-only to you); give a folder you can write to")


def check_launcher(launcher: str | None, multirun: bool) -> None:
    """A launcher other than basic runs the jobs of a multirun; without -m it would be ignored."""
    if launcher not in (None, "basic") and not multirun:
        raise ConfigError(
            f"launcher={launcher} starts the jobs of a multirun, so it needs -m (python train.py -m launcher={launcher} ...); "
            "drop launcher= to run this one job here"
        )


# Model settings that change how the model runs, not what it is: a checkpoint resumes across them.
RUNTIME_KEYS = ("attn_backend", "gradient_checkpointing")


def check_checkpoint(path: str | None, model: dict) -> None:
    """A checkpoint to resume must be one of train.py's, of the model about to be built."""
    if path is None:
        return
    try:
        stored = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - torch raises many types for a file that is not its own
        raise ConfigError(
            f"ckpt_path={path} is not a checkpoint that torch can read; give a .ckpt that train.py wrote, or ckpt_path=last"
        ) from None
    hyper = stored.get("hyper_parameters") if isinstance(stored, dict) else None
    if not isinstance(hyper, dict) or not isinstance(hyper.get("model"), dict) or "state_dict" not in stored:
        raise ConfigError(
            f"ckpt_path={path} is not a checkpoint of train.py (it holds no model settings); give a .ckpt that train.py wrote"
        )
    before = hyper["model"]
    for key in sorted(set(before) | set(model)):
        there, here = before.get(key, MISSING), model.get(key, MISSING)
        if key not in RUNTIME_KEYS and there != here:
            name = f"{key} (from {FILLED_BY_RUN[key]})" if key in FILLED_BY_RUN else f"model.{key}"
            values = f"{shown(there)} there, {shown(here)} here" if len(shown(there) + shown(here)) < 120 else "differs from this config"
            raise ConfigError(
                f"ckpt_path={path} belongs to another model: {name} {values}; "
                "resume with the checkpoint's settings or start a fresh run"
            )


def shown(value: Any) -> str:
    return "unset" if value is MISSING else repr(value)
