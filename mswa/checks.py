"""Config checks that run before anything is built or loaded.

Each refuses a bad config in one sentence that names the key, the value and the fix. The typed config
(mswa/config.py) refuses unknown keys and values that break their field's rule; these are the checks
between settings, and against the machine, the data loader's signature and a checkpoint to resume.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_method

from mswa.config import FILLED_BY_RUN, PRETRAINED_SHAPE, ConfigError, RunConfig, model_config, parse_config, refuse_unknown
from mswa.lit import UnsafeCheckpointError, read_checkpoint

MISSING = object()


def check_config(cfg: dict) -> RunConfig:
    """Every check that needs neither data nor a checkpoint (run first); the typed config."""
    settings = parse_config(cfg)
    check_loader_keys(settings.dataset.loader)
    check_warmup(settings)
    check_hardware(settings)
    check_model(settings)
    check_lm_eval(settings)
    for key, path in (
        ("paths.data_dir", settings.paths.data_dir),
        ("paths.log_dir", settings.paths.log_dir),
        ("dataset.loader.data_dir", settings.dataset.loader.get("data_dir")),
    ):
        if path is not None:
            check_folder(key, path)
    return settings


def check_loader_keys(loader: dict) -> None:
    """The loader's own keywords; a loader that takes **settings checks their names itself."""
    if "_target_" not in loader:
        return
    try:
        parameters = inspect.signature(get_method(loader["_target_"])).parameters
    except Exception as error:  # noqa: BLE001 - Hydra wraps import failures in several types
        target = loader["_target_"]
        raise ConfigError(f"dataset.loader._target_={target!r} cannot be imported ({error}); name a loader function") from None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        refuse_unknown("dataset.loader", loader, ("_target_", *parameters))


def check_warmup(cfg: RunConfig) -> None:
    warmup, max_steps = cfg.optim.warmup_steps, cfg.trainer["max_steps"]
    if warmup > max_steps:
        raise ConfigError(
            f"optim.warmup_steps={warmup} is longer than trainer.max_steps={max_steps}, so the learning rate never "
            f"reaches optim.lr; set optim.warmup_steps to at most {max_steps}"
        )


def check_hardware(cfg: RunConfig) -> None:
    accelerator = cfg.hardware["accelerator"]
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.accelerator={accelerator} but this machine has no CUDA GPU; "
            "add hardware=cpu to run here (an experiment= that picks the GPU keeps its other settings)"
        )
    if cfg.model.attn_backend == "flex" and accelerator == "cpu":
        raise ConfigError(
            "model.attn_backend=flex cannot train on hardware.accelerator=cpu (torch has no FlexAttention backward on CPU); "
            "use model.attn_backend=blocked or auto"
        )


def check_model(cfg: RunConfig) -> None:
    model, schedule = cfg.model, cfg.window_schedule
    if model.windowed is not None and model.windowed == (schedule.kind == "full"):
        raise ConfigError(
            f"model={model.name} cannot use window_schedule={schedule.name}; models without window attention (full, linear) "
            "take only the 'full' schedule, windowed models any other: pick a matching model or schedule"
        )
    if cfg.pretrained:
        for key in PRETRAINED_SHAPE:
            if getattr(model, key) is not None:
                raise ConfigError(f"model.{key}={getattr(model, key)!r} is read from model.pretrained's config; remove it (leave it null)")
        return
    try:  # the model's own checks of its settings; the vocabulary is checked once the data is loaded
        model_config(model, vocab_size=sys.maxsize)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_lm_eval(cfg: RunConfig) -> None:
    """lm-evaluation-harness runs after a pretrained model's training: its request is checked before it."""
    options = cfg.lm_eval
    if not options:
        return
    if not cfg.pretrained:
        raise ConfigError("lm_eval scores pretrained models (model=hf_causal_lm) only; remove lm_eval or pick that model")
    from mswa.hf.evaluate import _check_request

    try:
        _check_request(options.tasks, options.num_fewshot, options.batch_size)
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


def check_checkpoint(path: str | None, model: dict) -> dict | None:
    """A checkpoint to resume must be one of train.py's, of the model about to be built; returned as read."""
    if path is None:
        return None
    named = f"ckpt_path={path}"
    stored = read_run_checkpoint(path, named)
    check_same_model(stored, model, named, "resume with the checkpoint's settings or start a fresh run")
    return stored


def read_run_checkpoint(path: str | os.PathLike, named: str) -> dict:
    """The checkpoint at ``path`` (``named`` as the user gave it, e.g. ``ckpt_path=PATH``) if train.py wrote it; a
    one-sentence ValueError for any other file (UnsafeCheckpointError, unread, for one that would run code)."""
    try:
        stored = read_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - torch raises many types for a file that is not its own
        raise ConfigError(f"{named} is not a checkpoint that torch can read; give a .ckpt that train.py wrote") from None
    hyper = stored.get("hyper_parameters") if isinstance(stored, dict) else None
    if not isinstance(hyper, dict) or not isinstance(hyper.get("model"), dict) or "state_dict" not in stored:
        raise ConfigError(f"{named} is not a checkpoint of train.py (it holds no model settings); give a .ckpt that train.py wrote")
    return stored


def check_same_model(stored: dict, model: dict, named: str, fix: str) -> None:
    """The checkpoint ``stored`` holds the model of spec ``model`` (settings of how it runs aside); else what differs, and ``fix``."""
    before = stored["hyper_parameters"]["model"]
    for key in sorted(set(before) | set(model)):
        there, here = before.get(key, MISSING), model.get(key, MISSING)
        if key not in RUNTIME_KEYS and there != here:
            name = f"{key} (from {FILLED_BY_RUN[key]})" if key in FILLED_BY_RUN else f"model.{key}"
            values = f"{shown(there)} there, {shown(here)} here" if len(shown(there) + shown(here)) < 120 else "differs from this config"
            raise ConfigError(f"{named} belongs to another model: {name} {values}; {fix}")


def shown(value: Any) -> str:
    return "unset" if value is MISSING else repr(value)
