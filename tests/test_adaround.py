"""AdaRound: the rectified sigmoid and its initialisation, the beta schedule, hard rounding within one step of RTN
with a lower reconstruction error on a fixed layer, the block objective end to end, stacking after AWQ."""
import copy

import pytest
import torch

from methods.adaround import AdaRound, _rtn
from methods.awq import AWQ
from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.quant import QuantSpec, choose_qparams, quantize
from qresearch.quant.rounding import (AdaRoundConfig, beta_at, init_v, make_grid, adaround_layer, rect_sigmoid,
                                      round_reg)
from tests.helpers import compose_cfg
from tests.pipeline_helpers import tiny_model


def _layer(seed=0, out=32, inp=96):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    X = torch.randn(2048, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    return W, 2 * X.T @ X / X.shape[0]


def test_rect_sigmoid_and_initialisation_start_at_the_fp_weights():
    frac = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999])
    assert torch.allclose(rect_sigmoid(init_v(frac)), frac, atol=2e-4)
    assert float(rect_sigmoid(torch.tensor(-50.0))) == 0.0 and float(rect_sigmoid(torch.tensor(50.0))) == 1.0
    W, _ = _layer()
    grid, v = make_grid(W, QuantSpec(bits=3, group_size=32))
    # the FP weights, except where the (rounded) zero point puts a group's extreme just off the grid
    inside = (torch.clamp(W / grid.scale + grid.zero, 0, grid.qmax) - grid.zero) * grid.scale
    assert torch.allclose(grid.soft(v), inside, atol=1e-3 * float(W.abs().max()))


def test_rounding_regularizer_and_beta_schedule():
    assert float(round_reg(torch.tensor([-50.0, 50.0]), 2.0)) == 0.0  # h in {0, 1}
    assert float(round_reg(init_v(torch.tensor([0.5])), 2.0)) == pytest.approx(1.0, abs=1e-3)  # h = 0.5
    cfg = AdaRoundConfig(iters=100, warmup=0.2, beta_start=20, beta_end=2)
    assert beta_at(19, cfg) is None and beta_at(20, cfg) == 20.0 and beta_at(99, cfg) == pytest.approx(2.0)
    assert 2 < beta_at(60, cfg) < 20


@pytest.mark.parametrize("bits,group,sym", [(3, 32, False), (2, 32, False), (4, -1, True)])
def test_hard_rounding_is_within_one_step_of_rtn_and_beats_it_on_a_fixed_layer(bits, group, sym):
    W, H = _layer()
    spec = QuantSpec(bits=bits, group_size=group, sym=sym, granularity="channel" if group == -1 else "group")
    q, info = adaround_layer(W, H, spec, AdaRoundConfig(iters=300, lr=0.1, reg_weight=1.0))
    s, z = choose_qparams(W, spec)
    rtn_codes = quantize(W, s, z, spec)
    assert torch.equal(q.scale, s) and torch.equal(q.zero, z)
    assert (q.codes.int() - rtn_codes.int()).abs().max() <= 1
    assert (q.codes != rtn_codes).float().mean() > 0.01  # it did change some roundings

    def err(Wq):
        D = W - Wq
        return float(((D @ H) * D).sum())
    assert err(q.dequantize()) < 0.9 * err(_rtn(W, spec, None))
    assert err(q.dequantize()) / float(((W @ H) * W).sum()) == pytest.approx(info["recon"], rel=1e-4)


def test_block_objective_end_to_end_lowers_block_error_and_records_stats():
    model, ids = tiny_model("llama"), torch.randint(0, 128, (8, 32))
    ctx = Context(calib=ids, arch=arch_for(model), device=torch.device("cpu"))
    res = AdaRound(bits=3, group_size=32, iters=60, lr=0.3, reg_weight=1.0, batch_size=4).quantize(model, ctx)
    assert len(res.layers) == 14 and res.info["engine"]["seconds"] > 0
    rows = res.stats
    assert all(r["block_rel_mse"] < r["block_rel_mse_rtn"] for r in rows)
    assert all(0 < r["changed_vs_rtn"] < 0.5 for r in rows)
    for name, r in res.layers.items():
        W = model.get_submodule(name).weight.data
        s, z = choose_qparams(W, r.weight.spec)
        assert (r.weight.codes.int() - quantize(W, s, z, r.weight.spec).int()).abs().max() <= 1


