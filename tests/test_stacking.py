"""Method configs build the right steps; awq_gptq stacks: GPTQ rounds the AWQ-scaled weights and its layers win."""
import pytest
import torch

from methods.awq import AWQ
from methods.gptq import GPTQ
from qresearch.config import plan
from qresearch.method import Context
from qresearch.records import QuantResult
from qresearch.models.arch import arch_for
from qresearch.quant.spec import ConfigError
from tests.helpers import compose_cfg
from tests.pipeline_helpers import tiny_model


@pytest.mark.parametrize("method,types,tag", [
    ("gptq", [GPTQ], "gptq-w3g128"), ("awq", [AWQ], "awq-w3g128"), ("awq_gptq", [AWQ, GPTQ], "awq_gptq-w3g128-prior")])
def test_method_configs(method, types, tag):
    p = plan(compose_cfg([f"method={method}", "model=stories260k", "bits=3", "logger=none"]))
    assert [type(s) for s in p.steps] == types and p.needs_calibration and p.tag == tag


def test_gptq_variant_tags_and_flags():
    p = plan(compose_cfg(["method=gptq", "model=stories260k", "logger=none", "method.gptq.act_order=true",
                          "method.gptq.static_groups=true", "method.gptq.true_sequential=false"]))
    s = p.steps[0]
    assert (s.act_order, s.static_groups, s.true_sequential) == (True, True, False)
    assert p.tag == "gptq-w4g128-ao-sg-nts"


def test_bad_engine_option_is_one_line_config_error():
    with pytest.raises(ConfigError, match="propagate='sideways'"):
        plan(compose_cfg(["method=gptq", "model=stories260k", "logger=none", "method.gptq.propagate=sideways"]))


def test_awq_then_gptq_stack():
    model, ids = tiny_model("llama_mha"), torch.randint(0, 128, (4, 32))
    arch = arch_for(model)
    ctx = Context(calib=ids, arch=arch, device=torch.device("cpu"))
    w0 = model.model.layers[0].self_attn.q_proj.weight.clone()
    first = AWQ(bits=3, group_size=32, clip=False, search_samples=2).quantize(model, ctx)
    scaled = model.model.layers[0].self_attn.q_proj.weight.clone()
    assert not torch.allclose(scaled, w0)  # AWQ folded its scales into the model
    second = GPTQ(bits=3, group_size=32).quantize(model, Context(calib=ids, arch=arch, device=ctx.device,
                                                                 prior=first))
    merged = QuantResult().merge(first).merge(second)
    name = "model.layers.0.self_attn.q_proj"
    assert merged.layers[name] is second.layers[name] and "gptq_loss" in merged.layers[name].stats
    deq = merged.layers[name].weight.dequantize()
    # GPTQ quantized the scaled weights, not the original ones
    assert (deq - scaled).norm() < (deq - w0).norm()
    assert len(merged.stats) == len(first.stats) + len(second.stats)


def test_awq_clip_then_gptq_keeps_awq_grid():
    """method=awq_gptq default: GPTQ rounds on AWQ's clipped per-group grid (qparams=prior)."""
    model, ids = tiny_model("llama_mha"), torch.randint(0, 128, (4, 32))
    arch = arch_for(model)
    ctx = Context(calib=ids, arch=arch, device=torch.device("cpu"))
    first = AWQ(bits=3, group_size=32, clip=True, search_samples=2).quantize(model, ctx)
    second = GPTQ(bits=3, group_size=32, qparams="prior").quantize(
        model, Context(calib=ids, arch=arch, device=ctx.device, prior=first))
    assert any(r.stats["clipped"] for r in first.layers.values())
    for name, r in second.layers.items():
        assert torch.equal(r.weight.scale, first.layers[name].weight.scale), name
        assert torch.equal(r.weight.zero, first.layers[name].weight.zero), name


def test_awq_gptq_config_passes_options():
    p = plan(compose_cfg(["method=awq_gptq", "model=stories260k", "logger=none", "method.awq.clip=false",
                          "method.gptq.qparams=minmax"]))
    assert (p.steps[0].clip, p.steps[1].qparams) == (False, "minmax")
    assert p.tag == "awq_gptq-w4g128-noclip"
