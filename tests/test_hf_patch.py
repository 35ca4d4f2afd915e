"""MSWA patched into tiny Hugging Face Llama-family models (random weights, local tokenizer, offline).

References are independent of the patch: the unpatched model, transformers' own Mistral sliding
window, and a plain eager attention with an explicit per-head window mask (tests/helpers/hf.py)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, MistralForCausalLM  # noqa: E402

from helpers.hf import VOCAB, N, greedy_generate, logits, reference_logits, tokens  # noqa: E402
from mswa.hf import apply_window_attention, patched_windows, remove_window_attention, resolve_windows, window_cache  # noqa: E402
from mswa.hf.tiny import tiny_config, tiny_model, tiny_tokenizer  # noqa: E402

MIXED = [[3, 8, 1, None], [16, 2, 5, 40]]  # 2 layers x 4 heads (2 kv heads), different per head and per layer


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def greedy_without_cache(model, prompt, steps):
    """Next-token logits and tokens by re-running the whole sequence every step (no KV cache)."""
    seq, step_logits = prompt, []
    for _ in range(steps):
        last = logits(model, seq, use_cache=False)[:, -1]
        step_logits.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(step_logits, dim=1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_windows_at_least_the_sequence_equal_the_unpatched_model(family):
    model = tiny_model(family, vocab_size=VOCAB)
    ids, prompt = tokens(), tokens(1, 12)
    expected = logits(model, ids)
    expected_tokens = greedy_generate(model, prompt, 8)[0]
    with apply_window_attention(model, [[N, None, 2 * N, N]] * 2):
        assert model.config._attn_implementation == "mswa"
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
        assert torch.equal(greedy_generate(model, prompt, 8)[0], expected_tokens)


@pytest.mark.parametrize("backend", ["dense", "blocked"])
@pytest.mark.parametrize("window", [1, 6, 17])
def test_uniform_window_equals_transformers_mistral_sliding_window(window, backend):
    llama = tiny_model("llama", vocab_size=VOCAB)
    ids = tokens()
    apply_window_attention(llama, window, backend=backend)
    llama_out = llama(ids).logits
    llama_out.square().mean().backward()
    for implementation in ("eager", "sdpa"):
        mistral = MistralForCausalLM(tiny_config("mistral", vocab_size=VOCAB, sliding_window=window)).eval()
        mistral.set_attn_implementation(implementation)
        mistral.load_state_dict(llama.state_dict())
        mistral_out = mistral(ids).logits
        torch.testing.assert_close(llama_out, mistral_out, rtol=0, atol=1e-5)
        mistral_out.square().mean().backward()
        for (name, p_llama), p_mistral in zip(llama.named_parameters(), mistral.parameters()):
            torch.testing.assert_close(p_llama.grad, p_mistral.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_mixed_per_head_per_layer_windows_match_a_reference(backend):
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = tokens()
    expected = reference_logits(model, MIXED, ids)
    with apply_window_attention(model, MIXED, backend=backend):
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model, ids), expected, atol=1e-3)  # the windows did change the model


@pytest.mark.parametrize("rolling", [False, True])
def test_cached_generation_sees_only_the_window(rolling):
    model = tiny_model("llama", vocab_size=VOCAB)
    apply_window_attention(model, MIXED)
    prompt, steps = tokens(1, 24), 12
    expected_tokens, expected_logits = greedy_without_cache(model, prompt, steps)
    cache = window_cache(model) if rolling else None
    got_tokens, got_logits = greedy_generate(model, prompt, steps, cache=cache)
    torch.testing.assert_close(got_logits, expected_logits, rtol=0, atol=1e-5)
    assert torch.equal(got_tokens, expected_tokens)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = tiny_model("llama", vocab_size=VOCAB)
    apply_window_attention(model, MIXED)
    short, long = tokens(1, 9), tokens(1, 20)
    batch = torch.full((2, 20), 2)
    batch[0, -9:], batch[1] = short[0], long[0]
    mask = (torch.arange(20) >= 11).long()[None].repeat(2, 1)
    mask[1] = 1
    steps = 8
    got_tokens, got_logits = greedy_generate(model, batch, steps, attention_mask=mask)
    for row, prompt in enumerate([short, long]):
        alone_tokens, alone_logits = greedy_without_cache(model, prompt, steps)
        torch.testing.assert_close(got_logits[row], alone_logits[0], rtol=0, atol=1e-4)
        assert torch.equal(got_tokens[row, -steps:], alone_tokens[0, -steps:])


def test_patched_mistral_drops_its_own_sliding_window_and_remove_restores_it():
    model = tiny_model("mistral", vocab_size=VOCAB, sliding_window=4)
    ids, prompt = tokens(), tokens(1, 16)
    original = logits(model, ids)
    handle = apply_window_attention(model, None)
    full = reference_logits(model, [[None] * 4] * 2, ids)
    torch.testing.assert_close(logits(model, ids), full, rtol=0, atol=1e-5)
    expected_tokens, expected_logits = greedy_without_cache(model, prompt, 6)
    got_tokens, got_logits = greedy_generate(model, prompt, 6)  # the default cache must not forget keys
    torch.testing.assert_close(got_logits, expected_logits, rtol=0, atol=1e-5)
    handle.remove()
    assert model.config.sliding_window == 4 and model.config._attn_implementation == "sdpa"
    assert patched_windows(model) is None
    torch.testing.assert_close(logits(model, ids), original, rtol=0, atol=0)


def test_remove_restores_the_original_logits_and_reapply_replaces_windows():
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = tokens()
    original = logits(model, ids)
    apply_window_attention(model, 4)
    apply_window_attention(model, MIXED)  # replaces the windows; remove still goes back to the original
    assert patched_windows(model) == tuple(tuple(layer) for layer in MIXED)
    torch.testing.assert_close(logits(model, ids), reference_logits(model, MIXED, ids), rtol=0, atol=1e-5)
    remove_window_attention(model)
    torch.testing.assert_close(logits(model, ids), original, rtol=0, atol=0)
    assert not any(hasattr(layer.self_attn, "mswa_windows") for layer in model.model.layers)
    with pytest.raises(ValueError, match="no window attention to remove"):
        remove_window_attention(model)


def test_lora_wrapped_model_trains_through_window_attention():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", vocab_size=VOCAB)
    ids = tokens()
    expected = reference_logits(model, MIXED, ids)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    apply_window_attention(lora, MIXED)
    out = lora(input_ids=ids).logits
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)  # LoRA starts as the identity update
    out.square().mean().backward()
    lora_grads = [p.grad for name, p in lora.named_parameters() if "lora_" in name]
    assert lora_grads and all(g is not None for g in lora_grads) and any(g.abs().sum() > 0 for g in lora_grads)


def test_fractions_of_the_sequence_length_become_tokens():
    assert resolve_windows(0.25, 2, 2, seq_len=4096) == ((1024, 1024), (1024, 1024))
    assert resolve_windows([[0.5, 1.0], [64, None]], 2, 2, seq_len=100) == ((50, 100), (64, None))
    assert resolve_windows([[0.001, 3], [1, 2]], 2, 2, seq_len=100)[0][0] == 1


@pytest.mark.parametrize(
    "windows, kwargs, match",
    [
        ([[4, 4]], {}, "2 layers x 4 heads"),
        ([[4, 4, 4, 0], [4] * 4], {}, r"windows\[0\]\[3\]=0"),
        (0.5, {}, "pass seq_len"),
        (1.5, {"seq_len": 10}, r"in \(0, 1\]"),
        ([[True] * 4] * 2, {}, r"windows\[0\]\[0\]=True"),
        (4, {"backend": "fast"}, "backend='fast' is unknown"),
    ],
)
def test_bad_windows_are_refused_before_patching(windows, kwargs, match):
    model = tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match=match):
        apply_window_attention(model, windows, **kwargs)
    assert patched_windows(model) is None and model.config._attn_implementation == "sdpa"


def test_unsupported_setups_fail_clearly():
    model = tiny_model("llama", vocab_size=VOCAB, attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        apply_window_attention(model, 4)
    model = tiny_model("llama", vocab_size=VOCAB)
    apply_window_attention(model, 4)
    packed_positions = torch.cat([torch.arange(20), torch.arange(20)])[None]
    with pytest.raises(ValueError, match="packed sequences"):
        model(tokens(1, 40), position_ids=packed_positions, use_cache=False)
    with pytest.raises(ValueError, match="static cache is not supported"):
        model.generate(tokens(1, 10), max_new_tokens=2, cache_implementation="static", pad_token_id=2)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="Llama-family"):
        apply_window_attention(gpt2, 4)


def test_tiny_tokenizer_round_trips_text_offline():
    tokenizer = tiny_tokenizer()
    text = "Where does the milk stay cold? Zebra!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)


def test_memory_bench_runs_and_reports_every_row(capsys, tmp_path):
    from mswa.bench.cli import main as bench

    rows = bench(
        [
            "hf",
            "--lengths",
            "64",
            "96",
            "--cases",
            "sdpa",
            "mswa-blocked",
            "--window",
            "16",
            "--repeats",
            "1",
            "--output",
            str(tmp_path / "hf.json"),
        ]
    )
    assert [(row["case"], row["n"]) for row in rows] == [("sdpa", 64), ("sdpa", 96), ("mswa-blocked", 64), ("mswa-blocked", 96)]
    assert all(row["peak_mb"] >= 0 and row["time_s"] > 0 for row in rows)
    assert "mswa-blocked" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf.json").read_text())["rows"] == rows
