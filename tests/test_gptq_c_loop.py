"""GPTQ's in-block column loop in C (qresearch/kernels/cpu_gptq.py) gives the numpy loop's results bit for bit:
codes, qparams, g_idx and loss, on random (not exactly representable) inputs, for per-group / per-channel /
per-tensor grids, sym / asym, 2..8 bits, act-order, and groups that cross block ends."""
import pytest
import torch

import methods.gptq_solver as solver
from methods.gptq_solver import gptq_quantize
from qresearch.kernels import cpu_gptq
from qresearch.quant import QuantSpec, weight_spec
from tests._qhelpers import correlated_hessian

CONFIGS = [  # (out, in, spec, blocksize, act_order)
    (64, 384, weight_spec(4, 128, False), 128, False),
    (64, 384, weight_spec(4, 128, False), 128, True),
    (48, 256, weight_spec(3, -1, True), 64, True),
    (32, 200, weight_spec(8, 64, False), 48, True),
    (40, 160, weight_spec(2, 32, False), 128, False),
    (24, 96, QuantSpec(bits=4, granularity="tensor", sym=False), 32, False),
]


def _inputs(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    return W, correlated_hessian(in_f, g)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}-{c[2].bits}b-g{c[2].group_size}-ao{int(c[4])}"
                         if isinstance(c, tuple) else None)
def test_c_loop_matches_numpy_bit_for_bit(cfg, monkeypatch):
    assert cpu_gptq.load()[0] is not None, cpu_gptq.load()[1]
    out_f, in_f, spec, bs, ao = cfg
    W, H = _inputs(out_f, in_f, seed=in_f + out_f)
    calls = []
    real = cpu_gptq.columns
    monkeypatch.setattr(cpu_gptq, "columns", lambda *a: calls.append(1) or real(*a))
    q_c, loss_c = gptq_quantize(W, H, spec, bs, act_order=ao)
    assert calls, "the C loop did not run"
    monkeypatch.setattr(solver, "USE_C_LOOP", False)
    q_np, loss_np = gptq_quantize(W, H, spec, bs, act_order=ao)
    for name in ("codes", "scale", "zero", "g_idx"):
        a, b = getattr(q_c, name), getattr(q_np, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert loss_c == loss_np


@pytest.mark.parametrize("bs", [64, 128, 256])
def test_fused_lazy_update_solves_bit_for_bit(bs, monkeypatch):
    """The lazy batch update as one addmm (where fused_update_exact's probe allows it) gives the solve of the
    product-then-subtraction form; blocksize 256 is past MKL's exact bound here, so the probe keeps it unfused."""
    W, H = _inputs(96, 640, seed=3)
    spec, used = weight_spec(4, 128, False), []
    real = solver.fused_update_exact
    monkeypatch.setattr(solver, "fused_update_exact", lambda k, d: used.append(real(k, d)) or used[-1])
    q_f, loss_f = gptq_quantize(W, H, spec, bs)
    monkeypatch.setattr(solver, "FUSED_UPDATE", False)
    q_u, loss_u = gptq_quantize(W, H, spec, bs)
    assert used and all(torch.equal(getattr(q_f, k), getattr(q_u, k)) for k in ("codes", "scale", "zero"))
    assert loss_f == loss_u


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("with_rows", [False, True])
def test_take_cols_is_indexing(dtype, with_rows, monkeypatch):
    """The act-order gathers (C, and numpy without the library) equal torch's indexing, on a view whose rows are
    longer than its columns (row stride > width)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(70, 90, generator=g) if dtype == torch.float32 else torch.randint(0, 255, (70, 90),
                                                                                           dtype=torch.uint8)
    t = base[:, 7:67]  # [70, 60], row stride 90
    cols, rows = torch.randperm(60, generator=g), torch.randperm(70, generator=g) if with_rows else None
    want = (t if rows is None else t[rows])[:, cols]
    got = solver.take_cols(t, cols, rows=rows)
    assert got.is_contiguous() and got.dtype == dtype and torch.equal(got, want)
    monkeypatch.setattr(cpu_gptq, "load", lambda: (None, "no compiler"))
    assert torch.equal(solver.take_cols(t, cols, rows=rows), want)


def test_take2d_refuses_out_of_range_indices():
    t = torch.zeros(4, 5)
    with pytest.raises(IndexError, match=r"outside \[0, 5\)"):
        cpu_gptq.take2d(t, None, torch.tensor([0, 5]))
    with pytest.raises(IndexError, match=r"outside \[0, 4\)"):
        cpu_gptq.take2d(t, torch.tensor([-1]), torch.tensor([0]))
    assert cpu_gptq.take2d(t.double(), None, torch.tensor([0])) is None  # other dtypes: the caller indexes
