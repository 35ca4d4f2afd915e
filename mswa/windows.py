"""Window schedules: which window every head of every layer gets, and what that costs.

Convention (everywhere in the project): a window of W means query i sees keys j with 0 <= i - j < W,
the query itself plus the W-1 keys before it. That equals Hugging Face ``sliding_window=W`` and
flash-attn ``window_size=(W - 1, 0)``; the MSWA authors' code calls the same window ``W - 1``.

A schedule splits heads into G contiguous groups and layers into G' contiguous groups (shallow to
deep); head h of layer l gets ``max(1, round(w * layer_ratios[group(l)] * head_ratios[group(h)]))``.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

Window = int | None  # None = full causal attention

# rule (a schedule's `kind`) -> (head ratios, layer ratios shallow->deep, source)
NAMED_RATIOS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "uniform": ((1.0,), (1.0,), "SWA baseline"),
    "mswa": ((0.25, 0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0), "paper's text: windows w/4..2w"),
    "mswa_official": ((2.0, 1.0, 0.5, 0.5), (0.5, 0.5, 1.0, 2.0), "authors' released fine-tuning code"),
    "mswa_h": ((0.25, 0.5, 1.0, 2.0), (1.0,), "ablation: heads only"),
    "mswa_l": ((1.0,), (0.25, 0.5, 1.0, 2.0), "ablation: layers only"),
    "learned": ((4.0,), (1.0,), "learned spans (adaptive-span style) under a budget; the ratios give each head's cap"),
}
SCHEDULES = (*NAMED_RATIOS, "custom", "full")


class ScheduleError(ValueError):
    """A window schedule that cannot be built; the message names the key, the value and the fix."""


def attended_pairs(window: Window, seq_len: int) -> int:
    """Query-key pairs one head attends to over a causal sequence of ``seq_len`` tokens."""
    full = seq_len * (seq_len + 1) // 2
    if window is None or window >= seq_len:
        return full
    return window * seq_len - window * (window - 1) // 2


@dataclass(frozen=True)
class WindowSchedule:
    name: str  # the schedule file's name (conf/window_schedule/<name>.yaml), or its rule
    w: int | None  # base window; None for full attention
    windows: tuple[tuple[Window, ...], ...]  # [layer][head]

    @property
    def n_layer(self) -> int:
        return len(self.windows)

    @property
    def n_head(self) -> int:
        return len(self.windows[0])

    @property
    def is_full(self) -> bool:
        return all(win is None for layer in self.windows for win in layer)

    def as_lists(self) -> list[list[Window]]:
        return [list(layer) for layer in self.windows]

    def mean_window_over_w(self) -> float | None:
        """Mean window / w over all heads; None when a head has full attention or there is no base window."""
        flat = [win for layer in self.windows for win in layer]
        if self.w is None or any(win is None for win in flat):
            return None
        return sum(flat) / len(flat) / self.w

    def budget(self, seq_len: int) -> dict:
        """Attended query-key pairs at ``seq_len``, absolute and relative to SWA(w) and to full attention."""
        pairs = sum(attended_pairs(win, seq_len) for layer in self.windows for win in layer)
        heads = self.n_layer * self.n_head
        swa = heads * attended_pairs(self.w, seq_len) if self.w is not None else None
        return {
            "seq_len": seq_len,
            "mean_window_over_w": self.mean_window_over_w(),
            "attended_pairs": pairs,
            "pairs_vs_swa": pairs / swa if swa else None,
            "pairs_vs_full": pairs / (heads * attended_pairs(None, seq_len)),
        }

    def describe(self, seq_len: int | None = None) -> str:
        """A layer x head table of windows, plus the budget line."""
        cells = [["full" if win is None else str(win) for win in layer] for layer in self.windows]
        width = max(4, *(len(c) for row in cells for c in row))
        header = "layer | " + " ".join(f"h{h}".rjust(width) for h in range(self.n_head))
        lines = [f"window schedule {self.name!r} (w={self.w})", header, "-" * len(header)]
        lines += [f"{layer:5d} | " + " ".join(c.rjust(width) for c in row) for layer, row in enumerate(cells)]
        ratio = self.mean_window_over_w()
        if ratio is not None:
            lines.append(f"mean window / w = {ratio:.4f}")
        if seq_len is not None:
            b = self.budget(seq_len)
            vs_swa = f"{b['pairs_vs_swa']:.4f} x SWA(w), " if b["pairs_vs_swa"] is not None else ""
            lines.append(f"attended pairs at N={seq_len}: {b['attended_pairs']:,} ({vs_swa}{b['pairs_vs_full']:.4f} x full)")
        return "\n".join(lines)


def _check_ratios(key: str, ratios: Sequence[float], count: int, what: str) -> tuple[float, ...]:
    ratios = tuple(float(r) for r in ratios)
    if not ratios:
        raise ScheduleError(f"window_schedule.{key} is empty; give at least one ratio, e.g. [1.0]")
    if any(not math.isfinite(r) or r <= 0 for r in ratios):
        raise ScheduleError(f"window_schedule.{key}={list(ratios)} has a non-positive ratio; every ratio must be > 0")
    if count % len(ratios):
        raise ScheduleError(
            f"window_schedule.{key} has {len(ratios)} groups but {count} {what} cannot be split into "
            f"{len(ratios)} equal contiguous groups; use a group count that divides {count}"
        )
    return ratios


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _custom_windows(windows, n_layer: int, n_head: int) -> tuple[tuple[Window, ...], ...]:
    if windows is None:
        raise ScheduleError("window_schedule.windows is required for the 'custom' schedule: a per-layer list of per-head windows")
    rows = [list(layer) if isinstance(layer, Sequence) and not isinstance(layer, str) else None for layer in windows]
    if len(rows) != n_layer or any(r is None or len(r) != n_head for r in rows):
        shape = [len(r) if r is not None else "?" for r in rows]
        raise ScheduleError(
            f"window_schedule.windows must be {n_layer} layers x {n_head} heads, got {len(rows)} layers with "
            f"{shape} heads; give one list of {n_head} windows per layer"
        )
    for layer, row in enumerate(rows):
        for head, win in enumerate(row):
            if win is not None and (isinstance(win, bool) or not isinstance(win, int) or win < 1):
                raise ScheduleError(f"window_schedule.windows[{layer}][{head}]={win!r} is not a window; use an integer >= 1 or null (full)")
    return tuple(tuple(row) for row in rows)


def make_schedule(
    kind: str,
    *,
    w: int | None,
    n_layer: int,
    n_head: int,
    head_ratios: Sequence[float] | None = None,
    layer_ratios: Sequence[float] | None = None,
    windows: Sequence[Sequence[Window]] | None = None,
    name: str | None = None,
) -> WindowSchedule:
    """Build a schedule by its rule ``kind`` (one of SCHEDULES); ``head_ratios``/``layer_ratios`` override a
    rule's ratios. ``name`` (default: the rule) is what the schedule is called, its file's name."""
    if n_layer < 1 or n_head < 1:
        raise ScheduleError(f"model needs n_layer >= 1 and n_head >= 1, got n_layer={n_layer}, n_head={n_head}")
    name = name or kind
    if kind == "full":
        return WindowSchedule(name, None, tuple((None,) * n_head for _ in range(n_layer)))
    if kind == "custom":
        return WindowSchedule(name, w, _custom_windows(windows, n_layer, n_head))
    if kind not in NAMED_RATIOS:
        raise ScheduleError(f"window_schedule.kind={kind!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ScheduleError(f"window={w!r} is not a valid base window; set window to an integer >= 1")
    default_heads, default_layers, _ = NAMED_RATIOS[kind]
    heads = _check_ratios("head_ratios", head_ratios if head_ratios is not None else default_heads, n_head, "heads")
    layers = _check_ratios("layer_ratios", layer_ratios if layer_ratios is not None else default_layers, n_layer, "layers")
    per_head_group, per_layer_group = n_head // len(heads), n_layer // len(layers)
    table = tuple(
        tuple(max(1, _round_half_up(w * layers[layer // per_layer_group] * heads[head // per_head_group])) for head in range(n_head))
        for layer in range(n_layer)
    )
    return WindowSchedule(name, w, table)


# ----------------------------------------------------------------------------- window values


def validate_windows(windows, n_head: int, *, key: str = "windows") -> tuple[Window, ...]:
    """Check a per-head window list (ints >= 1 or None) and return it as a tuple of ints/None.

    `key` names the list in messages (e.g. "model.windows[2]" for a layer of a table)."""
    if isinstance(windows, (str, bytes)) or not hasattr(windows, "__len__"):
        raise ValueError(f"{key}={windows!r}: give a list with one window per head (ints >= 1, None = full causal).")
    if len(windows) != n_head:
        raise ValueError(f"{key} has {len(windows)} entries but there are {n_head} heads: give one window per head.")
    return tuple(_check_window(f"{key}[{head}]", window) for head, window in enumerate(windows))


def validate_window_table(table, n_layer: int, n_head: int, *, key: str = "windows") -> tuple[tuple[Window, ...], ...]:
    """Check a per-layer list of per-head windows (n_layer x n_head) and return it as tuples."""

    def is_list(value) -> bool:
        return hasattr(value, "__len__") and not isinstance(value, (str, bytes))

    if not is_list(table) or len(table) != n_layer or any(not is_list(row) or len(row) != n_head for row in table):
        raise ValueError(f"{key} must be {n_layer} layers x {n_head} heads; give one list of {n_head} windows per layer.")
    return tuple(validate_windows(row, n_head, key=f"{key}[{layer}]") for layer, row in enumerate(table))


def fraction_to_tokens(fraction: float, seq_len: int | None, *, key: str = "window_fraction") -> int:
    """A window given as a fraction of the sequence length, in tokens (the MSWA authors' way: 0.25 x 4096 = 1024)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"{key}={fraction}: a fraction of seq_len must be in (0, 1]; give longer windows in tokens (an int).")
    if seq_len is None or seq_len < 1:
        raise ValueError(f"{key}={fraction} is a fraction of the sequence length: pass seq_len=<tokens> too.")
    return max(1, round(fraction * seq_len))


def _check_window(key: str, window) -> Window:
    if window is None:
        return None
    if isinstance(window, bool) or not hasattr(type(window), "__index__"):
        raise ValueError(f"{key}={window!r}: a window must be an int >= 1 or None (full causal).")
    value = operator.index(window)
    if value < 1:
        raise ValueError(f"{key}={value}: a window must be >= 1 (1 = the query itself only).")
    return value


def custom_schedule_yaml(name: str, windows: Sequence[Sequence[Window]], header: Sequence[str]) -> str:
    """A conf/window_schedule file of kind ``custom`` holding ``windows`` ([layer][head]), ``header`` as comments."""
    rows = "\n".join("  - [" + ", ".join("null" if w is None else str(w) for w in layer) + "]" for layer in windows)
    comments = "\n".join(f"# {line}".rstrip() for line in header)
    return f"{comments}\nname: {name}\nkind: custom\nhead_ratios: null\nlayer_ratios: null\nwindows:\n{rows}\n"


def window_for_pairs(pairs: float, seq_len: int) -> float:
    """The real window W whose attended pairs W * N - W (W - 1) / 2 equal ``pairs`` (the inverse of attended_pairs)."""
    b = 2 * seq_len + 1
    return (b - math.sqrt(max(0.0, b * b - 8 * pairs))) / 2


def mswa_budget(w: int, n_layer: int, n_head: int, seq_len: int) -> float:
    """mswa's attended pairs relative to SWA at w (0.850 at w=64, N=1024): the budget data-chosen windows get."""
    return make_schedule("mswa", w=w, n_layer=n_layer, n_head=n_head).budget(seq_len)["pairs_vs_swa"]


def corpus_label(name: str) -> str:
    """A corpus name as it goes in a schedule's name (searched_<label>, learned_<label>): kernel_docs for kernel-docs.txt."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name.rsplit(".", 1)[0] if "." in name else name).strip("_").lower() or "corpus"
