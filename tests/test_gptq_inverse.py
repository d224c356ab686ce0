"""GPTQ's inverse-Hessian factor: the fast path (one Cholesky of the reversed H + a triangular inverse) gives the
same matrix as the reference's exact path, and a solve with it the same quality."""
import pytest
import torch

from methods.gptq import GPTQ
from methods.gptq_solver import gptq_quantize, inverse_factor_exact, inverse_factor_fast, inverse_hessian_cholesky
from qresearch.errors import ConfigError, NumericalError
from qresearch.kernels import cpu_gptq, cpu_lapack
from qresearch.quant import weight_spec


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g) * (0.1 + torch.rand(n, generator=g) * 3)  # uneven channel scales
    return X.T @ X + 0.01 * torch.eye(n)


@pytest.mark.parametrize("n", [1, 7, 130])
def test_fast_factor_is_upper_and_inverts_h(n):
    H = _hessian(n)
    U = inverse_factor_fast(H)
    assert torch.equal(U, U.triu())
    assert torch.all(torch.diagonal(U) > 0)
    want = torch.linalg.inv(H.double())
    assert torch.allclose((U.T @ U).double(), want, rtol=1e-4, atol=1e-6 * want.abs().max())
    # the upper Cholesky factor of H^-1 is unique: both paths give it (to fp32 rounding)
    U64 = inverse_factor_exact(H.double())
    assert (U.double() - U64).norm() / U64.norm() < 1e-5
    assert (inverse_factor_exact(H).double() - U64).norm() / U64.norm() < 1e-5


def test_fast_factor_float64_and_not_positive_definite():
    H = _hessian(20).double()
    assert inverse_factor_fast(H).dtype == torch.float64
    with pytest.raises(torch.linalg.LinAlgError, match="percdamp"):
        inverse_hessian_cholesky(-torch.eye(4), 0.0, "fast")
    with pytest.raises(ValueError, match="allowed: exact, fast"):
        inverse_hessian_cholesky(torch.eye(4), 0.01, "lu")


@pytest.mark.parametrize("act_order", [False, True])
def test_solve_with_fast_factor_matches_exact(act_order):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 256, generator=g) * 0.02
    H = _hessian(256, seed=2)
    spec = weight_spec(4, 64, False)
    q, loss = gptq_quantize(W, H, spec, 32, 0.01, act_order)
    qf, loss_f = gptq_quantize(W, H, spec, 32, 0.01, act_order, inverse="fast")
    differ = (q.codes != qf.codes).float().mean().item()
    assert differ < 0.01, differ  # last-bit differences flip at most a few near-ties
    assert abs(loss_f - loss) / loss < 1e-3


def test_gptq_method_rejects_unknown_inverse():
    with pytest.raises(ConfigError, match="inverse='lu'.*exact, fast"):
        GPTQ(bits=4, group_size=128, inverse="lu")
    assert "invfast" in GPTQ(bits=4, group_size=128, inverse="fast").flags()


def _asym_hessian(n: int, seed: int) -> torch.Tensor:
    H = _hessian(n, seed)
    H[-1, 0] += 1e-3 if n > 1 else 0.0  # not symmetric bit for bit: the lower triangle is the one LAPACK must read, as torch reads it
    return H


needs_lapack = pytest.mark.skipif(cpu_lapack._routines() is None, reason="libtorch_cpu exports no spotrf_/spotri_")


@needs_lapack
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 65, 1100])
def test_direct_lapack_chain_is_torch_chain_bit_for_bit(n, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        H = _asym_hessian(n, seed=n)
        want = cpu_lapack.torch_chain(H)
        got = cpu_lapack.factor_inplace(H.T.clone(memory_format=torch.contiguous_format))
        assert torch.equal(got, want) and got.stride() == want.stride()  # values and layout (the GEMMs read it)
        assert cpu_lapack.available()
        # the solver's entry points: a row-major H (copied) and the caller's transposed scratch (used in place)
        assert torch.equal(inverse_factor_exact(H), want)
        Hc = H.T.contiguous().T  # column-major: its .T is contiguous, yet the caller's H must stay untouched
        assert torch.equal(inverse_factor_exact(Hc), want) and torch.equal(Hc, H)
        scratch = H.T.clone(memory_format=torch.contiguous_format)
        U = inverse_factor_exact(scratch, transposed=True)
        assert torch.equal(U, want) and U.data_ptr() == scratch.data_ptr()
    finally:
        torch.set_num_threads(before)


def test_exact_factor_without_direct_lapack_is_torch_chain(monkeypatch):
    """A failed check (here: a broken direct path) leaves torch's chain in charge, with the same bits."""
    H = _asym_hessian(70, seed=3)
    want = cpu_lapack.torch_chain(H)
    monkeypatch.setattr(cpu_lapack, "factor_inplace", lambda R: torch.zeros_like(R))
    cpu_lapack._exact.cache_clear()
    try:
        assert not cpu_lapack.available()
        assert torch.equal(inverse_factor_exact(H), want)
        assert torch.equal(inverse_factor_exact(H.T.contiguous(), transposed=True), want)
    finally:
        cpu_lapack._exact.cache_clear()


def test_tri_mirror_c_and_torch_agree(monkeypatch):
    a = torch.randn(130, 130)
    want = a.triu() + a.triu(1).T
    c = a.clone()
    cpu_gptq.tri_mirror(c)
    monkeypatch.setattr(cpu_gptq, "load", lambda: (None, "no compiler"))
    t = a.clone()
    cpu_gptq.tri_mirror(t)
    assert torch.equal(c, want) and torch.equal(t, want)


@pytest.mark.parametrize("inverse", ["exact", "fast"])
def test_not_positive_definite_is_one_clear_error(inverse):
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite.*raise percdamp"):
        inverse_hessian_cholesky(-torch.eye(40), 0.0, inverse)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_is_named_not_blamed_on_percdamp(bad):
    X = torch.randn(64, 12)
    X[5, 7] = bad  # one calibration value reaches H's row / column 7
    H = X.T @ X
    with pytest.raises(NumericalError, match=r"NaN/inf on 1 channel\(s\) \(first: \[7\]\)"):
        gptq_quantize(torch.randn(4, 12), H, weight_spec(4, -1, False))
