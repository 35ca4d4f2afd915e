"""The typed run config: one dataclass per config group, the rule (mswa/rules.py) every value must follow, and the
parse of a composed config (the plain dict Hydra resolves, or a run folder's results.json) into them.

The dataclasses are the one list of what a user can set: a key that no field names (``+model.n_layers=3``) is
refused with the closest field, a value that breaks its field's rule or type in one sentence naming both; the
parsed config is what the modules take. The native model's fields are ModelConfig's own (mswa/model.py), less
what the run fills in; a group handed on to another library (trainer, hardware: Lightning's Trainer; a
dataset's loader) is checked against that library's signature.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mswa.attention import BACKENDS
from mswa.attention.linear import FEATURE_MAPS
from mswa.model import ModelConfig
from mswa.rules import (
    BETAS,
    BOOLEAN,
    DEVICES,
    FOLDER_NAME,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_OR_NULL,
    PROBABILITY,
    RATE,
    RATE_OR_NULL,
    SEED,
    THREADS,
    ConfigError,
    Rule,
    check_value,
    one_of,
)
from mswa.sweeps import schedule_rule

WANDB_MODES = ("offline", "online", "disabled")
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # W&B's older names, which its WANDB_MODE still takes
# logger=wandb keys that W&B's own environment variables set when the command line does not
WANDB_ENVIRONMENT = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "dir": "WANDB_DIR"}
PRECISIONS = tuple(value for literal in typing.get_args(_PRECISION_INPUT) for value in typing.get_args(literal))


def setting(rule: Rule | None = None, default: Any = MISSING) -> Any:
    """A field whose value must follow ``rule``; without a default it must be given."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


# ---------------------------------------------------------------- the groups