def test_keep_best_keeps_rtn_where_learned_rounding_is_worse():
    model, ids = tiny_model("llama"), torch.randint(0, 128, (8, 32))
    ctx = Context(calib=ids, arch=arch_for(model), device=torch.device("cpu"))
    # a wild lr without the regularizer flips roundings at random: worse than RTN on every block
    bad = dict(bits=3, group_size=32, iters=5, lr=50.0, reg_weight=0.0, warmup=0.0, batch_size=4)
    raw = AdaRound(**bad, keep_best=False).quantize(copy.deepcopy(model), ctx)
    assert all(r["block_rel_mse"] > r["block_rel_mse_rtn"] and not r["kept_rtn"] for r in raw.stats)
    kept = AdaRound(**bad).quantize(copy.deepcopy(model), ctx)
    assert all(r["kept_rtn"] and r["changed_vs_rtn"] == 0 for r in kept.stats)
    for name, r in kept.layers.items():
        W = model.get_submodule(name).weight.data
        s, z = choose_qparams(W, r.weight.spec)
        assert torch.equal(r.weight.codes, quantize(W, s, z, r.weight.spec))  # exactly RTN's codes
        assert not torch.equal(raw.layers[name].weight.codes, r.weight.codes)


def test_after_awq_it_rounds_on_awqs_grid():
    model, ids = tiny_model("llama_mha"), torch.randint(0, 128, (4, 32))
    arch = arch_for(model)
    ctx = Context(calib=ids, arch=arch, device=torch.device("cpu"))
    first = AWQ(bits=3, group_size=32, clip=True, search_samples=2).quantize(model, ctx)
    second = AdaRound(bits=3, group_size=32, iters=10, qparams="prior", batch_size=4).quantize(
        model, Context(calib=ids, arch=arch, device=ctx.device, prior=first))
    for name, r in second.layers.items():
        assert torch.equal(r.weight.scale, first.layers[name].weight.scale), name
        assert (r.weight.codes.int() - first.layers[name].weight.codes.int()).abs().max() <= 1, name


def test_layer_objective_and_configs():
    model, ids = tiny_model("llama"), torch.randint(0, 128, (4, 32))
    ctx = Context(calib=ids, arch=arch_for(model), device=torch.device("cpu"))
    res = AdaRound(bits=3, group_size=32, iters=30, objective="layer").quantize(model, ctx)
    assert all("layer_recon" in r and "rtn_out_rel_err" in r for r in res.stats)
    p = plan(compose_cfg(["method=awq_adaround", "model=stories260k", "bits=3", "logger=none"]))
    assert [s.name for s in p.steps] == ["awq", "adaround"] and p.steps[1].qparams == "prior"
    assert p.tag == "awq_adaround-w3g128-prior"
    p = plan(compose_cfg(["method=adaround", "model=stories260k", "logger=none", "method.adaround.iters=50"]))
    assert p.tag == "adaround-w4g128-i50"
    with pytest.raises(ConfigError, match="qformat=fp8_e4m3"):
        plan(compose_cfg(["method=adaround", "model=stories260k", "bits=8", "qformat=fp8_e4m3", "logger=none"]))
    with pytest.raises(ConfigError, match="objective='net'"):
        plan(compose_cfg(["method=adaround", "model=stories260k", "logger=none", "method.adaround.objective=net"]))
    with pytest.raises(ConfigError, match="qparams=prior needs"):
        AdaRound(qparams="prior").quantize(model, ctx)
