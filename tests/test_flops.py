"""Model FLOPs per token (mswa.flops) against counts made here another way: torch's FLOP counter for the
projections, and a walk over every position of every head for attention."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mswa.flops import decoding_flops_per_token, forward_flops_per_token, machine_matmul_rate, matmul_flops_per_s, training_flops_per_token
from mswa.model import LanguageModel, ModelConfig
from mswa.progress import shown_metrics

N, HEADS, D_MODEL = 24, 4, 32
WINDOWS = {  # windows below, at and above N, W = 1, and full heads beside windowed ones
    "full": None,
    "mswa-like": [[1, 3, 8, None], [5, 5, 5, 5], [2, 4, 100, None]],
}


def attention_flops_walk(windows, n, head_dim):
    """4 x head_dim per key a query attends to: position i of a head with window W sees min(i + 1, W) keys."""
    total = 0
    for layer in windows:
        for window in layer:
            total += sum(4 * head_dim * min(i + 1, n if window is None else window) for i in range(n))
    return total


@pytest.mark.parametrize("name", WINDOWS)
def test_forward_flops_per_token_match_a_flop_counter_and_a_walk_over_positions(name):
    windows = WINDOWS[name]
    cfg = ModelConfig(vocab_size=40, n_layer=3, n_head=HEADS, d_model=D_MODEL, max_seq_len=N, windows=windows)
    model = LanguageModel(cfg).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, 40, (2, N)))
    counts = counter.get_flop_counts()["Global"]
    products = sum(count for op, count in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))  # the linears
    flops = forward_flops_per_token(cfg, N)
    assert flops["dense"] == products / (2 * N)
    layer_windows = windows or [[None] * HEADS] * 3
    assert flops["attention"] == pytest.approx(attention_flops_walk(layer_windows, N, D_MODEL // HEADS) / N, rel=1e-12)
    assert training_flops_per_token(cfg, N) == 3 * flops["total"]


@pytest.mark.parametrize("seen", [0, 2, 7, 20])
def test_a_decoding_step_counts_its_linears_and_the_keys_its_heads_see(seen):
    from mswa.generate import DecodingCache

    windows = WINDOWS["mswa-like"]
    cfg = ModelConfig(vocab_size=40, n_layer=3, n_head=HEADS, d_model=D_MODEL, max_seq_len=N, windows=windows)
    model = LanguageModel(cfg).eval()
    cache = DecodingCache(model)
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        if seen:
            model(torch.randint(0, 40, (1, seen)), cache)
        with counter:
            model(torch.randint(0, 40, (1, 1)), cache)
    counts = counter.get_flop_counts()["Global"]
    products = sum(count for op, count in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))
    keys = sum(min(seen + 1, seen + 1 if w is None else w) for layer in windows for w in layer)
    assert decoding_flops_per_token(cfg, seen) == pytest.approx(products + 4 * (D_MODEL // HEADS) * keys, rel=1e-12)


def test_windows_cut_attention_flops_to_their_pairs():
    shape = dict(vocab_size=256, n_layer=1, n_head=2, d_model=64, max_seq_len=4096)
    full = forward_flops_per_token(ModelConfig(**shape), 4096)["attention"]
    windowed = forward_flops_per_token(ModelConfig(windows=[[128, 128]], **shape), 4096)["attention"]
    assert windowed / full == pytest.approx((128 * 4096 - 128 * 127 / 2) / (4096 * 4097 / 2), rel=1e-12)


def test_matmul_rate_is_measured_and_mfu_is_shown_as_a_percentage():
    assert matmul_flops_per_s(torch.device("cpu"), torch.float32, 128) > 1e6
    cpu = torch.device("cpu")
    machine_matmul_rate(cpu)
    cached = matmul_flops_per_s.cache_info()
    assert machine_matmul_rate(cpu, again=True) > 1e6  # measured anew (the end-of-training reading), not looked up
    assert matmul_flops_per_s.cache_info()[:2] == cached[:2]
    assert shown_metrics({"perf/tokens_per_s": 1234.0, "perf/mfu": 0.1234}) == "1,234 tokens/s, MFU 12.3%"