@dataclass
class ScheduleConfig:
    """conf/window_schedule/<file>.yaml: the file's name, and the rule it applies (mswa/windows.py)."""

    name: str = setting()
    kind: str | None = None  # None in runs written before schedules had a kind: their name is the rule
    head_ratios: list[float] | None = None
    layer_ratios: list[float] | None = None
    windows: list[list[int | None]] | None = None  # kind=custom: [layer][head]
    ramp: int | None = None  # kind=learned: width R (tokens) of the soft mask's ramp
    budget: float | None = None  # kind=learned: attended pairs / SWA(w) to end training at; null: mswa's
    budget_rate: float | None = None  # kind=learned: the Lagrange multiplier's step per training step
    budget_penalty: float | None = None  # kind=learned: weight of the quadratic term of the augmented Lagrangian


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay (mswa/lit.py)."""

    lr: float = setting(RATE)
    weight_decay: float = setting(RATE)
    betas: list[float] = setting(BETAS)
    warmup_steps: int = setting(NON_NEGATIVE)
    min_lr_ratio: float = setting(Rule("a number in [0, 1] (the final learning rate / optim.lr)", FRACTION.ok))


@dataclass
class DataConfig:
    batch_size: int = setting(POSITIVE)
    eval_batch_size: int = setting(POSITIVE)
    val_max_tokens: int | None = setting(Rule("an integer >= 1, or null (the whole validation split)", POSITIVE_OR_NULL.ok))
    aligned_chunks: bool = setting(BOOLEAN, False)


@dataclass
class EvalConfig:
    """Evaluation context; its values are checked where evaluation reads them (mswa.data.batches.eval_context)."""

    seq_len: int | None = None
    stride: int | None = None


@dataclass
class CheckpointConfig:
    every_n_train_steps: int = setting(POSITIVE)


@dataclass
class PathsConfig:
    data_dir: str = setting()
    log_dir: str = setting()


@dataclass
class DatasetConfig:
    name: str = setting()
    path: str | None = None
    aligned_chunks: bool = False
    loader: dict[str, Any] = setting()  # a loader function's keywords (checked against its signature)


@dataclass
class LoggerConfig:
    """logger=csv|none: only the CSV log and results.json that every run writes."""

    name: str = setting()


@dataclass
class WandbConfig(LoggerConfig):
    mode: str = setting(one_of(WANDB_MODES))
    project: str = setting()
    entity: str | None = None
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = setting(None, [])
    dir: str | None = None  # where W&B writes its files (wandb/ below it); null: the run folder


def with_wandb_environment(logger: Mapping, given: Collection[str] = ()) -> dict:
    """logger=wandb settings as W&B's environment variables have them: a ``logger.*`` key given on the command line
    (``given``: the override keys) wins, then WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY and WANDB_DIR, then
    conf/logger/wandb.yaml. Other loggers are returned as they are."""
    logger = dict(logger)
    if logger.get("name") != "wandb":
        return logger
    for key, variable in WANDB_ENVIRONMENT.items():
        value = os.environ.get(variable)
        if not value or f"logger.{key}" in given:
            continue
        if key == "mode":
            value = WANDB_MODE_ALIASES.get(value, value)
            if value not in WANDB_MODES:
                raise ConfigError(f"WANDB_MODE={value!r} in the environment must be one of {', '.join(WANDB_MODES)}; change or unset it")
        logger[key] = value
    if logger.get("dir"):
        logger["dir"] = os.path.abspath(logger["dir"])  # recorded as it was meant from where the run started
    return logger


LOGGERS = {"wandb": WandbConfig}  # the logger's name picks its settings; any other logs only to CSV


@dataclass
class LmEvalConfig:
    tasks: list[str] = setting()
    num_fewshot: int = 0  # checked with the request (mswa.hf.evaluate)
    batch_size: int = 1
    limit: float | None = None
    include_path: str | None = None
    include_defaults: bool = True


@dataclass
class SlurmConfig:
    nodes: int = setting(POSITIVE)
    gpus_per_node: int = setting(POSITIVE)
    time_min: int = setting(POSITIVE)
    partition: str | None = None
    cpus_per_task: int = setting(POSITIVE)
    mem_gb: int = setting(POSITIVE)
    signal: str = setting(one_of(("USR1", "TERM")))  # sent grace_s before the time limit: checkpoint, then requeue
    grace_s: int = setting(POSITIVE)


# Model keys the run fills in itself: the vocabulary from the data, the length from seq_len, the windows from
# window and window_schedule.
FILLED_BY_RUN = {
    "vocab_size": "the dataset",
    "max_seq_len": "seq_len",
    "windows": "window and window_schedule",
    "learned_spans": "window_schedule=learned",
}
MODEL_RULES = {  # values of mswa.model's settings that ModelConfig itself does not check
    "n_layer": POSITIVE,
    "n_head": POSITIVE,
    "d_model": POSITIVE,
    "mlp_ratio": POSITIVE,
    "linear_feature_dim": POSITIVE,
    "dropout": PROBABILITY,
    "linear_feature_map": one_of(FEATURE_MAPS),
    "attn_backend": one_of(BACKENDS),
}


def _model_fields() -> list[tuple[str, Any, Any]]:
    """ModelConfig's fields that a model file sets, each with its rule."""
    hints = typing.get_type_hints(ModelConfig)
    made = []
    for f in dataclasses.fields(ModelConfig):
        if f.name not in FILLED_BY_RUN:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            made.append((f.name, hints[f.name], setting(MODEL_RULES.get(f.name), default)))
    return made


@dataclass
class ModelFile:
    """What every conf/model/*.yaml says besides its settings: its name, and whether it takes windows."""

    name: str = setting()
    windowed: bool | None = None  # false: window_schedule=full only (full, linear); null: any schedule


# conf/model/*.yaml built by mswa.model: ModelConfig's fields (one home for them), less those the run fills in
NativeModel = dataclasses.make_dataclass("NativeModel", _model_fields(), bases=(ModelFile,))
NativeModel.__module__, NativeModel.__doc__ = __name__, "A model of mswa.model (conf/model/*.yaml but hf_causal_lm)."


@dataclass
class LoraConfig:
    r: int = setting(POSITIVE)
    alpha: float = setting(RATE)
    dropout: float = setting(PROBABILITY, 0.0)
    target_modules: list[str] = setting()
    trainable_modules: list[str] | None = None  # trained in full: module names ending so


