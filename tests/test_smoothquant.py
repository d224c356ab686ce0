"""SmoothQuant: the scale formula, smoothing leaves every table architecture's FP outputs unchanged, non-exact folds
(post-LN OPT) are refused, O3's static scale is the smoothed input's max, stacking keeps the activations, the alpha
search, and bad input as one-line errors before the model loads."""
import copy

import pytest
import torch

from methods.gptq import GPTQ
from methods.smoothquant import SmoothQuant, smooth_scales
from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.records import QuantResult

from .conftest import DATA
from .helpers import compose_cfg
from .pipeline_helpers import TINY, tiny_model


def _ctx(model, n=4, seq=24, seed=0):
    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))
    return Context(calib=ids, arch=arch_for(model), device=torch.device("cpu"))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_smooth_scales_formula():
    x = torch.tensor([4.0, 0.25, 0.0, 9.0])
    w1, w2 = torch.tensor([[0.5, -2.0, 1.0, 0.1]]), torch.tensor([[-1.0, 0.5, 0.2, 0.3]])
    s = smooth_scales(x, [w1, w2], alpha=0.5)
    wmax = torch.tensor([1.0, 2.0, 1.0, 0.3])
    expect = (x.sqrt() / wmax.sqrt())
    expect[2] = 1.0  # a channel that never fired is left alone
    torch.testing.assert_close(s, expect)
    torch.testing.assert_close(smooth_scales(x, [w1], 1.0)[[0, 1, 3]], x[[0, 1, 3]])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_smoothing_keeps_fp_outputs(kind):
    model = tiny_model(kind)
    ctx = _ctx(model)
    ref = _logits(model, ctx.calib)
    sq = SmoothQuant(pairs="all", alpha=0.8)
    res = sq.quantize(model, ctx)
    assert res.info["folds_applied"] >= 2 * 2 and res.info["folds_refused"] == 0, res.info["folds"]
    torch.testing.assert_close(_logits(model, ctx.calib), ref, rtol=1e-4, atol=1e-4)
    moved = [r.stats for r in res.layers.values() if r.stats["smoothed"]]
    assert moved and all(s["x_absmax_after"] != s["x_absmax_before"] for s in moved)


def test_post_ln_norm_pairs_are_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               ffn_dim=96, word_embed_proj_dim=64, max_position_embeddings=64,
                               do_layer_norm_before=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    ctx = _ctx(model)
    ref = _logits(model, ctx.calib)
    res = SmoothQuant(pairs="all").quantize(model, ctx)
    folds = res.info["folds"]
    assert {f["prev"] for f in folds if not f["folded"]} == {"self_attn_layer_norm", "final_layer_norm"}
    assert all(f["folded"] for f in folds if f["prev"] in ("self_attn.v_proj", "fc1"))  # linear pairs stay exact
    torch.testing.assert_close(_logits(model, ctx.calib), ref, rtol=1e-4, atol=1e-4)


def test_o3_static_scale_is_the_smoothed_max():
    model = tiny_model("llama")
    ctx = _ctx(model)
    res = SmoothQuant(scheme="O3").quantize(model, ctx)
    name = "model.layers.1.self_attn.q_proj"
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0].abs().max()))
    _logits(model, ctx.calib)
    h.remove()
    act = res.layers[name].act
    assert act.spec.granularity == "tensor" and float(act.static_scale) == pytest.approx(float(max(seen)) / 127,
                                                                                          rel=1e-5)


def test_stacked_gptq_keeps_smoothquant_activations():
    model = tiny_model("llama")
    ctx = _ctx(model)
    first = SmoothQuant(scheme="O2").quantize(model, ctx)
    second = GPTQ(bits=4, group_size=32).quantize(model, Context(ctx.calib, ctx.arch, ctx.device, prior=first))
    merged = QuantResult().merge(first).merge(second)
    r = merged.layers["model.layers.0.mlp.up_proj"]
    assert r.weight.spec.bits == 4 and r.act is first.layers["model.layers.0.mlp.up_proj"].act
    assert r.act.spec.granularity == "tensor" and r.act.static_scale is None


def test_alpha_search_picks_the_lowest_calibration_loss():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    sq = SmoothQuant(bits=4, act_bits=4, alpha_grid=[0.0, 0.5, 1.0], search_samples=2)
    res = sq.quantize(model, _ctx(model))
    s = res.info["alpha_search"]
    losses = {float(a): v for a, v in s["calib_nll"].items()}
    assert set(losses) == {0.0, 0.5, 1.0} and res.info["alpha"] == min(losses, key=losses.get)
    assert len(set(losses.values())) == 3  # the grid points really differ
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the chosen alpha was folded


@pytest.mark.parametrize("override,needle", [
    ("method.smoothquant.alpha=1.5", "alpha=1.5 is out of range; allowed: 0 <= alpha <= 1"),
    ("method.smoothquant.alpha=-0.1", "alpha=-0.1 is out of range"),
    ("method.smoothquant.alpha_grid=[0.5,2.0]", "alpha_grid entry=2.0 is out of range"),
    ("method.smoothquant.act_bits=9", "act_bits=9 out of range; allowed: 2..8"),
    ("method.smoothquant.act_bits=1", "act_bits=1 out of range"),
    ("method.smoothquant.scheme=O4", "scheme='O4' is unknown; allowed: O1, O2, O3"),
    ("data.n_samples=0", "data.n_samples=0"),  # a static scheme (and the smoothing) without calibration data
])
def test_bad_input_is_one_line_before_loading(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(")) as e:
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=smoothquant", "logger=none",
                          "method.smoothquant.scheme=O3", override]))
    assert "\n" not in str(e.value)


def test_act_bits_knob_must_match_the_steps():
    with pytest.raises(ConfigError, match="act_bits=6 but method 'smoothquant' quantizes activations to 8 bits"):
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=smoothquant", "act_bits=6", "logger=none"]))
    p = plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=smoothquant", "logger=none",
                          "method.smoothquant.scheme=O3", "method.smoothquant.weight_granularity=tensor"]))
    assert p.tag == "smoothquant-w8gt-sym-a8t-O3-wtensor" and p.needs_calibration
