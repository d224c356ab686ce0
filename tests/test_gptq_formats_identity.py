"""The fast GPTQ solve = main's plain column loop (tests/gptq_plain_loop.py) for every kind of numeric format:
grids (fp4, nf4 with double-quantized scales, MX, NV), int with two-level scales (torch path, not the numpy one),
fitted formats (k-means palettes per group / row / layer, binary, ternary with a per-tensor second level), with
act-order, static groups, an earlier step's QTensor as fixed qparams, weighted and unweighted fits: codes, scales,
zeros, palettes, second-level scales and g_idx bit for bit, loss and clamp statistics to rounding."""
import pytest
import torch

from methods.gptq import gptq_quantize, prepare_hessian
from methods.gptq_solver import int_fast_path
from qresearch.quant import quantize_tensor, weight_spec
from tests.gptq_plain_loop import plain_gptq

CASES = [  # (id, spec, blocksize, act_order, static_groups, prior, weighted_fit)
    ("fp4-ao", weight_spec(4, 32, True, "fp4_e2m1"), 32, True, False, False, True),
    ("fp4-ao-b20", weight_spec(4, 32, True, "fp4_e2m1"), 20, True, False, False, True),  # groups cross blocks
    ("nf4-ao", weight_spec(4, 32, True, "nf4"), 48, True, False, False, True),
    ("nf4-sg", weight_spec(4, 32, True, "nf4"), 32, True, True, False, True),
    ("mxfp4", weight_spec(4, 32, True, "mxfp4"), 64, False, False, False, True),
    ("nvfp4-ao", weight_spec(4, 16, True, "nvfp4"), 40, True, False, False, True),
    ("int-s6-ao", weight_spec(4, 32, False, "int", 6), 32, True, False, False, True),
    ("int-s6t-prior", weight_spec(4, 32, False, "int", 6, "tensor"), 32, True, False, True, True),
    ("kmeans-g32-ao", weight_spec(3, 32, True, "kmeans"), 32, True, False, False, True),
    ("kmeans-row", weight_spec(3, -1, True, "kmeans"), 32, False, False, False, True),
    ("kmeans-tensor-ao", weight_spec(3, 0, True, "kmeans"), 32, True, False, False, True),
    ("kmeans-g32-unweighted", weight_spec(2, 32, True, "kmeans"), 24, False, False, False, False),
    ("kmeans-g32-prior", weight_spec(2, 32, True, "kmeans"), 32, True, False, True, True),
    ("binary-ao", weight_spec(1, -1, True, "binary"), 32, True, False, False, True),
    ("ternary-s8t-sg", weight_spec(2, 32, True, "ternary", 8, "tensor"), 32, True, True, False, True),
]


def _inputs(out_f=12, in_f=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(256, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g))
    x[:, 5] = 0  # a dead input channel
    return W, 2 * x.T @ x / 256


def _eq(a, b) -> bool:
    return (a is None) == (b is None) and (a is None or torch.equal(a, b))


def _same(a, b) -> bool:
    return (torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
            and _eq(a.g_idx, b.g_idx) and _eq(a.lut, b.lut) and _eq(a.scale2, b.scale2))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_solver_matches_plain_loop_for_formats(case):
    _, spec, bs, ao, sg, prior, wf = case
    W, H = _inputs()
    qp = quantize_tensor(0.8 * W, spec) if prior else None  # an earlier step's QTensor (palette, scale2)
    st_fast, st_plain = {}, {}
    fast, loss = gptq_quantize(W, H, spec, bs, 0.01, ao, sg, qp, stats=st_fast, weighted_fit=wf)
    plain, plain_loss = plain_gptq(W, H, spec, bs, 0.01, ao, sg, qp, stats=st_plain, weighted_fit=wf)
    assert not int_fast_path(spec, W.device)
    assert _same(fast, plain)
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert st_fast["clamped"] == st_plain["clamped"]
    assert st_fast["clamped_loss"] == pytest.approx(st_plain["clamped_loss"], rel=1e-5, abs=1e-9)


def test_fast_path_only_for_plain_int():
    cpu = torch.device("cpu")
    assert int_fast_path(weight_spec(4, 128, False), cpu) and int_fast_path(weight_spec(3, 64, True), cpu)
    assert int_fast_path(weight_spec(4, 128, False, "int", 16), cpu)  # scale_bits=16: plain float scales
    for spec in (weight_spec(4, 128, False, "int", 6), weight_spec(4, 32, True, "nf4"),
                 weight_spec(3, -1, True, "kmeans"), weight_spec(8, -1, True, "fp8_e4m3")):
        assert not int_fast_path(spec, cpu), spec.tag
        assert not int_fast_path(spec, torch.device("cuda")), spec.tag


def test_fast_path_on_cuda_is_the_triton_loop_for_blocks_it_holds(monkeypatch):
    """CUDA: the int column loop runs as the Triton kernel for blocks up to TRITON_MAX_BLOCK columns (it keeps a
    block in registers); larger blocks take the format path (the same arithmetic), as every solve does with
    INT_LOOP off."""
    import methods.gptq_solver as solver

    cuda, spec = torch.device("cuda"), weight_spec(4, 128, False)
    assert int_fast_path(spec, cuda, 128) and int_fast_path(spec, cuda, solver.TRITON_MAX_BLOCK)
    assert not int_fast_path(spec, cuda, solver.TRITON_MAX_BLOCK + 1)
    monkeypatch.setattr(solver, "INT_LOOP", False)
    assert not int_fast_path(spec, cuda, 128) and not int_fast_path(spec, torch.device("cpu"))


def test_prepared_hessian_carries_the_fit_weights():
    """Fitted formats weight values by diag(H): a shared prepared Hessian gives what H itself gives."""
    W, H = _inputs()
    spec = weight_spec(3, 32, True, "kmeans")
    prep = prepare_hessian(H, 0.01, act_order=True)
    a, _ = gptq_quantize(W, prep, spec, 32, 0.01, True)
    b, _ = gptq_quantize(W, H, spec, 32, 0.01, True)
    assert _same(a, b)
