"""Reference kernels against the primitives (float64 / fake-quant ground truth), on CPU."""
import pytest
import torch

from tests._qhelpers import packed_args, rel_err, rtn_layer
from qresearch.kernels import reference as ref
from qresearch.quant import QuantSpec, choose_qparams, quantize


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (4, 128, True), (3, 64, False), (2, 32, True),
                                            (8, -1, True), (8, 128, False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequant_matches_primitives(bits, group, sym, act_order):
    res = rtn_layer(37, 200, bits, group, sym, act_order)  # 200 = 3 * 64 + 8: partial last group
    meta, qw, s, qz, gi = packed_args(res)
    assert torch.equal(ref.dequant_weight(meta, qw, s, qz, gi), res.weight.dequantize(torch.float32))


def test_wa16_ref_is_linear_of_dequant():
    res = rtn_layer(19, 72, 4, 32, False)
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(5, 72, dtype=torch.float64), torch.randn(19, dtype=torch.float64)
    want = x @ res.weight.dequantize(torch.float64).t() + b
    assert rel_err(ref.wa16_ref(x, meta, qw, s, qz, gi, b), want) < 1e-12


def test_act_quant_ref_matches_primitives_per_token():
    x = torch.randn(9, 50)
    x[2] = 0.0
    x[4, :3] = torch.tensor([127.0, 0.5, -1.5])  # scale 1: exact .5 ties round to even
    spec = QuantSpec(bits=8, sym=True, granularity="token")
    scale, zero = choose_qparams(x, spec)
    want = quantize(x, scale, zero, spec).to(torch.int16) - 128
    q, s = ref.act_quant_ref(x)
    assert torch.equal(q.to(torch.int16), want) and torch.equal(s, scale[:, 0])
    assert q[4, 1] == 0 and q[4, 2] == -2


def test_w8a8_ref_close_to_fake_quant():
    res = rtn_layer(24, 96, 8, -1, True)
    meta, qw, s, _, _ = packed_args(res)
    x = torch.randn(7, 96)
    xq, sx = ref.act_quant_ref(x)
    want = (xq.double() * sx.double()[:, None]) @ res.weight.dequantize(torch.float64).t()
    assert rel_err(ref.w8a8_ref(x, meta, qw, s, None), want) < 1e-6
