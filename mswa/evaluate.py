"""Evaluate a trained run's checkpoint on valid and test with chosen evaluation settings, without training.

    python -m mswa.evaluate run_dir=RUN [ckpt=best|last|PATH] [eval.seq_len=N] [eval.stride=S]
    python -m mswa.evaluate -m run_dir=RUN eval.seq_len=512,1024,2048,4096

The model and data come from the run's saved config (``results.json``, else ``.hydra/config.yaml``);
the command line sets only what ``conf/evaluate.yaml`` holds (``eval.*``, the checkpoint, batch size,
threads, hardware); a key that would change the model or data is refused before any work. Defaults
are those of training: ``eval.seq_len`` null = the run's training ``seq_len``, ``eval.stride`` null =
``eval.seq_len``. Each setting writes ``RUN/evaluation_L<seq_len>_stride<stride>_<ckpt>.json``
(atomically; ``results.json`` is never touched) and, when the run logged to W&B (``RUN/wandb_id``),
the same numbers into that W&B run's summary under ``evaluate/<setting>``.

``load_run(run_dir, checkpoint)`` is the one way to get a run folder's config, trained model and
corpus back; the sampling command (``mswa.sample``) reuses it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mswa.atomic import write_atomic
from mswa.checks import check_evaluation, check_repeated_overrides, check_same_model, read_run_checkpoint
from mswa.config import RunConfig, WandbConfig, parse_config, with_wandb_environment
from mswa.data.batches import eval_context
from mswa.data.corpus import Corpus
from mswa.factory import build_model, build_schedule, model_spec, with_pretrained_shape
from mswa.folders import check_folder
from mswa.lit import CorpusDataModule, LanguageModelTask
from mswa.run import git_commit, load_corpus, quiet_lightning, quote_paths, warn_short_evaluations

# command-line keys of conf/evaluate.yaml; any other key (model.*, dataset.*, seq_len, ...) is refused
EVALUATE_KEYS = ("run_dir", "ckpt", "eval.seq_len", "eval.stride", "batch_size", "torch_threads", "hardware")
NAMED_CHECKPOINTS = {"best": "checkpoints/best.ckpt", "last": "checkpoints/last.ckpt"}
PATH_KEYS = ("run_dir", "ckpt")  # paths that hold `=` and `,` (run folders are named by their overrides)


def load_run(run_dir: str | os.PathLike, checkpoint: str = "best", key: str = "ckpt=") -> tuple[dict, LanguageModelTask, Corpus]:
    """A trained run folder's ``(cfg, task, corpus)``.

    ``run_dir``: a folder written by train.py. ``checkpoint``: ``"best"`` (``checkpoints/best.ckpt``),
    ``"last"`` (``checkpoints/last.ckpt``) or the path of a ``.ckpt`` (relative paths are tried from the
    current directory, then from the run folder). Returns the run's resolved config (a plain dict),
    its ``LanguageModelTask`` on the CPU in eval mode with the checkpoint's weights (``task.model`` is
    the language model: ``token_nll``, ``forward``; learned spans hardened to the run's windows), and its
    corpus (data paths as the run stored them).
    A missing folder, config or checkpoint, or a file train.py did not write, raises a one-sentence ValueError
    before anything is built; a checkpoint of another model (another run's), one once the corpus is loaded (the
    model's vocabulary comes from it). ``key`` is how the caller's user
    names the checkpoint in those sentences (``ckpt=`` on a Hydra command line, ``--checkpoint `` for
    ``mswa.sample``).
    """
    cfg = run_config(run_dir)
    named = f"{key}{checkpoint}"
    stored = read_run_checkpoint(checkpoint_file(run_dir, checkpoint, key), named)
    settings = run_settings(cfg)
    corpus = load_corpus(settings.dataset)
    spec = model_spec(settings, corpus.vocab_size, build_schedule(settings))
    check_same_model(stored, spec, named, f"pass a checkpoint written by the run in {run_dir}")
    task = LanguageModelTask(build_model(settings.model, spec), settings.optim, corpus.unit, spec=spec)
    task.load_state_dict(stored["state_dict"], strict=task.strict_loading)
    if hasattr(task.model, "harden_spans"):
        task.model.harden_spans()  # learned spans: the hardened windows, which the run's final numbers are of
    return cfg, task.eval(), corpus


def run_config(run_dir: str | os.PathLike) -> dict:
    """The resolved config a run trained with: results.json's ``config``, else ``.hydra/config.yaml``."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ValueError(f"run_dir={run_dir} is not a folder; pass the folder of a trained run (the one holding results.json)")
    results = folder / "results.json"
    try:
        cfg = json.loads(results.read_text()).get("config") if results.is_file() else None
    except json.JSONDecodeError as error:
        raise ValueError(f"run_dir={run_dir}: results.json is not valid JSON ({error}); restore it or point run_dir elsewhere") from None
    if cfg is None and (folder / ".hydra" / "config.yaml").is_file():
        cfg = OmegaConf.to_container(OmegaConf.load(folder / ".hydra" / "config.yaml"), resolve=True)
    if cfg is None:
        raise ValueError(
            f"run_dir={run_dir} holds neither results.json with a config nor .hydra/config.yaml; pass the folder train.py wrote for the run"
        )
    return cfg


def run_settings(cfg: dict) -> RunConfig:
    """The typed form of a run's saved config; a pretrained model's shape is read from its checkpoint's config when
    the run did not record it (a run that stopped before results.json)."""
    settings = parse_config(cfg)
    if settings.pretrained and settings.model.n_layer is None:
        settings.model = with_pretrained_shape(settings.model)
    return settings


def checkpoint_file(run_dir: str | os.PathLike, checkpoint: str, key: str = "ckpt=") -> Path:
    """The file ``checkpoint`` (best, last or a path) names for a run folder; a ValueError when absent."""
    if checkpoint in NAMED_CHECKPOINTS:
        path = Path(run_dir) / NAMED_CHECKPOINTS[checkpoint]
        if not path.is_file():
            other = "last" if checkpoint == "best" else "best"
            raise ValueError(f"{key}{checkpoint} but {path} does not exist; pass {key}{other} or {key}<path of a .ckpt>")
        return path
    for path in (Path(checkpoint), Path(run_dir) / checkpoint):
        if path.is_file():
            return path
    raise ValueError(f"{key}{checkpoint} is not a file (from here or from {run_dir}); pass {key}best, {key}last or a .ckpt path")


def check_overrides(overrides: list[str]) -> None:
    """Refuse, in one sentence, command-line keys that are not evaluation settings or are repeated, and a missing
    or read-only run folder (the evaluations are written into it)."""
    check_repeated_overrides(overrides)
    keys = {}
    for override in overrides:
        key, _, value = override.partition("=")
        keys[key.lstrip("+~")] = value
    for key in keys:
        if key.startswith("hydra") or key in EVALUATE_KEYS or key.startswith("hardware."):
            continue
        raise ValueError(
            f"{key} is not an evaluation setting: the model and data come from the run's saved config (train a new run "
            f"to change them); evaluate takes {', '.join(EVALUATE_KEYS)}"
        )
    if "run_dir" not in keys:
        raise ValueError("run_dir is not given; pass run_dir=<folder of a trained run> (the one holding results.json)")
    value = keys["run_dir"]
    if len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]:
        value = value[1:-1]
    for folder in [value] if Path(value).is_dir() else value.split(","):  # a multirun may list several
        if not Path(folder).is_dir():
            raise ValueError(f"run_dir={folder} is not a folder; pass the folder of a trained run (the one holding results.json)")
        check_folder("run_dir", folder)


