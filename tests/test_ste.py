"""Straight-through fake quantization: forward equals quantize-dequantize, gradients pass inside the grid's range and
are zero outside, the scale gradient is the LSQ one, PACT's clip gets its gradient; trainable Linear / Conv1d /
Conv2d modules and a conv net built from config train and export codes + qparams."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qresearch.models.conv import build_convnet
from qresearch.nn.trainable import ActQuantizer, QATModule, WeightQuantizer, unwrap, wrap
from qresearch.quant import QuantSpec, dequantize, quantize
from qresearch.quant.ste import FakeQuantSTE, fake_quant_act, fake_quant_weight, pact_clip, pact_quant


def test_forward_is_quantize_dequantize_and_gradient_is_masked_outside_the_range():
    spec = QuantSpec(bits=3, group_size=4, sym=False)
    x = torch.tensor([[-3.0, -0.4, 0.1, 0.5, 0.9, 1.7, 2.5, 9.0]], requires_grad=True)  # [1, 8] -> 2 groups of 4
    scale = torch.tensor([[0.2, 0.25]])
    zero = torch.tensor([[3.0, 1.0]])
    y = fake_quant_weight(x, spec, scale, zero)
    ref = dequantize(quantize(x.detach(), scale, zero, spec), scale, zero, spec)
    assert torch.equal(y.detach(), ref)
    y.sum().backward()
    # group 0 grid: codes 0..7 -> values (q - 3) * 0.2 in [-0.6, 0.8]; group 1: (q - 1) * 0.25 in [-0.25, 1.5]
    inside = torch.tensor([[0.0, 1, 1, 1, 1, 0, 0, 0]])  # 1.7 / 0.25 + 1 = 7.8 rounds to 8 > 7: clamped
    assert torch.equal(x.grad, inside)


@pytest.mark.parametrize("sym", [False, True])
def test_scale_gradient_is_lsq(sym):
    spec = QuantSpec(bits=4, group_size=8, sym=sym)
    torch.manual_seed(0)
    x = torch.randn(3, 8) * 2
    s = torch.full((3, 1), 0.3, requires_grad=True)
    z = torch.full((3, 1), 8.0 if sym else 7.0)
    y = FakeQuantSTE.apply(x, s, z, spec)
    g = torch.randn_like(y)
    y.backward(g)
    q = torch.round(x / 0.3) + z
    inside = (q >= 0) & (q <= 15)
    xq = (q.clamp(0, 15) - z) * 0.3
    expected = (g * torch.where(inside, torch.round(x / 0.3) - x / 0.3, xq / 0.3)).sum(dim=1, keepdim=True)
    assert torch.allclose(s.grad, expected, atol=1e-5)


def test_pact_clip_gradient_is_plus_one_above_minus_one_below_zero_inside():
    x = torch.tensor([-5.0, -1.0, 0.5, 1.5, 7.0])
    alpha = torch.tensor(2.0, requires_grad=True)
    pact_clip(x, alpha).backward(torch.ones(5))
    assert float(alpha.grad) == 0.0  # +1 (7.0) and -1 (-5.0) cancel; inside elements give 0
    alpha.grad = None
    pact_clip(x, alpha).backward(torch.tensor([1.0, 1, 1, 1, 1]) * torch.tensor([0.0, 1, 1, 1, 1]))
    assert float(alpha.grad) == 1.0  # only x = 7.0 is above


def test_pact_quantizer_clip_receives_gradient_and_exports_a_static_scale():
    spec = QuantSpec(bits=8, sym=True, granularity="tensor")
    aq = ActQuantizer(spec, "pact", init_scale=torch.tensor([[1.0 / 127]]))  # alpha starts at 1.0
    x = torch.tensor([[0.2, -0.3, 2.5, -4.0]], requires_grad=True)
    y = aq(x)
    assert torch.allclose(y.detach()[0, 2:], torch.tensor([1.0, -1.0]))  # clipped to +-alpha
    (y ** 2).sum().backward()
    # y = [.., alpha, -alpha]: d/d alpha (alpha^2 + alpha^2) = 4 alpha = 4, and alpha = alpha_init * rel
    assert float(aq.rel.grad) == pytest.approx(4.0, rel=1e-4)
    assert torch.equal(x.grad[0, 2:], torch.zeros(2)) and (x.grad[0, :2] != 0).all()
    act = aq.act_quant()
    assert act.static_scale.shape == (1, 1) and float(act.static_scale) == pytest.approx(1.0 / 127)
    assert float(aq.l2().detach()) == pytest.approx(1.0)  # (alpha / alpha_init)^2 at the start


def test_pact_quant_matches_static_fake_quant_of_the_clipped_input():
    spec = QuantSpec(bits=4, sym=True, granularity="tensor")
    x = torch.randn(5, 16) * 3
    y = pact_quant(x, torch.tensor(2.0), spec)
    s = torch.tensor([[2.0 / 7]])
    assert torch.allclose(y, fake_quant_act(x.clamp(-2, 2), spec, s), atol=1e-6)


def test_per_token_activation_quant_is_per_row():
    spec = QuantSpec(bits=8, sym=True, granularity="token")
    x = torch.randn(2, 3, 16)
    x[0, 0] *= 100  # one loud token must not change the others' scales
    y = fake_quant_act(x, spec)
    assert torch.allclose(y[1], fake_quant_act(x[1:], spec)[0])


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_qat_module_forward_uses_fake_quantized_weight_and_input(kind):
    torch.manual_seed(0)
    inner = {"linear": nn.Linear(24, 8), "conv1d": nn.Conv1d(6, 8, 3, padding=1),
             "conv2d": nn.Conv2d(6, 8, 3, padding=1)}[kind]
    x = {"linear": torch.randn(4, 24), "conv1d": torch.randn(2, 6, 10), "conv2d": torch.randn(2, 6, 5, 5)}[kind]
    wspec = QuantSpec(bits=4, group_size=6)  # conv weights grouped along in * k
    aspec = QuantSpec(bits=8, sym=True, granularity="token")
    cdim = -1 if kind == "linear" else 1
    m = QATModule(inner, WeightQuantizer(wspec, inner.weight, "learned"), ActQuantizer(aspec, channel_dim=cdim))
    y = m(x)
    wq = m.wq.qtensor(inner.weight).dequantize().reshape(inner.weight.shape)
    xq = fake_quant_act(x.movedim(cdim, -1), aspec).movedim(-1, cdim)
    ref = F.linear(xq, wq, inner.bias) if kind == "linear" else inner._conv_forward(xq, wq, inner.bias)
    assert torch.allclose(y, ref, atol=1e-5)
    y.square().sum().backward()
    assert inner.weight.grad is not None and m.wq.scale_rel.grad is not None and inner.weight.grad.abs().sum() > 0


CONV_NET = [{"type": "conv", "out": 8, "kernel": 3, "padding": 1}, {"type": "bn"}, {"type": "relu"},
            {"type": "conv", "out": 8, "kernel": 3, "padding": 1}, {"type": "relu"}, {"type": "pool"},
            {"type": "flatten"}, {"type": "linear", "out": 4}]


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_net_from_config_trains_with_qat_and_exports_codes(dims):
    torch.manual_seed(0)
    net = build_convnet(CONV_NET, in_channels=3, dims=dims)
    shape = (32, 3, 12) if dims == 1 else (32, 3, 8, 8)
    x, labels = torch.randn(shape), torch.randint(0, 4, (32,))
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    wspec, aspec = QuantSpec(bits=4, group_size=-1, granularity="channel"), QuantSpec(bits=8, sym=True,
                                                                                       granularity="tensor")
    wrapped = wrap(net, names, lambda n, m: WeightQuantizer(wspec, m.weight),
                   lambda n, m: ActQuantizer(aspec, "pact", torch.tensor([[0.05]]),
                                             channel_dim=-1 if isinstance(m, nn.Linear) else 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, m in wrapped.items():
        q = m.wq.qtensor(m.inner.weight)
        assert q.codes.shape == (m.inner.weight.shape[0], m.inner.weight[0].numel()) and q.codes.max() <= 15
        assert m.aq.act_quant().static_scale is not None
    unwrap(net, wrapped)
    assert all(not isinstance(m, QATModule) for m in net.modules())


def test_bad_modes_are_one_line_errors():
    from qresearch.errors import ConfigError

    with pytest.raises(ConfigError, match="mode='lsq'"):
        ActQuantizer(QuantSpec(bits=8, sym=True, granularity="tensor"), "lsq", torch.ones(1, 1))
    with pytest.raises(ConfigError, match="granularity=tensor"):
        ActQuantizer(QuantSpec(bits=8, sym=True, granularity="token"), "pact", torch.ones(1, 1))
    with pytest.raises(ConfigError, match="scale='adaptive'"):
        WeightQuantizer(QuantSpec(bits=4), torch.zeros(4, 4), "adaptive")
    with pytest.raises(ConfigError, match="type='attention'"):
        build_convnet([{"type": "attention"}], 3)
