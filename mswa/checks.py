"""Config checks that run before anything is built or loaded.

Each refuses a bad config in one sentence that names the key, the value and the fix. The typed config
(mswa/config.py) refuses unknown keys and values that break their field's rule; these are the checks
between settings, and against the command line, the machine (its GPU, memory, W&B login and the folders
a run writes), the data loader's signature and a checkpoint to resume. Legal settings that are probably
not what was meant (every window covering the sequence) get a one-line warning instead.
"""

from __future__ import annotations

import inspect
import netrc
import os
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import psutil
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mswa.config import (
    FILLED_BY_RUN,
    PRETRAINED_SHAPE,
    ConfigError,
    EvaluateConfig,
    RunConfig,
    WandbConfig,
    check_group,
    check_hardware_keys,
    model_config,
    parse_config,
    refuse_unknown,
)
from mswa.factory import build_model, model_spec
from mswa.folders import FolderLock, check_folder
from mswa.lit import UnsafeCheckpointError, read_checkpoint
from mswa.windows import WindowSchedule

MISSING = object()


def check_config(cfg: dict) -> RunConfig:
    """Every check that needs neither data nor a checkpoint (run first); the typed config."""
    settings = parse_config(cfg)
    check_loader_keys(settings.dataset.loader)
    check_warmup(settings)
    check_hardware(settings)
    check_model(settings)
    check_lm_eval(settings)
    if isinstance(settings.logger, WandbConfig):
        check_wandb_login(settings.logger.mode)
    for key, path in (
        ("paths.data_dir", settings.paths.data_dir),
        ("paths.log_dir", settings.paths.log_dir),
        ("dataset.loader.data_dir", settings.dataset.loader.get("data_dir")),
    ):
        if path is not None:
            check_folder(key, path)
    return settings


class CheckRunFolder(Callback):
    """Hydra makes the run's folder before train.py's main runs: what places it is checked first (conf/train.yaml
    names this callback), so that no folder is made in a wrong place."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_run_folder(config, "hydra.run.dir")
        lock = FolderLock(OmegaConf.select(config, "hydra.run.dir"))
        if rank_zero_only.rank == 0 and lock.alive():  # before Hydra writes .hydra/ and the log into it (the run checks again)
            sys.exit(f"error: {lock.refusal()}")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_run_folder(config, "hydra.sweep.dir")


def refuse_run_folder(config: DictConfig, key: str) -> None:
    """Stop in one line when the task name or a folder that places the run (``key``: Hydra's) cannot hold it."""
    HydraConfig.instance().set_config(config)  # the folder's name reads hydra:job.override_dirname
    try:
        check_group("", {"task_name": config.task_name}, RunConfig)
        for name in ("paths.log_dir", key):
            check_folder(name, OmegaConf.select(config, name))
    except ValueError as error:
        sys.exit(f"error: {error}")


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


def check_repeated_overrides(overrides: list[str]) -> None:
    """Hydra keeps the last of two overrides of one key without a word: a repeated key is refused instead."""
    first: dict[str, str] = {}
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key in first:
            raise ConfigError(f"{key} is given twice ({first[key]} and {override}), and only the last would count; give it once")
        first[key] = override


def check_hardware(cfg: RunConfig) -> None:
    check_accelerator(cfg.hardware)
    if cfg.model.attn_backend == "flex" and cfg.hardware["accelerator"] == "cpu":
        raise ConfigError(
            "model.attn_backend=flex cannot train on hardware.accelerator=cpu (torch has no FlexAttention backward on CPU); "
            "use model.attn_backend=blocked or auto"
        )


def check_accelerator(hardware: Mapping) -> None:
    """The hardware group asks for nothing this machine lacks (train.py's run and mswa.evaluate)."""
    accelerator = hardware.get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.accelerator={accelerator} but this machine has no CUDA GPU; "
            "add hardware=cpu to run here (an experiment= that picks the GPU keeps its other settings)"
        )


def check_wandb_login(mode: str) -> None:
    """W&B online needs credentials; without them wandb.init fails once everything is built."""
    if mode == "online" and not wandb_credentials_found():
        raise ConfigError(
            "logger.mode=online but W&B finds no credentials here (no WANDB_API_KEY, no netrc entry); run wandb login "
            "first, or use logger.mode=offline and upload later with wandb sync"
        )


