"""Multi-scale window attention for pretrained Hugging Face causal LMs (needs the `hf` extra:
transformers, and lm_eval for `mswa.hf.evaluate`)."""

from .patch import apply_window_attention, patched_windows, remove_window_attention, resolve_windows, window_cache

__all__ = ["apply_window_attention", "patched_windows", "remove_window_attention", "resolve_windows", "window_cache"]
