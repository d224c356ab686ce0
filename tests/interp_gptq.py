"""Cases for tests/test_triton_interpreter.py: GPTQ's column loop as a Triton kernel (qresearch/kernels/triton_gptq.py)
under the Triton interpreter gives the C loop's results bit for bit (codes, scaled errors, updated block), one
segment at a time and through a whole solve."""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # triton reads it when first imported: needs a fresh process
    pytest.skip("run through tests/test_triton_interpreter.py (sets TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)

import methods.gptq_solver as solver  # noqa: E402
from methods.gptq_solver import gptq_quantize, inverse_hessian_cholesky  # noqa: E402
from qresearch.kernels import cpu_gptq, triton_gptq  # noqa: E402
from qresearch.quant import QuantSpec, weight_spec  # noqa: E402
from tests._qhelpers import correlated_hessian  # noqa: E402


def _hessian(n: int, seed: int) -> torch.Tensor:
    return correlated_hessian(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("out,b,a,e,bits,per_row,transposed", [
    (70, 128, 0, 128, 4, True, False),  # a whole block; rows not a multiple of the program's 32
    (64, 50, 10, 37, 3, True, False),  # a segment inside an odd-sized block
    (33, 7, 0, 7, 8, False, False),  # one scale / zero for all rows (per-tensor grid)
    (96, 64, 5, 64, 2, True, True),  # H1 as a transposed view (other strides)
])
def test_segment_equals_c_loop(out, b, a, e, bits, per_row, transposed):
    g = torch.Generator().manual_seed(out + b + bits)
    H1 = inverse_hessian_cholesky(_hessian(b, seed=b), 0.01)  # [b, b] upper factor, as the solve uses
    if transposed:
        H1 = H1.T.contiguous().T  # same values, column-major strides
    WT = torch.randn(b, out, generator=g) * 0.02
    n = out if per_row else 1
    s = torch.rand(n, generator=g) * 0.004 + 0.001
    z = torch.randint(0, 2**bits, (n,), generator=g).float()
    maxq = float(2**bits - 1)
    c = [WT.clone(), torch.full((b, out), -1.0), torch.full((b, out), -1.0)]
    t = [WT.clone(), torch.full((b, out), -1.0), torch.full((b, out), -1.0)]
    assert cpu_gptq.columns(*c, H1, s, z, a, e, maxq), cpu_gptq.load()[1]
    triton_gptq.columns(*t, H1, s, z, a, e, maxq)
    for name, x, y in zip(("WT", "QT", "ET"), c, t):
        assert torch.equal(x, y), f"{name}: {int((x != y).sum())} entries differ"
    assert torch.equal(t[0][:a + 1], WT[:a + 1])  # feedback reaches only the columns after each rounded one
    if e < b:
        assert not torch.equal(t[0][e:], WT[e:])  # ... including those past the segment


@pytest.mark.parametrize("spec,bs,act_order", [(weight_spec(4, 128, False), 128, False),
                                               (weight_spec(3, 32, True), 64, True),
                                               (QuantSpec(bits=4, granularity="tensor", sym=False), 32, False)],
                         ids=["g128", "g32-sym-ao", "tensor"])
def test_solve_with_triton_loop_equals_c_loop(spec, bs, act_order, monkeypatch):
    """A whole solve with the column loop on the Triton kernel (as on CUDA) gives the C loop's codes, qparams,
    g_idx and loss: groups that start inside blocks, act-order, a per-tensor grid."""
    g = torch.Generator().manual_seed(bs)
    W, H = torch.randn(48, 256, generator=g) * 0.02, _hessian(256, seed=1)
    q_c, loss_c = gptq_quantize(W, H, spec, bs, act_order=act_order)
    calls = []

    def on_triton(blk, a, e, s, z, maxq):
        calls.append(e - a)
        triton_gptq.columns(blk.WT, blk.QT, blk.ET, blk.H1, s, z, a, e, maxq)

    monkeypatch.setattr(solver, "_columns_int", on_triton)
    q_t, loss_t = gptq_quantize(W, H, spec, bs, act_order=act_order)
    assert sum(calls) == 256
    for name in ("codes", "scale", "zero", "g_idx"):
        x, y = getattr(q_c, name), getattr(q_t, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert loss_c == loss_t
