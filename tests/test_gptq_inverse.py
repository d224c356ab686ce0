"""GPTQ's inverse-Hessian factor: the fast path (one Cholesky of the reversed H + a triangular inverse) gives the
same matrix as the reference's exact path, and a solve with it the same quality."""
import pytest
import torch

from methods.gptq import GPTQ
from methods.gptq_solver import gptq_quantize, inverse_factor_exact, inverse_factor_fast, inverse_hessian_cholesky
from qresearch.errors import ConfigError
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
