"""GPTQ's in-block column loop in C (csrc/gptq_cols.c), for the int format on CPU: the same float32 operations as
the numpy loop in methods/gptq_solver.py, in the same order, compiled without FMA contraction, so codes and errors
are bit-identical to it (tests/test_gptq_c_loop.py) while the per-column numpy calls (about ten small ones and a
two-pass rank-1 update per column) become one call per group segment.

Built once per machine like the packed-layer kernel (cpu_lowbit.load_library). Without a C compiler, or when the
build fails, `columns` returns False and the solver keeps the numpy loop (same output), with the reason logged once.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

from .cpu_lowbit import load_library

SRC = Path(__file__).with_name("csrc") / "gptq_cols.c"
EXTRA = ("-ffp-contract=off", "-fno-fast-math")  # every product rounded before its subtraction, as numpy's
_P, _I = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {"qr_gptq_columns": (None, [_P, _P, _P, _P, _I, _I, _P, _I, _P, _I, _I, _I, _I, _I, ctypes.c_float]),
              "qr_tri_mirror": (None, [_P, _I]),
              "qr_take2d_f32": (None, [_P, _P, _I, _I, _I, _P, _P]),
              "qr_take2d_u8": (None, [_P, _P, _I, _I, _I, _P, _P])}
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def load() -> tuple[ctypes.CDLL | None, str]:
    lib, why = load_library(SRC, SIGNATURES, EXTRA)
    if lib is None:
        log.warning("GPTQ column loop: numpy (same output, slower): %s", why)
    return lib, why


def columns(WT: torch.Tensor, QT: torch.Tensor, ET: torch.Tensor, H1: torch.Tensor, s: torch.Tensor,
            z: torch.Tensor, a: int, e: int, maxq: float) -> bool:
    """Quantize block columns a..e-1 in C (WT / QT / ET [b, out] float32 rows of stride out, H1 [b, b] float32
    with any strides, s / z [out | 1] float32); False when the library is unavailable (nothing done)."""
    lib = load()[0]
    if lib is None:
        return False
    b, out = WT.shape
    assert all(t.dtype == torch.float32 and t.stride() == (out, 1) for t in (WT, QT, ET)), "float32 rows of stride out"
    assert H1.dtype == torch.float32 and tuple(H1.shape) == (b, b), (H1.dtype, tuple(H1.shape), b)
    s, z = s.contiguous(), z.contiguous()
    assert s.dtype == z.dtype == torch.float32 and s.numel() in (1, out) and z.numel() in (1, out), \
        f"s {s.dtype} {tuple(s.shape)}, z {z.dtype} {tuple(z.shape)}: float32, one per row or one for all"
    lib.qr_gptq_columns(WT.data_ptr(), QT.data_ptr(), ET.data_ptr(), H1.data_ptr(), *H1.stride(), s.data_ptr(),
                        int(s.numel() > 1), z.data_ptr(), int(z.numel() > 1), out, b, a, e, maxq)
    return True


def tri_mirror(a: torch.Tensor) -> None:
    """The upper triangle of a square contiguous float32 `a` [n, n] mirrored into its lower one, in place: C tiles
    when the library is built, torch ops otherwise (same values: pure data movement)."""
    n = a.shape[0]
    assert a.dtype == torch.float32 and a.is_contiguous() and tuple(a.shape) == (n, n), (a.dtype, tuple(a.shape))
    lib = load()[0]
    if lib is not None:
        lib.qr_tri_mirror(a.data_ptr(), n)
    else:
        a.copy_(a.triu() + a.triu(1).T)


TAKE2D = {torch.float32: "qr_take2d_f32", torch.uint8: "qr_take2d_u8"}


def take2d(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor | None:
    """t[rows][:, cols] (rows None: all, in order) as a new contiguous tensor from torch's allocator, for a CPU
    float32 / uint8 `t` with unit column stride and int64 indices (bounds checked); None when the library is
    unavailable or the dtype is not one of those (the caller indexes another way: same values)."""
    lib, name = load()[0], TAKE2D.get(t.dtype)
    if lib is None or name is None or t.dim() != 2 or t.stride(1) != 1:
        return None
    cols = cols.to(torch.int64).contiguous()
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    for idx, size in ((cols, t.shape[1]), (rows, t.shape[0])):
        if idx is not None and idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < size):
            raise IndexError(f"take2d: an index lies outside [0, {size})")
    n_rows = t.shape[0] if rows is None else rows.numel()
    out = torch.empty(n_rows, cols.numel(), dtype=t.dtype)
    getattr(lib, name)(out.data_ptr(), t.data_ptr(), n_rows, cols.numel(), t.stride(0),
                       None if rows is None else rows.data_ptr(), cols.data_ptr())
    return out
