"""Property tests of the quantization primitives against their definitions."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qresearch.quant import ConfigError, QuantSpec, choose_qparams, dequantize, fake_quantize, quantize, weight_spec
from qresearch.quant.primitives import expand_groups

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def tensors(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    shift = draw(st.sampled_from([0.0, 0.5, -3.0]))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * scale + shift * scale)


specs = st.builds(QuantSpec, bits=st.integers(2, 8), group_size=st.sampled_from([-1, 1, 3, 8, 16, 32, 128]),
                  sym=st.booleans(), granularity=st.sampled_from(["group", "channel", "tensor", "token"]))


def per_element(p, x, spec):
    """qparams broadcast to every element of the 2-D view."""
    x2 = x.reshape(1, -1) if spec.granularity == "tensor" else x.reshape(-1, x.shape[-1])
    return expand_groups(p, spec.group_for(x2.shape[1]), x2.shape[1]).reshape(x.shape)


@SETTINGS
@given(tensors(), specs)
def test_codes_in_range_and_roundtrip_within_half_step(x, spec):
    scale, zero = choose_qparams(x, spec)
    q = quantize(x, scale, zero, spec)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert int(q.min()) >= 0 and int(q.max()) <= 2**spec.bits - 1
    xhat = dequantize(q, scale, zero, spec)
    s = per_element(scale, x, spec)
    z = per_element(zero, x, spec)
    lo, hi = (0 - z) * s, (2**spec.bits - 1 - z) * s  # representable range of each element
    inside = (x >= lo - 1e-6 * s) & (x <= hi + 1e-6 * s)
    err = (x - xhat).abs()
    assert bool((err[inside] <= s[inside] / 2 * (1 + 1e-4) + 1e-7).all()), float((err - s / 2)[inside].max())


@SETTINGS
@given(tensors(), st.integers(2, 8), st.sampled_from([-1, 4, 16, 128]))
def test_asym_maps_zero_exactly(x, bits, g):
    spec = QuantSpec(bits=bits, group_size=g, sym=False, granularity="channel" if g == -1 else "group")
    x = x.clone()
    x[:, 0] = 0.0
    scale, zero = choose_qparams(x, spec)
    xhat = dequantize(quantize(x, scale, zero, spec), scale, zero, spec)
    assert bool((xhat[:, 0] == 0).all())


@SETTINGS
@given(tensors(), st.integers(2, 8))
def test_minmax_covers_range_asym(x, bits):
    """Asym min-max: every value is inside the representable range (no clipping)."""
    spec = QuantSpec(bits=bits, group_size=8)
    scale, zero = choose_qparams(x, spec)
    xhat = dequantize(quantize(x, scale, zero, spec), scale, zero, spec)
    assert float((x - xhat).abs().max()) <= float(scale.max()) / 2 * (1 + 1e-4) + 1e-7


def test_partial_last_group_qparams_match_slice():
    x = torch.randn(3, 172)
    spec = QuantSpec(bits=4, group_size=128)
    scale, zero = choose_qparams(x, spec)
    assert scale.shape == (3, 2)
    tail = QuantSpec(bits=4, group_size=44)
    s_tail, z_tail = choose_qparams(x[:, 128:], tail)
    torch.testing.assert_close(scale[:, 1:], s_tail)
    torch.testing.assert_close(zero[:, 1:], z_tail)


def test_granularity_shapes():
    x = torch.randn(2, 5, 16)  # [batch, tokens, hidden]
    assert choose_qparams(x, QuantSpec(bits=8, granularity="token", sym=True))[0].shape == (10, 1)
    assert choose_qparams(x, QuantSpec(bits=8, granularity="tensor", sym=True))[0].shape == (1, 1)
    w = torch.randn(6, 16)
    assert choose_qparams(w, QuantSpec(bits=4, granularity="channel"))[0].shape == (6, 1)
    assert choose_qparams(w, QuantSpec(bits=4, group_size=4))[0].shape == (6, 4)


def test_sym_codes_are_centred():
    x = torch.tensor([[-1.0, 0.0, 1.0, 0.25]])
    spec = QuantSpec(bits=4, group_size=-1, sym=True, granularity="channel")
    scale, zero = choose_qparams(x, spec)
    assert float(zero) == 8 and math.isclose(float(scale), 1 / 7, rel_tol=1e-6)
    q = quantize(x, scale, zero, spec)
    assert q.tolist() == [[1, 8, 15, 10]]  # 0.25 / (1/7) = 1.75 -> 2 -> 8 + 2


@pytest.mark.parametrize("fmt,fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_matches_torch_cast(fmt, fmax):
    x = torch.randn(4, 64) * 3
    spec = QuantSpec(bits=8, qformat=fmt, granularity="channel")
    scale, _ = choose_qparams(x, spec)
    assert torch.allclose(scale[:, 0], x.abs().amax(1) / fmax)
    dtype = torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2
    ref = (x / scale).to(dtype).float() * scale  # per-row scale, direct cast
    got = fake_quantize(x, spec)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    rel = float((got - x).norm() / x.norm())
    assert 0 < rel < (0.05 if fmt == "fp8_e4m3" else 0.1)


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(3, 32, requires_grad=True)
    y = fake_quantize(x, QuantSpec(bits=3, group_size=8))
    (y * torch.arange(32.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(32.0).expand(3, 32))
    assert not torch.equal(y.detach(), x.detach())


def test_error_shrinks_with_bits():
    w = torch.randn(64, 256)
    errs = [float((fake_quantize(w, QuantSpec(bits=b, group_size=64)) - w).norm()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20


@pytest.mark.parametrize("kw,msg", [(dict(bits=9), "bits=9"), (dict(bits=1), "bits=1"),
                                    (dict(group_size=0), "group_size=0"), (dict(group_size=-2), "group_size=-2"),
                                    (dict(granularity="row"), "granularity='row'"), (dict(qformat="int4"), "format")])
def test_spec_rejects_bad_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        QuantSpec(**kw)


def test_weight_spec_off_and_per_channel():
    assert weight_spec(16) is None
    assert weight_spec(4, -1).granularity == "channel"


def test_scales_divide_truly_where_torch_would_multiply_by_a_reciprocal(monkeypatch):
    """CUDA divides a tensor by a Python number as a multiplication by its reciprocal (one ulp off for 15, 7, 255):
    emulated here on CPU, int and fp8 scales must still equal IEEE division's (what the CPU and reference GPTQ,
    dividing by a device tensor, compute), so GPU runs get the CPU's qparams and codes."""
    from qresearch.quant import quantize_tensor, weight_spec

    true_div = torch.Tensor.__truediv__

    def cuda_like(t, other):
        if isinstance(other, (int, float)) and t.is_floating_point():
            return t * (1.0 / torch.tensor(float(other), dtype=t.dtype))  # the reciprocal in t's precision
        return true_div(t, other)

    g = torch.Generator().manual_seed(3)
    W = torch.randn(256, 512, generator=g) * torch.linspace(0.005, 0.05, 512)
    specs = [weight_spec(4, 128, False), weight_spec(3, 128, True), weight_spec(8, -1, True),
             weight_spec(4, 32, False, scale_bits=8), weight_spec(8, 128, True, "fp8_e4m3")]
    from qresearch.kernels.reference import act_quant_ref

    want = [quantize_tensor(W, s) for s in specs]
    q_want, s_want = act_quant_ref(W[:64] * 40)  # W8A8's per-token activation scales (absmax / 127)
    monkeypatch.setattr(torch.Tensor, "__truediv__", cuda_like)
    q_got, s_got = act_quant_ref(W[:64] * 40)
    assert torch.equal(s_got, s_want) and torch.equal(q_got, q_want)
    assert not torch.equal(W / 15, true_div(W, 15))  # the emulation does differ from division
    for s, w in zip(specs, want):
        got = quantize_tensor(W, s)
        for k in ("codes", "scale", "zero"):
            assert torch.equal(getattr(got, k), getattr(w, k)), (s, k)
