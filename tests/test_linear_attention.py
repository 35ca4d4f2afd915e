"""Causal linear attention: chunked and recurrent forms against the quadratic reference, stability, memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mswa.attention.linear import (
    FEATURE_MAPS,
    LinearAttentionState,
    causal_linear_attention,
    linear_attention_step,
    mapped_feature_dim,
    quadratic_linear_attention,
)
from mswa.model import LinearAttention, ModelConfig

MAP_NAMES = ["elu", "taylor"]
# (batch, heads, seq, feature_dim, head_dim, chunk_size): seq below, at, just past, and several times the chunk.
SHAPES = [
    (1, 1, 1, 4, 8, 16),
    (2, 3, 13, 4, 8, 16),
    (2, 2, 16, 3, 5, 16),
    (1, 2, 17, 4, 8, 16),
    (2, 1, 100, 6, 4, 32),
    (1, 2, 130, 4, 16, 64),
]


def random_qkv(batch, heads, seq, feature_dim, head_dim, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(batch, heads, seq, feature_dim, generator=generator, dtype=torch.float64)
    k = scale * torch.randn(batch, heads, seq, feature_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, heads, seq, head_dim, generator=generator, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def output_and_grads(attention, q, k, v, **kwargs):
    out = attention(q, k, v, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), (q, k, v))
    return out, grads


@pytest.mark.parametrize("feature_map", MAP_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_chunked_matches_quadratic_reference(feature_map, shape, dtype, tol):
    *sizes, chunk_size = shape
    q, k, v = random_qkv(*sizes, dtype=dtype)
    out, grads = output_and_grads(causal_linear_attention, q, k, v, feature_map=feature_map, chunk_size=chunk_size)
    ref_out, ref_grads = output_and_grads(quadratic_linear_attention, q, k, v, feature_map=feature_map)
    assert out.dtype == dtype and out.shape == v.shape
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=tol, rtol=tol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_quadratic_reference_with_equal_weights_is_running_mean():
    """Pin the reference itself: output 0 is v_0, and with elu+1 and q = k = 0 every weight is 1 (a running mean)."""
    _, _, v = random_qkv(1, 1, 9, 4, 3, dtype=torch.float64)
    zeros = torch.zeros(1, 1, 9, 4, dtype=torch.float64)
    out = quadratic_linear_attention(zeros, zeros, v, "elu")
    running_mean = v.cumsum(-2) / torch.arange(1, 10, dtype=torch.float64).view(9, 1)
    torch.testing.assert_close(out, running_mean)


@pytest.mark.parametrize("feature_map", MAP_NAMES)
def test_taylor_and_elu_kernels(feature_map):
    """Taylor: phi(q).phi(k) = 1 + t + t^2/2 with t = q.k / sqrt(F); elu+1: positive, same size."""
    q, k = torch.randn(2, 5, 6, dtype=torch.float64).unbind(0)
    phi_q, phi_k = FEATURE_MAPS[feature_map](q), FEATURE_MAPS[feature_map](k)
    assert phi_q.shape[-1] == mapped_feature_dim(feature_map, 6)
    if feature_map == "taylor":
        t = (q * k).sum(-1) / 6**0.5
        torch.testing.assert_close((phi_q * phi_k).sum(-1), 1 + t + t**2 / 2)
    else:
        assert (phi_q > 0).all()


@pytest.mark.parametrize("feature_map", MAP_NAMES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_recurrent_matches_chunked_token_by_token(feature_map, dtype, tol):
    q, k, v = random_qkv(2, 3, 37, 4, 6, dtype=dtype)
    chunked = causal_linear_attention(q, k, v, feature_map, chunk_size=8)
    state = None
    for t in range(q.shape[-2]):
        out_t, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, feature_map)
        torch.testing.assert_close(out_t, chunked[:, :, t], atol=tol, rtol=tol, msg=lambda m, t=t: f"token {t}: {m}")


@pytest.mark.parametrize("feature_map", MAP_NAMES)
def test_prefill_state_then_steps_matches_chunked(feature_map):
    q, k, v = random_qkv(1, 2, 30, 4, 5, dtype=torch.float64)
    chunked = causal_linear_attention(q, k, v, feature_map, chunk_size=8)
    state = LinearAttentionState.from_prefix(k[:, :, :20], v[:, :, :20], feature_map)
    for t in range(20, 30):
        out_t, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, feature_map)
        torch.testing.assert_close(out_t, chunked[:, :, t], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("feature_map", MAP_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_input_scale_stays_finite_and_bounded(feature_map, dtype):
    """q, k * 100: weights span hundreds of orders of magnitude (elu+1 underflows to 0), yet outputs and grads stay
    finite, and every output stays within the largest |v| seen so far (it is a weighted mean, scaled down only
    when the denominator is clamped)."""
    q, k, v = random_qkv(2, 2, 150, 4, 8, dtype=dtype, scale=100.0)
    out, grads = output_and_grads(causal_linear_attention, q, k, v, feature_map=feature_map, chunk_size=32)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads)
    running_max = v.detach().float().abs().amax(-1, keepdim=True).cummax(-2).values
    assert (out.float().abs() <= running_max * (1 + 1e-2) + 1e-6).all()


def test_fully_underflowed_weights_give_zero_not_nan():
    """elu+1 of very negative keys is exactly 0 in fp32: the denominator is 0 and the clamp makes the output 0."""
    q = torch.full((1, 1, 5, 2), -200.0)
    k = torch.full((1, 1, 5, 2), -200.0)
    v = torch.randn(1, 1, 5, 3)
    for out in (causal_linear_attention(q, k, v, "elu", chunk_size=2), quadratic_linear_attention(q, k, v, "elu")):
        assert torch.equal(out, torch.zeros_like(out))


def test_low_precision_inputs_accumulate_in_fp32():
    """bf16 in, bf16 out, but sums in fp32: the output is the fp64 result on the same inputs, rounded once."""
    q, k, v = random_qkv(1, 2, 1000, 4, 8, dtype=torch.bfloat16)
    out = causal_linear_attention(q, k, v, "taylor", chunk_size=64)
    assert out.dtype == torch.bfloat16
    exact = quadratic_linear_attention(*(t.double() for t in (q, k, v)), "taylor")
    torch.testing.assert_close(out.double(), exact, atol=1e-3, rtol=2**-8)


def test_autocast_does_not_lower_accumulation_precision():
    q, k, v = random_qkv(1, 2, 300, 4, 8)
    plain = causal_linear_attention(q, k, v, "elu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = causal_linear_attention(q, k, v, "elu")
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, atol=1e-6, rtol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def largest_tensor(attention, seq_len, feature_map):
    """On the meta device: shapes only, no memory, so even an N x N tensor at large N costs nothing."""
    q, k = (torch.empty(1, 2, seq_len, 4, device="meta", requires_grad=True) for _ in range(2))
    v = torch.empty(1, 2, seq_len, 8, device="meta", requires_grad=True)
    with LargestTensor() as probe:
        attention(q, k, v, feature_map=feature_map).sum().backward()
    return probe.numel


@pytest.mark.parametrize("feature_map", MAP_NAMES)
def test_no_tensor_grows_quadratically(feature_map):
    """Doubling N doubles the largest tensor of the chunked form (forward + backward); the probe sees the
    reference's N x N weights quadruple, so it would catch one."""
    chunked = [largest_tensor(causal_linear_attention, n, feature_map) for n in (32768, 65536)]
    reference = [largest_tensor(quadratic_linear_attention, n, feature_map) for n in (32768, 65536)]
    assert chunked[1] == 2 * chunked[0]
    assert reference[1] == 4 * reference[0]
    assert chunked[1] < 65536 * 65536 // 64