@dataclass
class PretrainedModel(ModelFile):
    """model=hf_causal_lm: a Hugging Face causal LM (mswa.hf.backbone.PretrainedCausalLM's keywords)."""

    pretrained: str = setting()
    dtype: str = "float32"
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = setting(BOOLEAN, False)
    attn_backend: str = setting(one_of(BACKENDS), "auto")
    n_layer: int | None = None  # these three are read from the checkpoint's config (a run records them)
    n_head: int | None = None
    vocab_size: int | None = None


PRETRAINED_SHAPE = ("n_layer", "n_head", "vocab_size")
LABELS = tuple(f.name for f in dataclasses.fields(ModelFile))
PRETRAINED_KEYS = tuple(f.name for f in dataclasses.fields(PretrainedModel) if f.name not in (*LABELS, *PRETRAINED_SHAPE))


def model_config(model: NativeModel, **filled: Any) -> ModelConfig:
    """The model's ModelConfig (which checks its settings), with what the run fills in (``FILLED_BY_RUN``)."""
    labels = {f.name for f in dataclasses.fields(ModelFile)}
    return ModelConfig(**{k: v for k, v in dataclasses.asdict(model).items() if k not in labels}, **filled)


def model_schema(model: Mapping) -> type:
    """The dataclass of a model file: a model that names a pretrained checkpoint is a Hugging Face one."""
    return PretrainedModel if "pretrained" in model else NativeModel


@dataclass
class RunConfig:
    """conf/train.yaml composed: every setting of one run."""

    model: Any = setting()  # NativeModel | PretrainedModel (model_schema picks it)
    window_schedule: ScheduleConfig = setting()
    dataset: DatasetConfig = setting()
    logger: Any = setting()  # LoggerConfig | WandbConfig (by name)
    optim: OptimConfig = setting()
    data: DataConfig = setting()
    checkpoint: CheckpointConfig = setting()
    paths: PathsConfig = setting()
    trainer: dict[str, Any] = setting()  # lightning.Trainer's keywords
    hardware: dict[str, Any] = setting()  # lightning.Trainer's keywords for where it runs
    eval: EvalConfig = field(default_factory=EvalConfig)
    lm_eval: LmEvalConfig | None = None
    slurm: SlurmConfig | None = None
    task_name: str = setting(FOLDER_NAME, "train")
    seed: int = setting(SEED)
    window: int | None = None  # the base window w (checked by the schedule that uses it)
    seq_len: int = setting(POSITIVE)
    compile: bool = setting(BOOLEAN, False)
    torch_threads: int | None = setting(THREADS, None)
    ckpt_path: str | None = None
    overwrite: bool = setting(BOOLEAN, False)

    @property
    def pretrained(self) -> bool:
        return isinstance(self.model, PretrainedModel)


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml composed: what `python -m mswa.evaluate` takes (the rest comes from the run)."""

    run_dir: str = setting()
    ckpt: str = "best"
    eval: EvalConfig = field(default_factory=EvalConfig)
    batch_size: int | None = setting(Rule("an integer >= 1, or null (the run's data.eval_batch_size)", POSITIVE_OR_NULL.ok), None)
    torch_threads: int | None = setting(THREADS, None)
    hardware: dict[str, Any] | None = None  # null: the run's


# Trainer keywords that the run passes itself; the hardware group's keys go to the Trainer as well.
TRAINER_KEYS_SET_BY_RUN = (
    "logger",
    "callbacks",
    "max_epochs",
    "check_val_every_n_epoch",
    "default_root_dir",
    "use_distributed_sampler",
    "deterministic",
    "plugins",
)
TRAINER_KEYWORDS = tuple(name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self")
TRAINER_RULES = {  # the Trainer keywords a run relies on (Lightning checks the others)
    "trainer.max_steps": POSITIVE,
    "trainer.val_check_interval": Rule("an integer >= 1 (training steps between validations)", POSITIVE.ok),
    "trainer.log_every_n_steps": POSITIVE,
    "trainer.accumulate_grad_batches": POSITIVE,
    "trainer.gradient_clip_val": RATE_OR_NULL,
    "hardware.num_nodes": POSITIVE,
    "hardware.devices": DEVICES,
    "hardware.precision": one_of(PRECISIONS),
}


# ---------------------------------------------------------------- parsing


def parse_config(cfg: Mapping) -> RunConfig:
    """The typed form of a composed config; a ConfigError naming the key for an unknown key or a bad value."""
    schema = OmegaConf.structured(RunConfig)
    schema.model = OmegaConf.structured(model_schema(cfg["model"]))
    schema.logger = OmegaConf.structured(LOGGERS.get(cfg["logger"].get("name"), LoggerConfig))
    check_group("", cfg, RunConfig, {"model": schema.model._metadata.object_type, "logger": schema.logger._metadata.object_type})
    check_trainer_keys(cfg)
    ws = cfg["window_schedule"]
    plain = {**cfg, "window_schedule": {**ws, "kind": schedule_rule(cfg)}} if "name" in ws else cfg
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, plain))
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} is not set; give it a value") from None
    except OmegaConfBaseException as error:  # a type the rules do not cover (e.g. window=abc)
        why = str(error.msg).splitlines()[0]
        raise ConfigError(
            f"{error.full_key}={getattr(error, 'value', None)!r} has the wrong type ({why}); give a value of its type"
        ) from None


def check_group(group: str, values: Mapping, schema: type, chosen: Mapping[str, type] | None = None) -> None:
    """Every key of ``values`` is a field of ``schema`` and follows its rule, recursively into dataclass fields."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    set_elsewhere = SET_ELSEWHERE.get(schema, {})
    refuse_unknown(group, values, fields, set_elsewhere)
    hints = typing.get_type_hints(schema)
    prefix = f"{group}." if group else ""
    for name, value in values.items():
        check_value(f"{prefix}{name}", value, fields[name].metadata.get("rule"))
        inner = (chosen or {}).get(name) or next(
            (t for t in typing.get_args(hints[name]) or (hints[name],) if dataclasses.is_dataclass(t)), None
        )
        if inner is not None and isinstance(value, Mapping):
            check_group(f"{prefix}{name}", value, inner)


