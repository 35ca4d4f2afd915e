"""What makes two runs one experiment, and what a run reads against what its data holds.

A *variant* is a resolved config minus what does not change the numbers a run produces (its seed,
where it writes and logs, the hardware it runs on, labels such as the model's and the schedule file's
names): ``model=swa`` and ``model=swa window_schedule=uniform`` are one variant, and so are
``model=mswa`` and ``model=swa window_schedule=mswa``, whichever sweep folder they ran in, and a run
written before schedules had a ``kind`` is the variant of the same run written after. The report pairs runs by it; a rerun
sweep uses it to tell a finished job of the same config from a stale folder.

Plain Python on plain dicts (the config as ``results.json`` stores it): no torch, no Hydra.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

# top-level keys that never change a run's numbers, and dotted keys inside groups that only label or locate
NOT_IDENTITY = (
    "seed",
    "paths",
    "hardware",
    "logger",
    "launcher",
    "torch_threads",
    "ckpt_path",
    "overwrite",
    "task_name",
    "compile",
    "hydra",
)
NOT_IDENTITY_DOTTED = ("model.name", "dataset.loader.data_dir")
# what may differ between a variant and the SWA run it is compared with: its attention
ATTENTION_KEYS = ("window_schedule", "model.windowed")
log = logging.getLogger(__name__)


def schedule_rule(cfg: Mapping) -> str:
    """The rule of a config's window schedule (mswa, uniform, ...): its ``kind``; runs written before
    schedules were named by their file have only ``name``, which was the rule."""
    schedule = cfg["window_schedule"]
    return schedule.get("kind") or schedule["name"]


def variant_name(overrides: Iterable[str], not_in_name: Collection[str] = ()) -> str:
    """A run's variant as people read it: its overrides, sorted, without the seed and the keys that do not
    make a variant (``not_in_name``: paths, hardware, ...), or ``default``. Seeds of one variant are
    aggregated under it (W&B's and the report's rows)."""
    left_out = {"seed", *not_in_name}
    return ",".join(o for o in sorted(overrides) if o.split("=")[0].lstrip("+~") not in left_out) or "default"


def _without(cfg: Mapping, top: tuple[str, ...], dotted: tuple[str, ...]) -> dict:
    plain = {key: copy.deepcopy(value) for key, value in cfg.items() if key not in top}
    for key in dotted:
        *parents, last = key.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return plain


def _digest(value: Mapping) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def variant_config(cfg: Mapping) -> dict:
    """The config minus seed, paths, hardware, logging and labels: what a variant is. The schedule is
    named by its rule, as runs before ``kind`` named it, so that both layouts give one variant."""
    plain = _without(cfg, NOT_IDENTITY, NOT_IDENTITY_DOTTED)
    if isinstance(plain.get("window_schedule"), dict) and "name" in plain["window_schedule"]:
        rule = schedule_rule(plain)
        plain["window_schedule"].pop("kind", None)
        plain["window_schedule"]["name"] = rule
    return plain


def variant_id(cfg: Mapping) -> str:
    """A short digest of :func:`variant_config`; equal ids = the same experiment (seed aside)."""
    return _digest(variant_config(cfg))


def comparison_id(cfg: Mapping) -> str:
    """The digest of the variant minus its attention (schedule and windowed flag): variants with equal
    comparison ids differ only in their windows, so one may serve as the other's SWA reference."""
    top = tuple(k for k in ATTENTION_KEYS if "." not in k)
    dotted = tuple(k for k in ATTENTION_KEYS if "." in k)
    return _digest(_without(variant_config(cfg), top, dotted))


# ---------------------------------------------------------------- data repetition


def world_size(hardware: Mapping) -> int:
    """Processes that each draw their own batches: devices x nodes (all visible GPUs for devices=-1/auto)."""
    devices = hardware.get("devices", 1)
    if not isinstance(devices, int) or devices < 1:
        import torch

        devices = max(1, torch.cuda.device_count()) if hardware.get("accelerator") in ("gpu", "cuda") else 1
    return devices * int(hardware.get("num_nodes", 1) or 1)


def training_tokens(cfg: Mapping) -> int:
    """Tokens a run's training reads: steps x batch x seq_len x accumulation x processes."""
    trainer = cfg["trainer"]
    return (
        trainer["max_steps"]
        * cfg["data"]["batch_size"]
        * cfg["seq_len"]
        * (trainer.get("accumulate_grad_batches") or 1)
        * world_size(cfg["hardware"])
    )


def repetition_warning(cfg: Mapping, train_tokens: int) -> str | None:
    """One sentence when training reads more tokens than its split holds (it then also fits the text), else None."""
    read = training_tokens(cfg)
    if read <= train_tokens:
        return None
    return (
        f"warning: training reads {read:,} tokens, {read / train_tokens:.1f} passes over the "
        f"{train_tokens:,}-token train split of {cfg['dataset']['name']!r}, so part of what it learns is that text itself; "
        "a larger corpus or fewer trainer.max_steps keeps it under one pass"
    )


def warn_if_repeating(cfg: Mapping, train_tokens: int) -> None:
    message = repetition_warning(cfg, train_tokens)
    if message:
        log.warning(message)


# ---------------------------------------------------------------- continuing a sweep


def continue_job(cfg: dict, run_dir: str | Path) -> dict | None:
    """How a sweep job reruns in a folder it ran in before (with a fixed ``hydra.sweep.dir``).

    Returns the earlier results when that run finished with this same variant and seed (the job is
    skipped: nothing is touched); otherwise sets ``ckpt_path=last`` in ``cfg`` when the folder holds a
    checkpoint of an unfinished run, so it resumes; a fresh folder, ``ckpt_path`` or ``overwrite``
    given, or no checkpoint: ``cfg`` is left as it is. A finished run of another config in the folder
    is refused in one sentence (a changed experiment file would otherwise be skipped silently)."""
    run_dir = Path(run_dir)
    if cfg.get("overwrite") or cfg.get("ckpt_path") is not None:
        return None
    results = _read_results(run_dir / "results.json")
    if results and results.get("status") == "finished":
        earlier = _restricted(results.get("config") or {}, cfg)  # a run may add keys (a checkpoint's shape)
        if variant_id(earlier) != variant_id(cfg) or earlier.get("seed") != cfg.get("seed"):
            raise ValueError(
                f"{run_dir} holds a finished run of another config (variant {variant_id(earlier)}, this job's "
                f"{variant_id(cfg)}); rerun the sweep into a new hydra.sweep.dir or pass overwrite=true"
            )
        log.info(f"skipped: {run_dir} already finished (results.json); overwrite=true reruns it")
        return results
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        log.info(f"resuming: {run_dir} from checkpoints/last.ckpt")
        cfg["ckpt_path"] = "last"
    return None


def _restricted(earlier: Mapping, now: Mapping) -> dict:
    """``earlier`` with only the keys ``now`` has, recursively."""
    return {
        key: _restricted(value, now[key]) if isinstance(value, Mapping) and isinstance(now[key], Mapping) else value
        for key, value in earlier.items()
        if key in now
    }


def _read_results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
