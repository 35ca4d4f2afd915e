"""Sample from a trained run: `python -m mswa.sample RUN_DIR --prompt "..." --max-new-tokens N`.

The run folder's own config (results.json) rebuilds the model and its best checkpoint (or
`--checkpoint last`) fills it; decoding keeps per-head ring KV caches (`mswa.generate`). Text in and
out follows the corpus: UTF-8 bytes for byte corpora (synthetic, enwik8), words of the training
vocabulary for WikiText (`<eos>` printed as a line end), the tokenizer's tokens for packed text.
Sampling: `--temperature` (0 = greedy), `--top-k`, `--top-p`, `--seed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mswa.config import parse_config
from mswa.evaluate import load_run, run_config
from mswa.generate import check_prompt, check_sampling, generate
from mswa.rules import POSITIVE, check_value

EOS_WORD = "<eos>"


class TextCodec:
    """Text <-> token ids in the unit the run was trained on."""

    def __init__(self, cfg: dict, corpus):
        self.unit = unit = corpus.unit
        if unit == "word":
            self.name, self.vocab = corpus.name, corpus.vocab
            self.ids = {word: i for i, word in enumerate(self.vocab)}
        elif unit == "token":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg["dataset"]["loader"]["tokenizer"])

    def encode(self, text: str) -> list[int]:
        if self.unit == "byte":
            return list(text.encode("utf-8"))
        if self.unit == "token":
            return self.tokenizer.encode(text, add_special_tokens=False)
        unknown = [word for word in text.split() if word not in self.ids]
        if unknown:
            raise ValueError(
                f"prompt word {unknown[0]!r} is not in the {self.name} vocabulary ({len(self.vocab):,} words of its "
                f"training split): use its words (rare ones are written <unk>)"
            )
        return [self.ids[word] for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        if self.unit == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.unit == "token":
            return self.tokenizer.decode(ids)
        return " ".join(self.vocab[i] for i in ids).replace(f" {EOS_WORD} ", "\n").replace(EOS_WORD, "\n")


def sample(
    run_dir,
    prompt: str,
    max_new_tokens: int,
    *,
    checkpoint: str = "best",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = 0,
) -> str:
    """The prompt and its continuation, as text."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    settings = parse_config(run_config(run_dir))
    if settings.pretrained:
        raise ValueError(
            f"{run_dir} fine-tuned the pretrained model {settings.model.pretrained}: sample it with transformers' "
            "generate (mswa.hf.window_cache gives the per-head cache), not mswa.sample"
        )
    cfg, task, corpus = load_run(run_dir, checkpoint, key="--checkpoint ")
    model = task.model
    codec = TextCodec(cfg, corpus)
    ids = codec.encode(prompt)
    check_prompt(model.cfg, len(ids), max_new_tokens)
    tokens = generate(model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return codec.decode(tokens[0].tolist())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mswa.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder of train.py (holding results.json and checkpoints/)")
    parser.add_argument("--prompt", required=True, help="text to continue (bytes, or words of a word corpus)")
    parser.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", dest="top_k", type=int, default=None)
    parser.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default="best", help="best, last or the path of a .ckpt")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; decoding one sequence is a string of small operations that more threads mostly slow",
    )
    args = parser.parse_args(argv)
    try:
        check_value("--threads", args.threads, POSITIVE)
        torch.set_num_threads(args.threads)
        text = sample(
            args.run_dir,
            args.prompt,
            args.max_new_tokens,
            checkpoint=args.checkpoint,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(text)


if __name__ == "__main__":
    main()