def refuse_unknown(group: str, values: Mapping, known: Collection[str], set_elsewhere: Mapping[str, str] | None = None) -> None:
    """Every key of `values` must be `known`; `set_elsewhere` maps keys a user may not set to their source."""
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


def check_trainer_keys(cfg: Mapping) -> None:
    """trainer.* and hardware.* are lightning.Trainer's keywords, but those the run sets itself."""
    check_hardware_keys(cfg["hardware"])
    set_by_run = dict.fromkeys(TRAINER_KEYS_SET_BY_RUN, "the run")
    refuse_unknown("trainer", cfg["trainer"], TRAINER_KEYWORDS, set_by_run | {key: f"hardware.{key}" for key in cfg["hardware"]})
    check_trainer_rules("trainer", cfg["trainer"])


def check_hardware_keys(hardware: Mapping) -> None:
    """The hardware group, as train.py and mswa.evaluate hand it to lightning.Trainer."""
    refuse_unknown("hardware", hardware, TRAINER_KEYWORDS, dict.fromkeys(TRAINER_KEYS_SET_BY_RUN, "the run"))
    check_trainer_rules("hardware", hardware)


def check_trainer_rules(group: str, values: Mapping) -> None:
    for key, rule in TRAINER_RULES.items():
        name = key.removeprefix(f"{group}.")
        if name != key and name in values:
            check_value(key, values[name], rule)


_FROM_PRETRAINED = "model.pretrained's config"
SET_ELSEWHERE = {  # known keys a user may not set, and where their value comes from
    NativeModel: FILLED_BY_RUN,
    PretrainedModel: {
        f.name: _FROM_PRETRAINED
        for f in dataclasses.fields(NativeModel)
        if f.name not in {f.name for f in dataclasses.fields(PretrainedModel)}
    },
}
