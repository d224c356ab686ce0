"""Cases for tests/test_triton_interpreter.py: dequantize-then-GEMM prefill (qresearch/kernels/triton_dequant.py)
under the Triton interpreter, against the torch reference on the same packed buffers."""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # triton reads it when first imported: needs a fresh process
    pytest.skip("run through tests/test_triton_interpreter.py (sets TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)

from qresearch.kernels import reference as ref  # noqa: E402
from qresearch.kernels import triton_dequant as D  # noqa: E402
from tests._qhelpers import packed_args, rel_err, rtn_layer  # noqa: E402


@pytest.mark.parametrize("bits,sym,group,k,act_order", [
    (4, False, 128, 384, False), (4, True, 64, 256, False), (3, False, 128, 256, False), (2, False, 64, 192, False),
    (8, True, -1, 200, False), (5, False, 32, 160, False), (4, False, 64, 256, True), (3, True, 32, 224, True)])
def test_dequantize_equals_the_reference_weight(bits, sym, group, k, act_order):
    """Every code width, sym / asym, groups of 32..128 and per channel with a partial tail (K = 200), act-order
    g_idx: the [K, N] weight is the reference's [N, K] one transposed, exactly (fp32)."""
    meta, qw, s, qz, gi = packed_args(rtn_layer(37, k, bits, group, sym, act_order, seed=bits + k))
    w = D.dequantize(meta, qw, s, qz, gi, torch.float32)
    assert w.shape == (k, 37) and torch.equal(w, ref.dequant_weight(meta, qw, s, qz, gi).t())


def test_dequant_linear_matches_reference_with_bias():
    meta, qw, s, qz, gi = packed_args(rtn_layer(40, 256, 4, 128, False, seed=5))
    x, b = torch.randn(70, 256), torch.randn(40)
    y = D.dequant_linear(x, meta, qw, s, qz, gi, b)
    assert y.shape == (70, 40) and rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, b)) < 1e-5


@pytest.mark.parametrize("path,m,dequant", [("auto", 128, True), ("auto", 127, False), ("auto", 17, False),
                                            ("dequant", 17, True), ("fused", 300, False)])
def test_dispatch_prefill_path(monkeypatch, path, m, dequant):
    """QRESEARCH_PREFILL: auto dequantizes calls from DEQUANT_MIN_M tokens on, dequant / fused force one path for
    every call past the small-M kernels; both give the reference's output."""
    from qresearch.kernels import dispatch
    from qresearch.kernels import triton_wq as WQ

    meta, qw, s, qz, gi = packed_args(rtn_layer(40, 256, 4, 128, False, seed=6))
    bufs = {"qweight": qw, "scales": s, "qzeros": qz, "g_idx": gi, "bias": None}
    calls = {"dequant": 0, "fused": 0}
    real_d, real_f = D.dequant_linear, WQ.wq_linear
    monkeypatch.setattr(D, "dequant_linear", lambda *a: calls.__setitem__("dequant", 1) or real_d(*a))
    monkeypatch.setattr(WQ, "wq_linear", lambda *a, **k: calls.__setitem__("fused", 1) or real_f(*a, **k))
    monkeypatch.setenv("QRESEARCH_PREFILL", path)
    x = torch.randn(m, 256)
    y = dispatch._run_triton_wq(x, meta, bufs, None)
    assert calls == {"dequant": int(dequant), "fused": int(not dequant)}
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) < 1e-5


def test_unknown_prefill_path_is_refused(monkeypatch):
    monkeypatch.setenv("QRESEARCH_PREFILL", "fastest")
    with pytest.raises(ValueError, match="QRESEARCH_PREFILL='fastest' is unknown; allowed: auto, dequant, fused"):
        D.prefill_path()