def wandb_credentials_found() -> bool:
    """Whether W&B has credentials here, from the sources wandb.init reads, without asking the network: the
    environment (an API key or an identity token file), else the netrc entry `wandb login` writes for its host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    host = urlparse(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_evaluation(options: dict, hardware: dict, wandb_mode: str | None) -> None:
    """mswa.evaluate's settings, the hardware it runs on and the W&B run it writes to (``wandb_mode``, None: none),
    checked before anything is loaded."""
    check_group("", options, EvaluateConfig)
    check_hardware_keys(hardware)
    check_accelerator(hardware)
    if wandb_mode is not None:
        check_wandb_login(wandb_mode)


TRAINED_IN_RAM_BYTES = 16  # a parameter trained in RAM: its float32 weight, its gradient and AdamW's two moments
BUILT_IN_RAM_BYTES = 4  # a GPU run builds the float32 weights in RAM, then moves them (the GPU's memory is its own)


def check_memory(cfg: RunConfig, schedule: WindowSchedule, vocab_size: int | None = None) -> None:
    """The model fits in the memory available, counted from its settings; before the data is loaded
    (``vocab_size`` None), with the smallest vocabulary it takes."""
    if cfg.pretrained:  # its weights are the checkpoint's, loaded once
        return
    model, n_params = cfg.model, parameter_count(cfg, schedule, vocab_size)
    in_ram = cfg.hardware["accelerator"] not in ("gpu", "cuda")
    needed, available = n_params * (TRAINED_IN_RAM_BYTES if in_ram else BUILT_IN_RAM_BYTES), psutil.virtual_memory().available
    if needed > available:
        counted = "its weights, gradients and AdamW state" if in_ram else "its weights, built in RAM"
        raise ConfigError(
            f"the model (model.n_layer={model.n_layer}, model.d_model={model.d_model}: {n_params:,} parameters) needs "
            f"{needed / 2**30:,.1f} GiB for {counted}, more than the {available / 2**30:,.1f} GiB of memory available; "
            "lower model.d_model or model.n_layer"
        )


def parameter_count(cfg: RunConfig, schedule: WindowSchedule, vocab_size: int | None) -> int:
    """The native model's parameters, counted on the meta device (which allocates nothing)."""
    model = cfg.model
    vocab_size = vocab_size or (max(model.adaptive_cutoffs) + 1 if model.output == "adaptive" else 1)
    with torch.device("meta"):
        return build_model(model, model_spec(cfg, vocab_size, schedule)).n_params()


def warn_full_attention(cfg: RunConfig, schedule: WindowSchedule) -> None:
    """Legal, but likely not meant: windows that all cover the sequence make a windowed model full attention."""
    if not schedule.is_full and schedule.budget(cfg.seq_len)["pairs_vs_full"] == 1:
        print(
            f"warning: every window of window_schedule={cfg.window_schedule.name} (window={cfg.window}) covers seq_len={cfg.seq_len}, "
            f"so model={cfg.model.name} trains full attention; set window below seq_len for windowed attention",
            file=sys.stderr,
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


def check_launcher(launcher: str | None, multirun: bool) -> None:
    """A launcher other than basic runs the jobs of a multirun; without -m it would be ignored."""
    if launcher not in (None, "basic") and not multirun:
        raise ConfigError(
            f"launcher={launcher} starts the jobs of a multirun, so it needs -m (python train.py -m launcher={launcher} ...); "
            "drop launcher= to run this one job here"
        )


# Model settings that change how the model runs, not what it is: a checkpoint resumes across them.
RUNTIME_KEYS = ("attn_backend", "gradient_checkpointing")
ADDED_SINCE = {"learned_spans": None}  # model settings newer than some checkpoints, with the value those models had


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
        # a setting added after the checkpoint was written: the checkpoint's model had its default
        there, here = before.get(key, ADDED_SINCE.get(key, MISSING)), model.get(key, MISSING)
        if key not in RUNTIME_KEYS and there != here:
            name = f"{key} (from {FILLED_BY_RUN[key]})" if key in FILLED_BY_RUN else f"model.{key}"
            values = f"{shown(there)} there, {shown(here)} here" if len(shown(there) + shown(here)) < 120 else "differs from this config"
            raise ConfigError(f"{named} belongs to another model: {name} {values}; {fix}")


def shown(value: Any) -> str:
    return "unset" if value is MISSING else repr(value)
