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
