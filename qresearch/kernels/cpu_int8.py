"""W8A8 layers on CPU through our AVX512-VNNI integer product on the stored weight bytes (csrc/int8_cpu.c).

torch._int_mm (the `torch_int_mm` kernel) needs a signed int8 copy of every layer's weight beside its stored
unsigned codes (2.0x the stored bytes held, results/packed_memory_cpu.md). The codes u = w + 128 of a symmetric
8-bit layer are already bytes in row order inside the int32_k words, and vpdpbusd multiplies unsigned by signed
bytes, so x @ (u - 128)^T = x @ u^T - 128 rowsum(x) runs on the stored buffer itself: the weight is held once.
The integer sums equal torch._int_mm's exactly; the rescale epilogue is int_mm.w8a8_epilogue's math in one C pass
(qr_int8_rescale: the same fp32 roundings in the same order), so outputs are the torch_int_mm kernel's bit for bit.

Calls of fewer than VNNI_MAX_M rows quantize x in one C pass (act_quant_ref's codes and scales bit for bit, with
the row sums) and run the C kernel (4 x 4 register tiles, K in 2 KiB chunks so a tile's rows stay in L1; one row: 8
weight rows a tile). On a 2-core AMD EPYC (Zen 4) at Llama-7B shapes it is 1.2-1.5x faster than
torch._int_mm at M = 1, 1.1-4x at M = 4-32, where oneDNN's int8 GEMM is weak, and 0.9x (4096x11008) to 1.6x at 64-256
rows. Longer calls make 4 MiB of weight rows signed at a time in one reused per-thread buffer and run torch._int_mm
on each panel (0.8-1.15x the kept copy's time: the xor pass). results/bench_int8_cpu.md has the side-by-side table
(experiments/bench_int8_cpu.py).
"""
from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch

from ..quant.packing import PackedMeta
from .cpu_lowbit import load_library
from .cpu_panels import _buffer
from .reference import int8_from_codes

SRC = Path(__file__).with_name("csrc") / "int8_cpu.c"
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {"qr_int8_has_vnni": (_F, []), "qr_int8_u8s8_mm": (_F, [_P, _I, _I, _P, _I, _I, _I, _P, _P, _F]),
              "qr_int8_act_quant": (_F, [_P, _I, _I, _I, ctypes.c_float, _F, _P, _P, _P, _F]),
              "qr_int8_rescale": (None, [_P, _I, _I, _P, _P, _P, _P, _F])}
EXTRA_FLAGS = ("-ffp-contract=off",)  # the rescale rounds each product as torch's separate ops do
# rows from which torch._int_mm on signed panels takes over: since the C tile keeps x in registers (5f8e4d5) the C
# path is 5-25% faster than the panels at 128 and 256 rows on the three 7B shapes and ties at 512
# (experiments/bench_int8_cpu.py; results/bench_int8_cpu.md); it was 80 before
VNNI_MAX_M = 512
PANEL_BYTES = 4 << 20  # weight rows made signed at a time for torch._int_mm
MAX_K = (2**31 - 1) // (128 * 255)  # |sum_k x * u| < 2^31 in the int32 lanes (65793)


