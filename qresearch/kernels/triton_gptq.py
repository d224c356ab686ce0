"""GPTQ's in-block column loop as one Triton kernel per group segment (int format, CUDA).

The solver's format path runs about a dozen small torch ops per weight column (encode, decode, the scaled error,
the rank-1 update of the block's later columns): on a GPU each is a kernel launch, so a Llama-7B block's ~36k
columns cost ~0.5M launches, whatever the layer size. Here one program owns BLOCK_O output rows and keeps the
whole block [b, BLOCK_O] of the transposed weight in registers; it walks the segment's columns in order. Rows are
independent in this loop (each row's update uses only its own error), so programs never talk to each other.

The arithmetic is the CPU C loop's (csrc/gptq_cols.c), operation for operation in float32: q = clamp(rint(w / s)
+ z, 0, maxq), err = (w - (q - z) * s) / d, then WT[j] -= H1[i, j] * err for the later columns. Division is
IEEE (div_rn); rint is round half to even by the 1.5 * 2^23 trick (exact for |w / s| < 2^22; beyond, the code
clamps to the same end of the grid); the launch disables FMA contraction (enable_fp_fusion=False), so each
product is rounded before its subtraction, as torch's separate kernels and numpy's calls do. Under the Triton
interpreter the result equals the C loop bit for bit (tests/interp_gptq.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_splitk import cdiv

RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: v + M - M is v rounded half to even, |v| < 2^22
BLOCK_O = 32  # output rows per program: the [128, 32] float32 block is 32 registers a thread at 4 warps


@triton.jit
def gptq_columns_kernel(wt_ptr, qt_ptr, et_ptr, h_ptr, h0, h1, s_ptr, ss, z_ptr, zs, OUT, B, A, E, maxq,
                        BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr):
    """Columns A..E-1 of a block: WT / QT / ET [B, OUT] float32 rows of stride OUT, H1 element (i, j) at
    h_ptr + i * h0 + j * h1, s / z per row (stride 1) or one for all (stride 0)."""
    pid = tl.program_id(0)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = offs_o < OUT
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    tile = wt_ptr + rows[:, None] * OUT + offs_o[None, :]
    tmask = rmask[:, None] & omask[None, :]
    wt = tl.load(tile, mask=tmask, other=0.0)  # [BLOCK_B, BLOCK_O] the block, transposed
    s = tl.load(s_ptr + offs_o * ss, mask=omask, other=1.0)
    z = tl.load(z_ptr + offs_o * zs, mask=omask, other=0.0)
    for i in range(A, E):
        w = tl.sum(tl.where(rows[:, None] == i, wt, 0.0), axis=0)  # row i [BLOCK_O], exactly
        v = tl.math.div_rn(w, s)
        v = (v + RINT_MAGIC) - RINT_MAGIC
        v = v + z
        v = tl.where(v < 0.0, 0.0, v)
        v = tl.where(v > maxq, maxq, v)
        tl.store(qt_ptr + i * OUT + offs_o, v, mask=omask)
        d = tl.load(h_ptr + i * h0 + i * h1)
        dq = (v - z) * s
        err = tl.math.div_rn(w - dq, d)
        tl.store(et_ptr + i * OUT + offs_o, err, mask=omask)
        later = rows > i
        h = tl.load(h_ptr + i * h0 + rows * h1, mask=rmask & later, other=0.0)  # [BLOCK_B] H1[i, :]
        wt = tl.where(later[:, None], wt - h[:, None] * err[None, :], wt)
    tl.store(tile, wt, mask=tmask)


def columns(WT, QT, ET, H1, s, z, a: int, e: int, maxq: float) -> None:
    """Quantize block columns a..e-1 on the tensors' device (WT / QT / ET [b, out] float32 rows of stride out,
    H1 [b, b] float32 with any strides, s / z [out | 1] float32), as cpu_gptq.columns does on CPU."""
    b, out = WT.shape
    assert all(t.dtype == torch.float32 and t.stride() == (out, 1) for t in (WT, QT, ET)), \
        "float32 rows of stride out"
    s, z = s.contiguous(), z.contiguous()
    block_b = max(16, triton.next_power_of_2(b))
    extra = {} if WT.device.type == "cpu" else {"enable_fp_fusion": False}  # the interpreter has no FMA to fuse
    gptq_columns_kernel[(cdiv(out, BLOCK_O),)](WT, QT, ET, H1, H1.stride(0), H1.stride(1), s, int(s.numel() > 1),
                                               z, int(z.numel() > 1), out, b, a, e, float(maxq), BLOCK_B=block_b,
                                               BLOCK_O=BLOCK_O, num_warps=4, **extra)
