"""Multi-scale window attention behind one function, `window_attention`.

Window convention (the project's only one): a window W means query i sees keys j with
0 <= i - j < W, itself plus the W - 1 keys before it; None means full causal attention.
This equals HF `sliding_window=W` and flash-attn `window_size=(W - 1, 0)`.

Backends: `dense` (O(N^2) reference), `blocked` (O(N*W), trains on CPU and GPU), `flex`
(FlexAttention; CPU forward only; float64 unfused, for checks), `auto` (flex on CUDA, else blocked). Whatever is asked,
a layer whose windows are all None (or >= N) runs fused full causal SDPA.
"""

from .dispatch import BACKENDS, check_backend, resolve_backend, window_attention

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "window_attention"]
