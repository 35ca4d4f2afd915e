"""A decoder-only language model whose attention layers each take their own per-head windows.

Plain PyTorch (no Lightning, no Hydra). Full attention is the same model with every window None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mswa.attention import window_attention
from mswa.attention.linear import LinearAttentionState, causal_linear_attention, linear_attention_step, mapped_feature_dim
from mswa.windows import Window, attended_pairs, validate_window_table, window_for_pairs


@dataclass
class ModelConfig:
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 8
    d_model: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.0
    max_seq_len: int = 1024  # learned positions are sized by it
    positions: str = "rope"  # "rope" | "learned"
    windows: list[list[Window]] | None = None  # [layer][head]; None = full causal everywhere
    # learned windows (window_schedule=learned): {"ramp": R, "budget": pairs / SWA(w), "w": w, "rate": multiplier
    # step, "penalty": quadratic weight}; every head learns a span below its window (its cap), starting at the budget
    learned_spans: dict | None = None
    attn_backend: str = "auto"
    output: str = "softmax"  # "softmax" (tied to the embedding) | "adaptive" (adaptive softmax)
    adaptive_cutoffs: list[int] = field(default_factory=lambda: [20000, 40000, 200000])
    # Token mixers: "attention" everywhere, "linear" everywhere, or a "hybrid" of the two laid out as
    # "interleave" (layer kinds follow `pattern`, repeated over depth) or "parallel" (both in every layer).
    mixer: str = "attention"
    layout: str = "interleave"
    pattern: list[str] = field(default_factory=lambda: ["linear", "window"])
    linear_feature_map: str = "elu"
    linear_feature_dim: int = 16

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2 and self.positions == "rope":
            raise ValueError(f"rotary positions need an even head dim, got d_model/n_head={self.d_model // self.n_head}")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"model.positions={self.positions!r} is unknown; use 'rope' or 'learned'")
        if self.output not in ("softmax", "adaptive"):
            raise ValueError(f"model.output={self.output!r} is unknown; use 'softmax' or 'adaptive'")
        if self.output == "adaptive" and not all(0 < c < self.vocab_size for c in self.adaptive_cutoffs):
            raise ValueError(
                f"model.adaptive_cutoffs={list(self.adaptive_cutoffs)} must lie strictly between 0 and the vocabulary "
                f"size {self.vocab_size}; lower them or use model.output=softmax"
            )
        if self.mixer not in ("attention", "linear", "hybrid"):
            raise ValueError(f"model.mixer={self.mixer!r} is unknown; use attention, linear or hybrid")
        if self.mixer == "hybrid" and self.layout not in ("interleave", "parallel"):
            raise ValueError(f"model.layout={self.layout!r} is unknown; use interleave or parallel")
        if self.mixer == "hybrid" and self.layout == "interleave" and (not self.pattern or set(self.pattern) - {"linear", "window"}):
            raise ValueError(f"model.pattern={list(self.pattern)} must be a non-empty list of 'linear' and 'window'")
        if self.windows is not None:
            validate_window_table(self.windows, self.n_layer, self.n_head, key="model.windows")
        if self.learned_spans is not None and (self.windows is None or any(w is None for row in self.windows for w in row)):
            raise ValueError("learned spans need a cap (an integer window) for every head: window_schedule=learned sets them")

    def layer_windows(self, layer: int) -> list[Window]:
        return [None] * self.n_head if self.windows is None else list(self.windows[layer])

    def layer_mixer(self, layer: int) -> str:
        """'window' (softmax attention, full when its windows are None), 'linear' or 'parallel'."""
        if self.mixer == "hybrid":
            return "parallel" if self.layout == "parallel" else self.pattern[layer % len(self.pattern)]
        return "linear" if self.mixer == "linear" else "window"


class Rotary(nn.Module):
    """Rotary position embedding over the head dim; cos/sin tables cached per device, grown by doubling
    (decoding asks for one more position at every step)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            length = max(seq_len, 2 * self._cache[0]) if self._cache is not None else seq_len
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = (length, device, angles.cos(), angles.sin())
        return self._cache[2][:seq_len], self._cache[3][:seq_len]

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # x: (B, H, N, D) at positions start...
        cos, sin = (t[start:] for t in self.tables(start + x.shape[-2], x.device))
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class WindowedSelfAttention(nn.Module):
    """Multi-head attention in which head h sees its last `windows[h]` keys (None = all).

    With a decoding cache (`mswa.generate.LayerCache`) the same forward serves generation: a prompt
    (start = 0) runs the training kernel and leaves each window group its last W - 1 keys and values;
    later tokens (start > 0) attend to those through the cache."""

    def __init__(self, cfg: ModelConfig, windows: list[Window]):
        super().__init__()
        self.n_head, self.windows, self.backend = cfg.n_head, windows, cfg.attn_backend
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.d_model // cfg.n_head) if cfg.positions == "rope" else None
        self.learned = cfg.learned_spans is not None  # until harden_spans
        if self.learned:
            self.ramp = float(cfg.learned_spans["ramp"])
            self.register_buffer("caps", torch.tensor(windows, dtype=torch.float32), persistent=False)
            self.span_logits = nn.Parameter(torch.full((cfg.n_head,), _initial_logit(cfg, windows)))

    def spans(self) -> torch.Tensor:
        """Each head's span z in [0, cap - R]: its soft mask then ends at its cap."""
        return (self.caps - self.ramp) * torch.sigmoid(self.span_logits)

    def soft_pairs(self, seq_len: int) -> torch.Tensor:
        """Attended pairs of each head under its soft mask: sum over lags d of m(d) (N - d) (differentiable)."""
        lag = torch.arange(seq_len, device=self.span_logits.device, dtype=torch.float32)
        weight = ((self.spans()[:, None] + self.ramp - lag) / self.ramp).clamp(0, 1)
        return (weight * (seq_len - lag)).sum(-1)

    def fix_windows(self, windows: list[int]) -> None:
        """From now on hard windows (the hardened spans); the soft mask is dropped."""
        self.windows, self.learned = list(windows), False

    def heads(self, x: torch.Tensor, cache=None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head attention outputs (B, H, N, D) and the values v they mixed; x holds positions start..."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is not None and self.learned:
            raise ValueError("a model with learned spans decodes with its hardened windows: train the run's learned_*.yaml schedule")
        if cache is not None and start > 0:  # decoding: the new tokens against the cached keys
            return cache.attend(q, k, v), v
        if cache is not None:  # a prompt: keep what later tokens will see
            cache.store(k, v)
        if self.learned:
            return window_attention(q, k, v, self.windows, backend=self.backend, spans=self.spans(), ramp=self.ramp), v
        return window_attention(q, k, v, self.windows, backend=self.backend), v

    def merge(self, heads: torch.Tensor) -> torch.Tensor:
        b, h, n, d = heads.shape
        return self.proj(heads.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        return self.merge(self.heads(x, cache, start)[0])


def _initial_logit(cfg: ModelConfig, caps: list[int]) -> float:
    """The logit at which a head's soft mask attends SWA's pairs at the budget (every head the same, found by
    bisection on the span): the spans start where the budget holds, and the multiplier holds it while they move."""
    spans, n = cfg.learned_spans, cfg.max_seq_len
    target, ramp, room = spans["budget"] * attended_pairs(spans["w"], n), spans["ramp"], min(caps) - spans["ramp"]
    lag = np.arange(n, dtype=np.float64)  # numpy: models are also built on the meta device (mswa.checks counts them)
    low, high = 0.0, float(room)
    for _ in range(60):
        span = (low + high) / 2
        pairs = float((np.clip((span + ramp - lag) / ramp, 0, 1) * (n - lag)).sum())
        low, high = (span, high) if pairs < target else (low, span)
    fraction = min(max(low / room, 1e-4), 1 - 1e-4)
    return math.log(fraction / (1 - fraction))


def _within(real: list[list[float]], caps: list[list[float]], room: float, n: int) -> list[list[int]]:
    """``real`` windows rounded down, scaled by the largest factor (bisection) whose windows' pairs fit ``room``."""

    def floors(scale: float) -> list[list[int]]:
        return [[max(1, min(int(cap), math.floor(scale * r))) for r, cap in zip(row, cap_row)] for row, cap_row in zip(real, caps)]

    def fits(scale: float) -> bool:
        return sum(attended_pairs(w, n) for row in floors(scale) for w in row) <= room

    low, high = 0.0, 1.0
    if not fits(high):
        for _ in range(50):
            low, high = ((low + high) / 2, high) if fits((low + high) / 2) else (low, (low + high) / 2)
    return floors(high if fits(high) else low)


class ParallelHybridAttention(WindowedSelfAttention):
    """Every head runs window attention and causal linear attention over the same values; a learned
    per-head gate mixes the two before the shared output projection. Gating (rather than giving some
    heads to each kind) keeps every head's window from the schedule, so MSWA's head groups mean the
    same in hybrid and plain models; the linear branch adds O(N * feature_dim * head_dim) per head."""

    def __init__(self, cfg: ModelConfig, windows: list[Window]):
        super().__init__(cfg, windows)
        self.feature_map, self.feature_dim = cfg.linear_feature_map, cfg.linear_feature_dim
        self.linear_qk = nn.Linear(cfg.d_model, 2 * cfg.n_head * cfg.linear_feature_dim, bias=False)
        self.gate = nn.Parameter(torch.zeros(cfg.n_head))  # sigmoid(0) = an even mix at the start

    def forward(self, x: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        window_out, v = self.heads(x, cache, start)
        b, n, _ = x.shape
        q, k = self.linear_qk(x).view(b, n, 2, self.n_head, self.feature_dim).permute(2, 0, 3, 1, 4)
        linear_out = cached_linear_attention(q, k, v, cache, feature_map=self.feature_map)
        gate = torch.sigmoid(self.gate).view(1, -1, 1, 1)
        return self.merge(gate * window_out + (1 - gate) * linear_out)


class LinearAttention(nn.Module):
    """Causal linear-attention token mixer: (B, N, d_model) -> (B, N, d_model).

    q and k are projected to n_head x linear_feature_dim (small: the Taylor map squares it), v to n_head x head_dim
    with head_dim = d_model // n_head, as in a softmax attention block. `chunk_size`: the chunked kernel's block."""

    def __init__(self, cfg: ModelConfig, chunk_size: int = 64):
        super().__init__()
        for name, value in (("model.linear_feature_dim", cfg.linear_feature_dim), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int.")
        mapped_feature_dim(cfg.linear_feature_map, cfg.linear_feature_dim)  # refuses an unknown feature map
        self.n_head, self.feature_dim, self.feature_map = cfg.n_head, cfg.linear_feature_dim, cfg.linear_feature_map
        self.chunk_size = chunk_size
        self.qkv_proj = nn.Linear(cfg.d_model, 2 * cfg.n_head * cfg.linear_feature_dim + cfg.d_model, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        """`cache`: a decoding cache (see `cached_linear_attention`); `start` is unused (no positions)."""
        q, k, v = self._project(x)
        y = cached_linear_attention(q, k, v, cache, self.feature_map, self.chunk_size)
        return self.out_proj(y.transpose(1, 2).flatten(2))

    def step(self, x_t: torch.Tensor, state: LinearAttentionState | None = None) -> tuple[torch.Tensor, LinearAttentionState]:
        """Decode one token x_t (B, d_model); returns (y_t (B, d_model), new state). state None starts afresh."""
        q, k, v = (t.squeeze(2) for t in self._project(x_t.unsqueeze(1)))
        y, state = linear_attention_step(q, k, v, state, self.feature_map)
        return self.out_proj(y.flatten(1)), state

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, d_model) -> q, k (B, H, N, feature_dim) and v (B, H, N, head_dim)."""
        qk_width = self.n_head * self.feature_dim
        q, k, v = self.qkv_proj(x).split([qk_width, qk_width, x.shape[-1]], dim=-1)
        return tuple(t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in (q, k, v))


def cached_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache=None, feature_map: str = "elu", chunk_size: int = 64
) -> torch.Tensor:
    """`causal_linear_attention`, continued across calls through `cache.linear_state` when a decoding cache is given
    (`mswa.generate.LayerCache`): tokens are chunked from the running sums, a single token takes the recurrent step."""
    if cache is None:
        return causal_linear_attention(q, k, v, feature_map, chunk_size)
    state = cache.linear_state
    if state is not None and q.shape[-2] == 1:
        out, cache.linear_state = linear_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state, feature_map)
        return out.unsqueeze(-2)
    out = causal_linear_attention(q, k, v, feature_map, chunk_size, state=state)
    cache.linear_state = LinearAttentionState.from_prefix(k, v, feature_map, before=state)
    return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)). `cache` and `start` (the
    position of x's first token) are for decoding; see `mswa.generate`."""

    def __init__(self, cfg: ModelConfig, mixer: nn.Module):
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(cfg.d_model), mixer
        self.norm2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache=None, start: int = 0) -> torch.Tensor:
        x = x + self.dropout(self.mixer(self.norm1(x), cache, start))
        return x + self.dropout(self.mlp(self.norm2(x)))


def make_mixer(cfg: ModelConfig, layer: int) -> nn.Module:
    kind = cfg.layer_mixer(layer)
    if kind == "linear":
        return LinearAttention(cfg)
    mixer_class = ParallelHybridAttention if kind == "parallel" else WindowedSelfAttention
    return mixer_class(cfg, cfg.layer_windows(layer))


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, make_mixer(cfg, i)) for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model)
        if cfg.learned_spans is not None:  # the Lagrange multiplier of the budget, resumed with the run
            self.register_buffer("span_multiplier", torch.zeros(()))
        if cfg.output == "adaptive":  # its own head and tail clusters; not tied to the embedding
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(cfg.d_model, cfg.vocab_size, list(cfg.adaptive_cutoffs), div_value=4.0)
        else:
            self.adaptive = None
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def learned_attention(self) -> list[WindowedSelfAttention]:
        return [block.mixer for block in self.blocks if getattr(block.mixer, "learned", False)]

    def soft_pairs_vs_swa(self) -> torch.Tensor | None:
        """The learned heads' attended pairs under their soft masks at max_seq_len, relative to SWA(w)'s (None: none)."""
        heads, n = self.learned_attention(), self.cfg.max_seq_len
        if not heads:
            return None
        pairs = torch.stack([head.soft_pairs(n) for head in heads]).sum()
        return pairs / (len(heads) * self.cfg.n_head * attended_pairs(self.cfg.learned_spans["w"], n))

    def training_penalty(self) -> tuple[torch.Tensor, dict[str, float]] | None:
        """Learned spans: the augmented Lagrangian of the budget, multiplier x r + penalty / 2 x (r - budget)^2 with r
        the soft attended pairs / SWA(w)'s, after one dual-ascent step of the multiplier (kept >= 0); with what to
        log. The quadratic damps the multiplier's overshoot (spans move at the optimiser's pace). None for a model
        without learned spans."""
        ratio = self.soft_pairs_vs_swa()
        if ratio is None:
            return None
        spans, multiplier = self.cfg.learned_spans, self.span_multiplier
        excess = ratio - spans["budget"]
        multiplier.add_(spans["rate"] * excess.detach()).clamp_(min=0)
        return multiplier * ratio + spans["penalty"] / 2 * excess**2, {
            "train/span_pairs_vs_swa": ratio.item(),
            "train/span_multiplier": multiplier.item(),
        }

    def harden_spans(self) -> list[list[Window]] | None:
        """Every learned span fixed to an integer window: the window whose attended pairs match its soft mask's,
        rounded down (all scaled down alike first if the spans ended above the budget), then up one at a time
        (largest fractions first) while the total stays within the budget: the hardened windows always meet it.
        The window table; None without learned spans."""
        learned, n = self.learned_attention(), self.cfg.max_seq_len
        if not learned:
            return None
        spans = self.cfg.learned_spans
        real = [[window_for_pairs(p, n) for p in m.soft_pairs(n).detach().double().tolist()] for m in learned]
        room = spans["budget"] * len(learned) * self.cfg.n_head * attended_pairs(spans["w"], n)
        hard = _within(real, [m.caps.tolist() for m in learned], room, n)
        room -= sum(attended_pairs(w, n) for row in hard for w in row)
        heads = [(layer, head) for layer, row in enumerate(real) for head in range(len(row))]
        for layer, head in sorted(heads, key=lambda lh: real[lh[0]][lh[1]] - hard[lh[0]][lh[1]], reverse=True):
            window = hard[layer][head]
            extra = attended_pairs(window + 1, n) - attended_pairs(window, n)
            if real[layer][head] > window and window + 1 <= learned[layer].caps[head] and extra <= room:
                hard[layer][head], room = window + 1, room - extra
        for mixer, row in zip(learned, hard):
            mixer.fix_windows(row)
        return [list(block.mixer.windows) if hasattr(block.mixer, "windows") else [None] * self.cfg.n_head for block in self.blocks]

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """Final hidden states (B, N, d_model). With a decoding cache (`mswa.generate.DecodingCache`),
        idx continues the tokens the cache has seen, and the cache takes them in."""
        start, n = (0 if cache is None else cache.seen), idx.shape[1]
        if self.pos_embed is not None and start + n > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + n} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(start, start + n, device=idx.device))
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i], start)
        if cache is not None:
            cache.seen += n
        return self.norm(x)

    def forward(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """Logits (B, N, vocab); for the adaptive head, log-probabilities."""
        h = self.hidden(idx, cache)
        if self.adaptive is not None:
            return self.adaptive.log_prob(h.flatten(0, 1)).view(*idx.shape, -1)
        return F.linear(h, self.embed.weight)

    def token_nll(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Per-token negative log-likelihood (B, N) in fp32; 0 where the target is ``ignore_index``."""
        h = self.hidden(idx)
        valid = targets != ignore_index
        if self.adaptive is None:
            logits = F.linear(h, self.embed.weight).float()
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="none").view_as(targets)
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
        out = self.adaptive(h[valid].float(), targets[valid])
        nll[valid] = -out.output
        return nll
