"""Tiny Llama-family models and a locally trained tokenizer: offline stand-ins for a pretrained LLM
in tests, benchmarks and smoke runs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A cat sat on the mat and looked at the bird in the tree.",
    "Water boils when it is heated; ice melts when it is warm.",
    "To open a jar, twist the lid. To close it, turn it the other way.",
    "She put the milk in the fridge so that it would stay cold.",
]


def tiny_tokenizer(texts=SAMPLE_TEXT, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`: any string encodes (no unknown tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def tiny_config(
    family: str = "llama",
    *,
    vocab_size: int = 400,
    n_layer: int = 2,
    n_head: int = 4,
    n_kv_head: int = 2,
    hidden: int = 64,
    max_positions: int = 16384,
    **overrides,
):
    """A config of `family` (llama, mistral, qwen2...) small enough for CPU tests; fp32, eager-free defaults."""
    return AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        **overrides,
    )


def tiny_model(family: str = "llama", *, seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs):
    """A randomly initialised causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs), attn_implementation=attn_implementation)
    return model.eval()


def save_tiny(directory, family: str = "llama", **config_kwargs) -> Path:
    """Write a tiny model and its tokenizer to `directory` (loadable with `from_pretrained(directory)`)."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    tiny_model(family, vocab_size=len(tokenizer), **config_kwargs).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
