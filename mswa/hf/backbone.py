"""A pretrained Hugging Face causal LM as the framework's language model (`model=hf_causal_lm`).

The weights are loaded as they are, every layer's attention gets its windows from the window
schedule (`apply_window_attention`), and LoRA adapters are added through `peft`. The default
config is the MSWA authors' recipe: rank 8, alpha 16 on q, k, v, o, with the embeddings and every
norm trained in full (peft's `modules_to_save`, so a saved adapter holds them too). Trainable
parameters are kept in fp32 for AdamW; the frozen base stays in `dtype` (bf16 for a 7B model).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mswa.data.batches import IGNORE
from mswa.hf.patch import apply_window_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pretrained_shape(pretrained: str) -> dict:
    """Layers, query heads and vocabulary of a checkpoint, read from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(pretrained).get_text_config()
    except (OSError, ValueError) as error:
        raise ValueError(f"model.pretrained={pretrained!r} cannot be loaded ({error}); give a hub id or a local model folder") from error
    return {"n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads, "vocab_size": config.vocab_size}


class PretrainedCausalLM(torch.nn.Module):
    """`token_nll(x, y)` and `n_params()` like `mswa.model.LanguageModel`, over a patched HF model."""

    def __init__(
        self,
        pretrained: str,
        windows,
        dtype: str = "float32",
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        from transformers import AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"model.dtype={dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=DTYPES[dtype])
        model.train()  # from_pretrained returns eval mode, which would also switch gradient checkpointing off
        model.config.use_cache = False  # training and scoring never decode
        apply_window_attention(model, windows, backend=attn_backend)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lm = _with_lora(model, lora) if lora else model
        for parameter in self.lm.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()

    def token_nll(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=idx).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none")
        return nll.view_as(targets)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_adapter(self, folder: str | Path) -> None:
        """The LoRA adapter and the fully trained modules, loadable with `peft.PeftModel.from_pretrained`."""
        if hasattr(self.lm, "peft_config"):
            self.lm.save_pretrained(str(folder))


def _with_lora(model, lora: dict):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=list(lora["target_modules"]),
        modules_to_save=list(lora.get("trainable_modules") or []) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft names the modules it could not find
        raise ValueError(f"model.lora does not fit this model ({error}); check model.lora.target_modules / trainable_modules") from error
