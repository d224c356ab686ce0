"""ZeroQuant: the straight-through linear, LKD lowers each block's output error (and the model's), the loss curve is
recorded, the FP model is left as it was, and bad options fail as one-line errors."""
import copy

import pytest
import torch

from methods.zeroquant import STELinear, ZeroQuant
from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.nn.swap import swap_linears
from qresearch.quant import QuantSpec

from .conftest import DATA
from .helpers import compose_cfg
from .pipeline_helpers import tiny_model


def test_ste_linear_passes_gradients_to_latent_weights():
    lin = torch.nn.Linear(16, 8)
    m = STELinear(lin, QuantSpec(bits=4, group_size=8), QuantSpec(bits=8, sym=True, granularity="token"))
    x = torch.randn(3, 16)
    m(x).sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert torch.allclose(m.weight.grad, torch.ones(3, 8).T @ _fq_tok(x), atol=1e-5)  # STE: d/dW of fq(x) W^T


def _fq_tok(x):
    from qresearch.quant import fake_quantize

    return fake_quantize(x, QuantSpec(bits=8, sym=True, granularity="token"))


def _nll(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_lkd_lowers_block_and_model_error():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ctx = Context(calib=ids, arch=arch_for(model), device=torch.device("cpu"))
    state = copy.deepcopy(model.state_dict())
    fp_logits = model(input_ids=ids).logits.detach()
    results = {}
    for lkd in (False, True):
        zq = ZeroQuant(bits=3, group_size=32, lkd=lkd, steps=40, lr=1e-3, batch_size=4)
        results[lkd] = zq.quantize(model, ctx)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # FP model untouched
    blocks = results[True].info["lkd"]["blocks"]
    assert len(blocks) == 2 and all(b["mse_after"] < b["mse_before"] for b in blocks)
    assert len(results[True].artifacts["zeroquant.lkd.model.layers.0.loss"]) == 40
    plain = results[False].info["lkd"]
    assert not plain["enabled"] and all(b["mse_after"] == b["mse_before"] and not b["curve"] for b in plain["blocks"])
    errs = {}
    for lkd, res in results.items():
        q = copy.deepcopy(model)
        swap_linears(q, res, "fake")
        errs[lkd] = float((q(input_ids=ids).logits.detach() - fp_logits).pow(2).mean())
    assert errs[True] < errs[False], errs


def test_keep_best_restores_a_block_that_lkd_made_worse():
    """A learning rate far too high makes LKD raise the block error: keep_best keeps the untrained (RTN) weights,
    recorded as kept: false; keep_best=false keeps what training left."""
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ctx = Context(calib=ids, arch=arch_for(model), device=torch.device("cpu"))
    kw = dict(bits=4, group_size=32, steps=5, lr=1.0, batch_size=4)
    plain = ZeroQuant(lkd=False, **kw).quantize(model, ctx)
    guarded = ZeroQuant(**kw).quantize(model, ctx)
    raw = ZeroQuant(keep_best=False, **kw).quantize(model, ctx)
    blocks = guarded.info["lkd"]["blocks"]
    assert all(b["mse_after"] > b["mse_before"] and b["kept"] is False for b in blocks)
    for name, layer in plain.layers.items():
        assert torch.equal(guarded.layers[name].weight.codes, layer.weight.codes)
    assert any(not torch.equal(raw.layers[n].weight.codes, plain.layers[n].weight.codes) for n in plain.layers)
    assert all(b["kept"] is True for b in raw.info["lkd"]["blocks"])


@pytest.mark.parametrize("override,needle", [
    ("method.zeroquant.act_bits=1", "act_bits=1 is out of range; allowed: 2..8"),
    ("method.zeroquant.act_bits=12", "act_bits=12 is out of range"),
    ("method.zeroquant.lr=0", "lr=0"),
    ("method.zeroquant.steps=0", "steps=0"),
])
def test_bad_options_fail_before_loading(override, needle):
    with pytest.raises(ConfigError, match=needle):
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=zeroquant", "logger=none", override]))


def test_tags():
    p = plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=zeroquant", "bits=4", "logger=none",
                          "method.zeroquant.lkd=false"]))
    assert p.tag == "zeroquant-w4g128-sym-a8tok-nolkd" and p.facts["act_bits"] == 8