def evaluate(options: dict) -> dict:
    """Evaluate per ``options`` (conf/evaluate.yaml, resolved); write and return the record."""
    started = time.time()
    quiet_lightning()  # as train.py: Lightning's tips and deprecation notes are not ours to act on
    run_dir, checkpoint = Path(options["run_dir"]), str(options["ckpt"])
    cfg = run_config(run_dir)
    logger, hardware = _wandb_logger(cfg, run_dir), options.get("hardware") or cfg["hardware"]
    check_evaluation(options, hardware, wandb_mode=None if logger is None else logger.mode)
    checkpoint_file(run_dir, checkpoint)
    cfg["eval"] = {"seq_len": options["eval"]["seq_len"], "stride": options["eval"]["stride"]}
    seq_len, stride = eval_context(cfg)
    batch_size = options.get("batch_size") or cfg["data"]["eval_batch_size"]
    if options.get("torch_threads"):
        torch.set_num_threads(options["torch_threads"])
    cfg, task, corpus = load_run(run_dir, checkpoint)
    warn_short_evaluations(corpus, seq_len)
    data = CorpusDataModule(
        corpus, cfg["seq_len"], cfg["data"]["batch_size"], batch_size, cfg["seed"], eval_seq_len=seq_len, eval_stride=stride
    )
    trainer = L.Trainer(
        **hardware,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.validate(task, datamodule=data, verbose=False)
    trainer.test(task, datamodule=data, verbose=False)
    name = f"L{seq_len}_stride{stride}_{Path(checkpoint).stem}"
    record = {
        "schema": 1,
        "setting": name,
        "checkpoint": checkpoint,
        "unit": corpus.unit,
        "metric": corpus.metric,
        "metrics": dict(task.eval_results),
        "evaluation": {**data.eval_settings, **task.eval_details},
        "train_seq_len": cfg["seq_len"],
        "batch_size": batch_size,
        "wall_time_s": time.time() - started,
        "git_commit": git_commit(),
    }
    if trainer.global_rank == 0:
        write_atomic(run_dir / f"evaluation_{name}.json", json.dumps(record, indent=2, default=str))
        if logger is not None:
            _mirror_to_wandb(logger, run_dir, name, record)
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items() if k.endswith(corpus.metric)))
    return record


def _wandb_logger(cfg: dict, run_dir: Path) -> WandbConfig | None:
    """The W&B settings of a run that logged to W&B (it left its run id), as W&B's environment variables have them
    now; None when it did not or WANDB_MODE=disabled. The evaluations join that run's summary."""
    logger = parse_config({**cfg, "logger": with_wandb_environment(cfg["logger"])}).logger
    if not isinstance(logger, WandbConfig) or logger.mode == "disabled" or not (run_dir / "wandb_id").is_file():
        return None
    return logger


def _mirror_to_wandb(logger: WandbConfig, run_dir: Path, name: str, record: dict) -> None:
    """The record into the summary of the run's own W&B run."""
    import wandb

    run = wandb.init(
        project=logger.project,
        entity=logger.entity,
        id=(run_dir / "wandb_id").read_text().strip(),
        resume="allow",
        mode=logger.mode,
        dir=logger.dir or str(run_dir),
    )
    run.summary[f"evaluate/{name}"] = {key: record[key] for key in ("metrics", "evaluation", "checkpoint")}
    run.finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        evaluate(OmegaConf.to_container(cfg, resolve=True))
    except ValueError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the sweep records the job as failed and goes on
            raise
        sys.exit(f"error: {error}")


def main() -> None:
    args = quote_paths(sys.argv[1:], PATH_KEYS)
    try:
        check_overrides([arg for arg in args if not arg.startswith("-")])
    except ValueError as error:
        sys.exit(f"error: {error}")
    sys.argv[1:] = args
    _hydra_entry()


if __name__ == "__main__":
    main()
