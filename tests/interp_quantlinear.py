"""Cases for tests/test_triton_interpreter.py: QuantLinear forced onto its Triton kernels (interpreter) vs the
torch reference on the same module; dispatch records the kernel it ran."""
import os

import pytest
import torch
from torch import nn

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_triton_interpreter.py", allow_module_level=True)

from qresearch.records import ActQuant  # noqa: E402
from qresearch.nn.packed import QuantLinear  # noqa: E402
from qresearch.quant import QuantSpec  # noqa: E402
from tests._qhelpers import rel_err, rtn_layer  # noqa: E402


def _module(res, bias=True):
    out_f, in_f = res.weight.codes.shape
    lin = nn.Linear(in_f, out_f, bias=bias)
    return QuantLinear.from_result(lin, res)


def _both(mod, x, monkeypatch):
    monkeypatch.setenv("QRESEARCH_KERNELS", "triton")
    assert mod.kernel_name.startswith("triton_")
    y = mod(x)
    monkeypatch.setenv("QRESEARCH_KERNELS", "torch")
    assert mod.kernel_name.startswith("torch_ref_")
    return y, mod(x)


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, False, True), (3, 64, True, False),
                                                      (2, 16, False, False)])
@pytest.mark.parametrize("lead", [(1,), (2, 9), (2, 80)])  # M = 1, 18 (fused prefill), 160 (dequantize-then-GEMM)
def test_weight_only_layer(bits, group, sym, act_order, lead, monkeypatch):
    mod = _module(rtn_layer(24, 100, bits, group, sym, act_order))
    y, want = _both(mod, torch.randn(*lead, 100), monkeypatch)
    assert y.shape == (*lead, 24) and rel_err(y, want) < 1e-5


def test_w8a8_layer(monkeypatch):
    res = rtn_layer(24, 80, 8, -1, True)
    res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"))
    mod = _module(res)
    assert mod.kernel_name == "triton_w8a8" or os.environ.get("QRESEARCH_KERNELS") == "torch"
    y, want = _both(mod, torch.randn(3, 5, 80), monkeypatch)
    assert rel_err(y, want) < 1e-6


def test_outlier_columns(monkeypatch):
    res = rtn_layer(16, 64, 8, -1, True)
    res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"))
    res.outliers = torch.zeros(64, dtype=torch.bool)
    res.outliers[[3, 40]] = True
    mod = _module(res)
    y, want = _both(mod, torch.randn(4, 64) * 3, monkeypatch)
    assert mod.kernel_name.endswith("+fp_outliers") and rel_err(y, want) < 1e-6


@pytest.mark.parametrize("path", ["permute", "gather"])
@pytest.mark.parametrize("lead", [(1,), (5,), (18,)])  # GEMV, split-K tile, fused prefill
def test_act_order_permuted_or_gathered(path, lead, monkeypatch):
    """QRESEARCH_ACT_ORDER: a clean act-order layer runs the contiguous-group kernels on its codes permuted once
    (x[:, perm] per call; the permuted copy made at the first call only) or triton_wq's per-element gathers; a
    g_idx with uneven groups cannot be permuted and is gathered. Both match the reference."""
    from qresearch.kernels import prepared

    monkeypatch.setenv("QRESEARCH_ACT_ORDER", path)
    mod = _module(rtn_layer(24, 128, 4, 32, False, act_order=True, seed=3))
    made = []
    real = prepared.pack_rows
    monkeypatch.setattr(prepared, "pack_rows", lambda *a: made.append(1) or real(*a))
    x = torch.randn(*lead, 128)
    y, want = _both(mod, x, monkeypatch)
    monkeypatch.setenv("QRESEARCH_KERNELS", "triton")
    assert rel_err(y, want) < 1e-5 and torch.equal(mod(x), y)
    assert len(made) == (1 if path == "permute" else 0), made  # once per layer, not per call
    uneven = rtn_layer(24, 128, 4, 32, False, seed=4)
    uneven.weight.g_idx = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    mod = _module(uneven)
    y, want = _both(mod, x, monkeypatch)
    assert rel_err(y, want) < 1e-5


def test_decode_plan_is_kept_and_rebuilt_when_buffers_change(monkeypatch):
    """One-token calls on the GEMV go through the layer's kept plan (dispatch.plan_key); new buffers (a reloaded
    or moved layer) build a new plan, so the output follows the weights the layer holds now."""
    monkeypatch.setenv("QRESEARCH_KERNELS", "triton")
    a = _module(rtn_layer(24, 128, 4, 64, False, seed=0))  # group 64: the GEMV's (a multiple of 64)
    b = _module(rtn_layer(24, 128, 4, 64, False, seed=1))
    x = torch.randn(1, 1, 128)
    y1 = a(x)
    plans = [p[0] for p in a._plans.values() if p[0] is not None]
    assert len(plans) == 1 and torch.equal(a(x), y1)
    assert [p[0] for p in a._plans.values() if p[0] is not None] == plans  # kept
    for name in ("qweight", "scales", "qzeros", "bias"):
        setattr(a, name, getattr(b, name).clone())  # register_buffer assignment: new tensors
    y2 = a(x)
    assert torch.equal(y2, b(x)) and not torch.equal(y2, y1)
    a.to(torch.float64).to(torch.float32)  # moved / cast: the plans holding the old buffers are dropped
    assert not a._plans and torch.equal(a(x), y2)
    a.g_idx = (torch.arange(128) // 64).to(torch.int32)  # act-order indices set later (here the identity order)
    assert rel_err(a(x), y2) < 1e-5 and all(p[0] is None for p in a._plans.values())  # the GEMV's plan is gone
    monkeypatch.setenv("QRESEARCH_KERNELS", "torch")  # the reference: no plan, the generic path
    assert rel_err(y2, a(x)) < 1e-5 and a._plans[next(k for k in a._plans if k[3] == "torch")][0] is None


@pytest.mark.parametrize("bits,group,act", [(4, 128, False), (8, -1, True)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_decode_plans_give_the_dispatch_path_bits(bits, group, act, m, monkeypatch):
    """W4 (GEMV at one token, small-M kernels at 2..16) and per-token W8A8 (act quant + GEMM): the layer's kept plan
    gives the same bits as the dispatch path (plans are off inside launcher.jit_only())."""
    from qresearch.kernels.launcher import jit_only

    monkeypatch.setenv("QRESEARCH_KERNELS", "triton")
    res = rtn_layer(40, 256, bits, group, act)
    if act:
        res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"))
    mod = _module(res)
    x = torch.randn(m, 256)
    y = mod(x)
    assert [p for p in mod._plans.values() if p[0] is not None], "no plan was built"
    with jit_only():
        want = mod(x)
    assert torch.equal(y, want)
