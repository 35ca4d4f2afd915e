"""Common-sense reasoning of a (window-patched) Hugging Face causal LM, through lm-evaluation-harness.

`evaluate_commonsense(model, tokenizer, run_dir)` runs lm_eval's `simple_evaluate` on the model as it
is (patch it first with `apply_window_attention`), writes `<run_dir>/lm_eval.json` and returns the
flat summary `{task: {metric: value}}`; a passed logger (a W&B run, or a Lightning logger) gets the
same numbers as `lm_eval/<task>/<metric>`.

CLI, e.g. MSWA on a local Llama with w = 1/4 of 4096 tokens (add `--adapter RUN/adapter` to score a
model fine-tuned by train.py):

    python -m mswa.hf.evaluate --model PATH --schedule mswa --window-fraction 0.25 --seq-len 4096 --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from mswa.folders import FolderError, check_folder
from mswa.hf.patch import apply_window_attention, patched_windows

DEFAULT_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
RESULTS_FILE = "lm_eval.json"
SAMPLES_FILE = "lm_eval_samples.jsonl"


def evaluate_commonsense(
    model,
    tokenizer,
    run_dir,
    *,
    tasks=DEFAULT_TASKS,
    num_fewshot: int = 0,
    batch_size: int = 1,
    limit: int | float | None = None,
    include_path=None,
    include_defaults: bool = True,
    max_length: int | None = None,
    logger=None,
    save_samples: bool = False,
    extra: dict | None = None,
) -> dict:
    """Evaluate `model` on `tasks` with `num_fewshot` shots; write `<run_dir>/lm_eval.json`; return the summary.

    `include_path`: folder(s) of extra lm_eval task YAMLs; `include_defaults=False` skips indexing lm_eval's
    own ~15k task configs (seconds) when only those are needed. `limit`: examples per task (smoke runs).
    `save_samples`: also write every scored example to `<run_dir>/lm_eval_samples.jsonl`.
    `extra`: anything to record next to the results (schedule name, checkpoint...)."""
    from lm_eval import __version__ as lm_eval_version
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = _check_request(tasks, num_fewshot, batch_size)
    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks {unknown} are unknown to lm_eval: check the names, or pass include_path=<folder of task YAMLs>.")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    output = simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=task_manager, log_samples=save_samples
    )
    summary = summarize(output["results"])
    windows = patched_windows(model)
    record = {
        "tasks": list(tasks),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "windows": None if windows is None else [list(layer) for layer in windows],
        "summary": summary,
        "results": output["results"],
        "n_shot": output.get("n-shot"),
        "n_samples": output.get("n-samples"),
        "versions": output.get("versions"),
        "lm_eval_version": lm_eval_version,
        **(extra or {}),
    }
    (run_dir / RESULTS_FILE).write_text(json.dumps(record, indent=2, default=str))
    if save_samples:
        _write_samples(run_dir / SAMPLES_FILE, output["samples"])
    if logger is not None:
        _log(logger, summary)
    return summary


def summarize(results: dict) -> dict:
    """lm_eval's per-task results -> {task: {metric: value}}. Metrics are the "<metric>,<filter>" keys
    (the default filter "none" is dropped from the name); bookkeeping keys and "N/A" stderrs are skipped."""
    summary = {}
    for task, metrics in results.items():
        numbers = {}
        for key, value in metrics.items():
            name, comma, filter_name = key.partition(",")
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                numbers[name if filter_name == "none" else f"{name}/{filter_name}"] = float(value)
        summary[task] = numbers
    return summary


def _write_samples(path: Path, samples: dict) -> None:
    """One JSON line per scored example: its document, target, the model's responses (for multiple
    choice, one (log-likelihood, is_greedy) pair per choice) and its metric values."""
    with path.open("w") as lines:
        for task, task_samples in samples.items():
            for sample in task_samples:
                row = {
                    "task": task,
                    "doc_id": sample["doc_id"],
                    "doc": sample["doc"],
                    "target": sample["target"],
                    "responses": sample["filtered_resps"],
                    **{name: sample[name] for name in sample["metrics"]},
                }
                lines.write(json.dumps(row, default=str) + "\n")


def _check_request(tasks, num_fewshot, batch_size) -> tuple[str, ...]:
    tasks = tuple(tasks.split(",") if isinstance(tasks, str) else tasks)
    if not tasks or any(not isinstance(task, str) or not task for task in tasks):
        raise ValueError(f"tasks={tasks!r}: give lm_eval task names, e.g. {','.join(DEFAULT_TASKS)}.")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot!r}: give the number of in-context examples, an int >= 0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give an int >= 1.")
    return tasks


def _log(logger, summary: dict) -> None:
    """A W&B run (`.log`) or a Lightning logger (`.log_metrics`) gets lm_eval/<task>/<metric>."""
    flat = {f"lm_eval/{task}/{metric}": value for task, metrics in summary.items() for metric, value in metrics.items()}
    if hasattr(logger, "log_metrics"):
        logger.log_metrics(flat)
    elif hasattr(logger, "log"):
        logger.log(flat)
    else:
        raise ValueError(f"logger {type(logger).__name__} has neither log_metrics nor log: pass a W&B run or a Lightning logger.")


def schedule_windows(config, schedule: str, *, window=None, window_fraction=None, seq_len=None, windows=None):
    """Per-layer, per-head windows of a named schedule (mswa.windows) for a model `config`; the base
    window in tokens, or as a fraction of seq_len (the authors' way: 0.25 x 4096 = 1024)."""
    from mswa.windows import fraction_to_tokens, make_schedule

    if window is not None and window_fraction is not None:
        raise ValueError("give the base window either in tokens (window) or as window_fraction with seq_len, not both.")
    if window_fraction is not None:
        window = fraction_to_tokens(window_fraction, seq_len, key="window_fraction")
    config = config.get_text_config()
    built = make_schedule(schedule, w=window, n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, windows=windows)
    return built.windows


def main(argv=None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    table = None
    if args.schedule is not None:  # validated on the config, before the weights load
        custom = json.loads(args.windows) if args.windows else None
        table = schedule_windows(
            AutoConfig.from_pretrained(args.model),
            args.schedule,
            window=args.window,
            window_fraction=args.window_fraction,
            seq_len=args.seq_len,
            windows=custom,
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    if args.adapter:  # a fine-tuned adapter (train.py writes <run>/adapter), merged into the weights
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if table is not None:
        apply_window_attention(model, table, backend=args.backend)
    extra = {"model": args.model, "adapter": args.adapter, "schedule": args.schedule}
    logger = _wandb_run(args) if args.wandb_project else None
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    summary = evaluate_commonsense(
        model,
        tokenizer,
        args.out,
        tasks=args.tasks,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        limit=limit,
        include_path=args.include_path,
        include_defaults=not args.no_default_tasks,
        max_length=args.max_length,
        logger=logger,
        save_samples=args.save_samples,
        extra=extra,
    )
    if logger is not None:
        logger.finish()
    _print_table(summary)
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="lm-evaluation-harness on a Hugging Face causal LM with MSWA windows.")
    parser.add_argument("--model", required=True, help="local folder or hub name of a causal LM")
    parser.add_argument("--tokenizer", help="defaults to --model")
    parser.add_argument("--adapter", help="peft adapter folder to merge into --model (a fine-tuning run's adapter/)")
    parser.add_argument(
        "--schedule", help="window schedule (mswa.windows: uniform, mswa, mswa_official, ...); omit for the unpatched model"
    )
    parser.add_argument("--window", type=int, help="base window w in tokens")
    parser.add_argument("--window-fraction", type=float, help="base window as a fraction of --seq-len")
    parser.add_argument("--seq-len", type=int, help="sequence length that --window-fraction refers to")
    parser.add_argument("--windows", help="JSON per-layer list of per-head windows, for --schedule custom")
    # lm_eval feeds many different lengths; flex compiles one kernel per length, blocked needs none.
    parser.add_argument("--backend", default="blocked", help="window_attention backend (default blocked)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm_eval tasks")
    parser.add_argument("--num-fewshot", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--limit", type=float, help="examples per task (an int), or a fraction < 1")
    parser.add_argument("--max-length", type=int, help="longest context lm_eval feeds the model")
    parser.add_argument("--include-path", help="folder of extra lm_eval task YAMLs")
    parser.add_argument("--no-default-tasks", action="store_true", help="only the tasks under --include-path (faster start)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default="bfloat16" if torch.cuda.is_available() else "float32", choices=["float32", "bfloat16", "float16"]
    )
    parser.add_argument("--out", required=True, help="run folder; lm_eval.json is written there")
    parser.add_argument("--save-samples", action="store_true", help="also write lm_eval_samples.jsonl (every scored example)")
    parser.add_argument("--wandb-project", help="also log to this W&B project (WANDB_MODE decides online/offline)")
    return parser


def _check_paths(parser: argparse.ArgumentParser, args) -> None:
    """Local paths exist (before transformers would read a missing one as a malformed hub id)."""
    for flag, value, hub_ok in (
        ("--model", args.model, True),
        ("--tokenizer", args.tokenizer, True),
        ("--adapter", args.adapter, True),
        ("--include-path", args.include_path, False),
    ):
        if value is not None and not Path(value).expanduser().exists() and (not hub_ok or _looks_local(value)):
            kind = "a local folder or a hub id (owner/name)" if hub_ok else "an existing folder"
            parser.exit(2, f"error: {flag} {value}: no such file or folder; give {kind}\n")
    try:
        check_folder("--out", args.out)
    except FolderError as error:
        parser.exit(2, f"error: {error}\n")


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else is meant as a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _wandb_run(args):
    import wandb

    Path(args.out).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=args.wandb_project, dir=args.out, job_type="lm_eval", config=vars(args))


def _print_table(summary: dict) -> None:
    for task, metrics in summary.items():
        shown = ", ".join(f"{name}={value:.4f}" for name, value in metrics.items() if "stderr" not in name)
        print(f"{task:20s} {shown}")


if __name__ == "__main__":
    main()
