"""Prefill on weight-only packed layers as dequantize-then-GEMM: one Triton kernel writes the layer's weight in the
activation dtype, [K, N], from the packed codes (the same `_weight_tile` math as triton_wq), and the GEMM is the
library's dense matmul (cuBLAS on CUDA).

Why: on an H100 the fused prefill kernel (triton_wq: dequantize in the GEMM's main loop) reached 0.25-0.42x fp16 at
M = 256 and 2048 (results/gpu_nvidia_h100_80gb_hbm3.md), while writing a 4096x11008 fp16 weight is a ~100 MB
memory pass (tens of microseconds) next to a 237 us fp16 GEMM at M = 2048. The cost is one layer's dense weight
as a transient buffer during the call. The product equals the fused kernel's up to fp32 summation order: both
multiply x by the weight rounded to x's dtype.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .dispatch import prefill_path
from .launcher import Launcher
from .triton_splitk import cdiv
from .triton_wq import _weight_tile

# auto: calls of at least this many tokens dequantize. The H100 ran the fused GEMM 2.4-4x slower than fp16 at 256 and
# 2048 tokens; where the two cross below 256 is not measured yet (the suite's `fused` rows time 256 and 2048)
DEQUANT_MIN_M = 128


@triton.jit
def dequant_kernel(qw_ptr, s_ptr, z_ptr, gidx_ptr, w_ptr, N, K, stride_qw, stride_s, stride_z, stride_w,
                   GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, HAS_GIDX: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[K, N] (row stride stride_w, w's dtype) = (q - z) * s of the packed layer, one [BLOCK_K, BLOCK_N] tile per
    program."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _weight_tile(qw_ptr, s_ptr, z_ptr, gidx_ptr, tl.program_id(0) * BLOCK_K, offs_k, offs_n, K, N, stride_qw,
                     stride_s, stride_z, GROUP, BITS, SYM, HAS_GIDX, BLOCK_K, BLOCK_N)
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    tl.store(w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize(meta, qweight, scales, qzeros, g_idx, dtype: torch.dtype, block_k: int = 64,
               block_n: int = 128) -> torch.Tensor:
    """The packed layer's weight transposed, [K, N] in `dtype` (block_k: a multiple of 32, whole words)."""
    k, n = meta.in_features, meta.out_features
    w = torch.empty(k, n, device=qweight.device, dtype=dtype)
    z = qzeros if qzeros is not None else qweight  # dummy pointer when SYM
    grid = (cdiv(k, block_k), cdiv(n, block_n))
    _LAUNCH(grid, qweight, scales, z, g_idx if g_idx is not None else qweight, w, n, k, qweight.stride(0),
            scales.stride(0), z.stride(0), w.stride(0), GROUP=meta.group, BITS=meta.bits,
            SYM=meta.sym or qzeros is None, HAS_GIDX=g_idx is not None, BLOCK_K=block_k, BLOCK_N=block_n)
    return w


_LAUNCH = Launcher(dequant_kernel)  # the compiled kernel per specialization key (kernels/launcher.py)


def dequant_linear(x, meta, qweight, scales, qzeros, g_idx, bias) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x's dtype: the dequantized weight through the dense matmul."""
    w = dequantize(meta, qweight, scales, qzeros, g_idx, x.dtype)  # [K, N]
    y = x @ w
    return y + bias.to(y.dtype) if bias is not None else y


def use_dequant(m: int) -> bool:
    """Whether a call of m tokens (m > 16: past the small-M kernels) takes dequantize-then-GEMM."""
    path = prefill_path()
    return path == "dequant" or (path == "auto" and m >= DEQUANT_MIN_M)
