"""RTN with activation quantization: dynamic per-token equals the primitive; static uses the observer's scale."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from methods.rtn import RTN
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.nn.fake import FakeQuantLinear
from qresearch.nn.swap import swap_linears
from qresearch.quant import ConfigError, QuantSpec, fake_quantize


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ctx(model, calib=None):
    return Context(calib=calib, arch=arch_for(model), device=torch.device("cpu"))


def test_dynamic_per_token_matches_primitive(model):
    res = RTN(bits=8, group_size=-1, sym=True, act_bits=4, act_granularity="token").quantize(model, ctx(model))
    name = "model.layers.0.mlp.down_proj"
    lin = model.get_submodule(name)
    w = lin.weight.detach().clone()
    swap_linears(model, res, "fake")
    mod = model.get_submodule(name)
    assert isinstance(mod, FakeQuantLinear) and "act=a4tok-dynamic" in mod.extra_repr()
    x = torch.randn(2, 5, 48)
    xq = fake_quantize(x, QuantSpec(bits=4, sym=True, granularity="token"))
    ref = xq @ res.layers[name].weight.dequantize().T
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mod(x), x @ w.T, atol=1e-3)  # activations really are quantized


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "kl"])
def test_static_scale_from_observer(model, observer):
    calib = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    m = RTN(bits=8, group_size=-1, sym=True, act_bits=8, act_granularity="tensor", act_static=True,
            act_observer=observer)
    assert m.needs_calibration
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    res = m.quantize(model, ctx(model, calib))
    h.remove()
    scale = float(res.layers[name].act.static_scale)
    absmax = float(torch.cat([s.flatten() for s in seen]).abs().max())
    assert scale > 0
    if observer == "minmax":
        assert scale == pytest.approx(absmax / 127, rel=1e-6)
    else:
        assert scale <= absmax / 127 * 1.001  # clipping observers never widen the range


def test_act_config_errors():
    with pytest.raises(ConfigError, match="act_granularity='channel'"):
        RTN(act_bits=8, act_granularity="channel")
    with pytest.raises(ConfigError, match="act_static=true"):
        RTN(act_bits=8, act_granularity="token", act_static=True)
    with pytest.raises(ConfigError, match="act_observer='max'"):
        RTN(act_bits=8, act_granularity="tensor", act_static=True, act_observer="max")
    with pytest.raises(ConfigError, match="bits=16"):
        RTN(bits=16, act_bits=8)
