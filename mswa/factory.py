"""The model a run trains, built from its typed settings: mswa.model's language model, or a pretrained Hugging
Face one (the `hf` extra, imported only then). The run hands the built model to the Lightning task, which
knows no model family.

A model's *spec* is the keywords it is built from (its settings with the vocabulary, length and windows
filled in); checkpoints record it, so a resume can tell a checkpoint of another model before loading it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mswa.config import PRETRAINED_KEYS, ConfigError, NativeModel, PretrainedModel, RunConfig, model_config
from mswa.model import LanguageModel, ModelConfig
from mswa.windows import WindowSchedule, attended_pairs, make_schedule, mswa_budget

Model = NativeModel | PretrainedModel


def build_schedule(cfg: RunConfig) -> WindowSchedule:
    """The window of every head of every layer, by the schedule's rule (full takes no base window)."""
    ws, model = cfg.window_schedule, cfg.model
    return make_schedule(
        ws.kind,
        name=ws.name,
        w=None if ws.kind == "full" else cfg.window,
        n_layer=model.n_layer,
        n_head=model.n_head,
        head_ratios=ws.head_ratios,
        layer_ratios=ws.layer_ratios,
        windows=ws.windows,
    )


def with_pretrained_shape(model: PretrainedModel) -> PretrainedModel:
    """A pretrained model's layers, heads and vocabulary come from its checkpoint's config (the schedule needs them)."""
    from mswa.hf.backbone import pretrained_shape

    try:
        return dataclasses.replace(model, **pretrained_shape(model.pretrained))
    except ValueError as error:
        raise ConfigError(str(error)) from error


def model_spec(cfg: RunConfig, vocab_size: int, schedule: WindowSchedule) -> dict:
    """The keywords the run's model is built from (for the data's ``vocab_size``), as checkpoints record them."""
    windows = None if schedule.is_full else schedule.as_lists()
    if cfg.pretrained:
        return {key: plain(getattr(cfg.model, key)) for key in PRETRAINED_KEYS} | {"windows": windows}
    learned = learned_spans(cfg, schedule)
    config = model_config(cfg.model, vocab_size=vocab_size, max_seq_len=cfg.seq_len, windows=windows, learned_spans=learned)
    return dataclasses.asdict(config)


def learned_spans(cfg: RunConfig, schedule: WindowSchedule) -> dict | None:
    """window_schedule=learned: the model's learned-span settings (the budget null: mswa's at this shape and length),
    each checked; None for any other schedule."""
    ws = cfg.window_schedule
    if ws.kind != "learned":
        return None
    if cfg.pretrained:
        raise ConfigError("window_schedule=learned trains models of mswa.model; pick another schedule for a pretrained model")
    cap = schedule.windows[0][0]
    if isinstance(ws.ramp, bool) or not isinstance(ws.ramp, int) or not 1 <= ws.ramp < cap:
        raise ConfigError(f"window_schedule.ramp={ws.ramp!r} must be an integer >= 1 below the cap {cap} (w x head_ratios)")
    for key in ("budget_rate", "budget_penalty"):
        if getattr(ws, key) is None or not getattr(ws, key) >= 0:
            raise ConfigError(f"window_schedule.{key}={getattr(ws, key)!r} must be a number >= 0 (the budget's augmented Lagrangian)")
    budget = ws.budget if ws.budget is not None else mswa_budget(schedule.w, schedule.n_layer, schedule.n_head, cfg.seq_len)
    largest = attended_pairs(cap, cfg.seq_len) / attended_pairs(schedule.w, cfg.seq_len)
    if not 0 < budget < largest:
        raise ConfigError(f"window_schedule.budget={budget} must lie in (0, {largest:.4f}), below every head at its cap {cap}")
    return {"ramp": ws.ramp, "budget": budget, "w": schedule.w, "rate": ws.budget_rate, "penalty": ws.budget_penalty}


def build_model(model: Model, spec: dict) -> torch.nn.Module:
    """The model of ``spec``, of the family of ``model``'s settings."""
    if isinstance(model, PretrainedModel):
        from mswa.hf.backbone import PretrainedCausalLM

        return PretrainedCausalLM(**spec)
    return LanguageModel(ModelConfig(**spec))


def finish_pretrained(cfg: RunConfig, model: torch.nn.Module, folder: Path, wandb_run, record: dict) -> dict | None:
    """Save the fine-tuned adapter of the evaluated (best) weights to `adapter/`; then, when `lm_eval`
    is configured, score common-sense reasoning with them (`lm_eval.json`, and W&B)."""
    model.save_adapter(folder / "adapter")
    options = cfg.lm_eval
    if not options:
        return None
    from transformers import AutoTokenizer

    from mswa.hf.evaluate import evaluate_commonsense
    from mswa.hf.patch import hf_base_model

    return evaluate_commonsense(
        hf_base_model(model.lm).eval(),
        AutoTokenizer.from_pretrained(cfg.model.pretrained),
        folder,
        tasks=options.tasks,
        num_fewshot=options.num_fewshot,
        batch_size=options.batch_size,
        limit=options.limit,
        include_path=options.include_path,
        include_defaults=options.include_defaults,
        max_length=cfg.seq_len,
        logger=wandb_run,
        extra=record,
    )


def plain(value):
    """A nested setting (e.g. model.lora) as the dict a checkpoint records."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
