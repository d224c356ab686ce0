"""The reference GPTQ's inverse-factor chain on CPU as direct calls into the LAPACK torch itself links.

The reference computes the upper Cholesky factor of H^-1 as `cholesky(cholesky_inverse(cholesky(H)), upper=True)`.
Each torch call copies its input into column-major order, runs one LAPACK routine, and masks or symmetrizes the
result. That is seven or eight passes over an n x n matrix around the three O(n^3) routines: 0.37 of 1.44 s at
n = 4096 on one thread. Here the same routines (spotrf 'L', spotri 'L', spotrf 'U', exported by libtorch_cpu)
run in place on one buffer that the caller fills with H^T, which is H in column-major order. Between them, two
steps stand in for torch's masking and symmetrizing: a tiled mirror of a triangle (kernels/cpu_gptq.tri_mirror) and
an in-place mask. The factor comes back column-major, as torch's does: the solve's GEMMs then see the same layout.

The routines, their arguments and their input bits are the ones torch passes, so the factor is the same bit for bit.
`_exact(threads)` checks that once per thread count on random matrices against torch's own chain, before any solve uses
this path. Where the symbols are missing (a torch not built with MKL / LAPACK inside libtorch_cpu) or the check
fails, `available()` is False and the solver runs torch's chain, which is the same arithmetic by definition.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from . import cpu_gptq

log = logging.getLogger(__name__)
PROBE_SIZES = (96, 300, 700)  # below, at and above LAPACK's usual block sizes


@functools.lru_cache(maxsize=None)
def _routines() -> tuple[object, object] | None:
    """(spotrf_, spotri_) from libtorch_cpu, or None when it does not export them."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        fns = lib.spotrf_, lib.spotri_
    except (OSError, AttributeError) as e:
        log.info("GPTQ inverse factor: torch's chain (no LAPACK symbols in %s: %s)", path, e)
        return None
    for fn in fns:
        fn.restype = None
        fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                       ctypes.POINTER(ctypes.c_int)]
    return fns


def _call(fn, uplo: bytes, a: torch.Tensor, what: str) -> None:
    n, info = ctypes.c_int(a.shape[0]), ctypes.c_int(0)
    fn(uplo, ctypes.byref(n), a.data_ptr(), ctypes.byref(n), ctypes.byref(info))
    if info.value != 0:
        raise torch.linalg.LinAlgError(f"{what} failed (LAPACK info={info.value}): not positive definite")


def factor_inplace(R: torch.Tensor) -> torch.Tensor:
    """R [n, n] float32 contiguous, holding H^T (H symmetric positive definite up to last bits; only its lower
    triangle is read, as torch reads it) -> the upper U with U^T U = H^-1 (lower part zero) in R's memory, strides
    (1, n): column-major, the layout of torch's result. Requires _routines()."""
    potrf, potri = _routines()
    n = R.shape[0]
    assert R.dtype == torch.float32 and R.is_contiguous() and tuple(R.shape) == (n, n), (R.dtype, tuple(R.shape))
    _call(potrf, b"L", R, "Cholesky")  # column-major lower = L: R's upper triangle holds L^T
    _call(potri, b"L", R, "Cholesky inverse")  # column-major lower = H^-1's: R's upper triangle
    cpu_gptq.tri_mirror(R)  # mirrored: the column-major upper triangle that spotrf 'U' reads
    _call(potrf, b"U", R, "Cholesky of the inverse")  # column-major upper = U: R's lower triangle holds U^T
    return R.tril_().T  # U, column-major as torch returns it (the solve's GEMMs read it in that layout)


def torch_chain(H: torch.Tensor) -> torch.Tensor:
    """The reference's calls, as it makes them."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


@functools.lru_cache(maxsize=None)
def _exact(threads: int) -> bool:
    g = torch.Generator().manual_seed(0)
    for n in PROBE_SIZES:
        X = torch.randn(2 * n, n, generator=g) * (0.1 + torch.rand(n, generator=g) * 3)
        H = X.T @ X + 0.01 * torch.eye(n)
        H[1, 0] += 1e-3  # not symmetric bit for bit: the lower triangle must be the one read
        want = torch_chain(H)
        try:
            got = factor_inplace(H.T.clone(memory_format=torch.contiguous_format))
        except torch.linalg.LinAlgError:
            got = None
        if got is None or not (torch.equal(got, want) and got.stride() == want.stride()):
            log.warning("GPTQ inverse factor: torch's chain (direct LAPACK calls differ from it at n=%d, %d "
                        "threads)", n, threads)
            return False
    return True


def available() -> bool:
    """Whether factor_inplace gives torch's chain's bits at the current thread count (checked once per count)."""
    return _routines() is not None and _exact(torch.get_num_threads())