@functools.lru_cache(maxsize=None)
def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, '') or (None, why it cannot run here: no compiler, failed build, no AVX512-VNNI)."""
    lib, why = load_library(SRC, SIGNATURES, EXTRA_FLAGS)
    if lib is not None and not lib.qr_int8_has_vnni():
        return None, "this CPU / build has no AVX512-VNNI (the kernel's vpdpbusd)"
    return lib, why


def stored_bytes(meta: PackedMeta, qweight: torch.Tensor) -> torch.Tensor | None:
    """The stored int32_k words of a sym 8-bit layer as uint8 [out, 4 * words] (row n's codes in column order,
    the buffer's own memory), or None where they are not that (other layouts, a big-endian machine)."""
    if meta.bits != 8 or meta.layout != "int32_k" or sys.byteorder != "little" or not qweight.is_contiguous():
        return None
    return qweight.view(torch.uint8)  # [out, words * 4]: codes, then zero padding up to the word


def why_not(meta: PackedMeta, device: torch.device) -> str | None:
    """Why this kernel cannot run a W8A8 layer (None: it can)."""
    if device.type != "cpu":
        return f"device {device.type}"
    if (meta.qformat, meta.bits, meta.sym, meta.layout) != ("int", 8, True, "int32_k"):
        return f"{meta.qformat} w{meta.bits} {'sym' if meta.sym else 'asym'} {meta.layout} (it reads int32_k sym 8-bit)"
    if meta.in_features > MAX_K:
        return f"in_features={meta.in_features} > {MAX_K} (int32 lanes of the unsigned-byte sums)"
    if sys.byteorder != "little":
        return "big-endian machine (stored words are not bytes in column order)"
    return load()[1] or None


def act_quant(x: torch.Tensor, static_scale: torch.Tensor | None):
    """(q int8 [M, K], scale fp32 [M], row sums of q int32 [M]) of x [M, K], reference.act_quant_ref's q and scale
    bit for bit, in one C pass over x; None where x holds NaN or the static scale is no single value (then the
    caller uses act_quant_ref)."""
    if static_scale is not None and static_scale.numel() != 1:
        return None
    xf = x.float()
    xf = xf if xf.stride(-1) == 1 else xf.contiguous()
    m, k = xf.shape
    q, s = torch.empty(m, k, dtype=torch.int8), torch.empty(m, dtype=torch.float32)
    xsum = torch.empty(m, dtype=torch.int32)
    st = 0.0 if static_scale is None else float(static_scale.float())
    if load()[0].qr_int8_act_quant(xf.data_ptr(), xf.stride(0), m, k, st, int(static_scale is not None),
                                   q.data_ptr(), s.data_ptr(), xsum.data_ptr(), torch.get_num_threads()):
        return None
    return q, s, xsum


def u8s8_mm(xq: torch.Tensor, u: torch.Tensor, k: int, xsum: torch.Tensor | None = None) -> torch.Tensor:
    """xq [M, k] int8, u [N, >= k] uint8 codes (rows of stride u.stride(0)) -> int32 [M, N] = xq @ (u - 128)^T;
    xsum: the row sums of xq when the caller has them."""
    xq = xq.contiguous()
    m, n = xq.shape[0], u.shape[0]
    xsum = xq.sum(dim=1, dtype=torch.int32) if xsum is None else xsum  # [M]
    out = torch.empty(m, n, dtype=torch.int32)
    rc = load()[0].qr_int8_u8s8_mm(xq.data_ptr(), xq.stride(0), m, u.data_ptr(), u.stride(0), n, k,
                                   xsum.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError("qr_int8_u8s8_mm: this build has no AVX512-VNNI")
    return out


def signed_copy(u: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 [N, k] = u[:, :k] - 128 (reference.int8_from_codes), into `out` (uint8 [N, k]) when given."""
    return int8_from_codes(u[:, :k], out)


def panels_int_mm(xq: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
    """xq @ (u - 128)^T for long calls: PANEL_BYTES of weight rows at a time made signed in one reused per-thread
    buffer (cpu_panels' helper: no page faults, nothing kept per layer), each through torch._int_mm."""
    n = u.shape[0]
    rows = max(1, min(n, PANEL_BYTES // k))
    buf = _buffer("int8_panel", rows * k, torch.uint8).view(rows, k)
    out = torch.empty(xq.shape[0], n, dtype=torch.int32)
    xq = xq.contiguous()
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        out[:, n0:n0 + r] = torch._int_mm(xq, signed_copy(u[n0:n0 + r], k, buf[:r]).t())
    return out


def rescale(acc: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """int_mm.w8a8_epilogue in one C pass, bit for bit: acc int32 [M, N], sx fp32 [M], sw / bias fp32 [N] -> y
    [M, N] in `dtype` (rounded from fp32 by torch)."""
    m, n = acc.shape
    y = torch.empty(m, n, dtype=torch.float32)
    load()[0].qr_int8_rescale(acc.data_ptr(), m, n, sx.data_ptr(), sw.data_ptr(),
                              None if bias is None else bias.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y if dtype == torch.float32 else y.to(dtype)


def w8a8_linear(x: torch.Tensor, meta: PackedMeta, bufs: dict, static_scale: torch.Tensor | None) -> torch.Tensor:
    """y [M, out] of a W8A8 layer from its stored codes (the torch_int_mm kernel's math and bits)."""
    return bind_linear(meta, bufs["qweight"], bufs["scales"], bufs["bias"], x.shape[0], x.dtype)(x, static_scale)


def bind_linear(meta: PackedMeta, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, m: int,
                dtype: torch.dtype):
    """w8a8_linear for calls of m rows in `dtype` with the weight, its fp32 scales and bias fixed: a function of
    (x, static scale) (dispatch's c_vnni plan keeps it per layer)."""
    from .reference import act_quant_ref

    u, k = stored_bytes(meta, qweight.contiguous()), meta.in_features  # contiguous: the buffer itself
    sw = scales.float().reshape(-1).contiguous()  # [N]
    b = None if bias is None else bias.float().contiguous()

    def run(x: torch.Tensor, static_scale: torch.Tensor | None) -> torch.Tensor:
        if m < VNNI_MAX_M and (quant := act_quant(x, static_scale)) is not None:
            xq, sx, xsum = quant  # one C pass instead of act_quant_ref's seven torch ops (decode: ~40% of a call)
            acc = u8s8_mm(xq, u, k, xsum)
        else:
            xq, sx = act_quant_ref(x, static_scale)  # [M, K] int8, [M] fp32
            acc = u8s8_mm(xq, u, k) if m < VNNI_MAX_M else panels_int_mm(xq, u, k)
        return rescale(acc, sx.float().contiguous(), sw, b, dtype)
    return run