def test_long_sequence_runs_on_cpu():
    q, k, v = random_qkv(1, 1, 65536, 4, 8)
    out = causal_linear_attention(q, k, v, "taylor", chunk_size=64)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("feature_map", MAP_NAMES)
def test_module_forward_shape_grads_and_step_decoding(feature_map):
    torch.manual_seed(0)
    config = ModelConfig(d_model=24, n_head=3, linear_feature_dim=4, linear_feature_map=feature_map)
    mixer = LinearAttention(config, chunk_size=8).double()
    x = torch.randn(2, 21, 24, dtype=torch.float64, requires_grad=True)
    y = mixer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())

    state = None
    for t in range(x.shape[1]):
        y_t, state = mixer.step(x[:, t].detach(), state)
        torch.testing.assert_close(y_t, y[:, t].detach(), atol=1e-12, rtol=1e-12)


def test_module_is_causal():
    torch.manual_seed(0)
    mixer = LinearAttention(ModelConfig(d_model=16, n_head=2, linear_feature_map="taylor"), chunk_size=4)
    x = torch.randn(1, 19, 16)
    changed = x.clone()
    changed[:, 11:] = torch.randn(1, 8, 16)
    torch.testing.assert_close(mixer(changed)[:, :11], mixer(x)[:, :11])
    assert not torch.allclose(mixer(changed)[:, 11:], mixer(x)[:, 11:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(feature_map="relu"), "feature_map='relu' is unknown"),
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(k=torch.randn(1, 2, 5, 3)), "q shape"),
        (dict(v=torch.randn(1, 2, 6, 8)), "v shape"),
        (dict(v=torch.randn(1, 2, 5, 8, dtype=torch.float64)), "share one floating dtype"),
        (dict(q=torch.randn(2, 5, 4), k=torch.randn(2, 5, 4)), "must be 4-D"),
        (dict(q=torch.randn(1, 2, 0, 4), k=torch.randn(1, 2, 0, 4), v=torch.randn(1, 2, 0, 8)), "empty"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = dict(q=torch.randn(1, 2, 5, 4), k=torch.randn(1, 2, 5, 4), v=torch.randn(1, 2, 5, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        causal_linear_attention(**args)


def test_step_rejects_state_of_another_feature_map_and_whole_sequences():
    q_t, k_t, v_t = torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 8)
    _, elu_state = linear_attention_step(q_t, k_t, v_t, None, "elu")
    with pytest.raises(ValueError, match="same feature map"):
        linear_attention_step(q_t, k_t, v_t, elu_state, "taylor")
    with pytest.raises(ValueError, match="must be 3-D"):
        linear_attention_step(q_t.unsqueeze(2), k_t.unsqueeze(2), v_t.unsqueeze(2))


@pytest.mark.parametrize(
    "config, chunk_size, message",
    [
        (dict(d_model=30, n_head=4), 64, "not divisible by model.n_head=4"),  # ModelConfig, the one home of the fact
        (dict(linear_feature_map="softmax"), 64, "feature_map='softmax' is unknown"),
        (dict(linear_feature_dim=0), 64, "feature_dim=0"),
        ({}, -1, "chunk_size=-1"),
    ],
)
def test_module_rejects_bad_sizes(config, chunk_size, message):
    with pytest.raises(ValueError, match=message):
        LinearAttention(ModelConfig(**{"d_model": 32, "n_head": 4, "mixer": "linear", **config}), chunk_size=chunk_size)
