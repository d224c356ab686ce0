"""int8 x int8 -> int32 matrix products: `torch._int_mm` (CPU: any shape; CUDA: M > 16, K and N multiples of 8)
and an exact emulation (float64 products of int8 values: exact while |sum| < 2^53, i.e. K < 2^38).

Used by the packed W8A8 layers (registered in kernels/dispatch.py as `torch_int_mm`), LLM.int8()'s decomposition
and the integer-only linear. `int8_matmul` returns which path ran, so callers can record it.
"""
from __future__ import annotations

import torch

from ..quant.packing import PackedMeta


def int_mm_why_not(device: torch.device, m: int, k: int, n: int) -> str | None:
    """Why torch._int_mm cannot run this product here (None: it can)."""
    if not hasattr(torch, "_int_mm"):
        return f"torch {torch.__version__} has no torch._int_mm"
    if device.type == "cuda" and (m <= 16 or k % 8 or n % 8):
        return f"CUDA torch._int_mm needs M > 16 and K, N multiples of 8 (got M={m}, K={k}, N={n})"
    if device.type == "cpu" and k < 2:  # torch 2.13's CPU op returns unrelated values at K = 1 (tests/test_cpu_int8)
        return f"CPU torch._int_mm gives wrong sums for K = {k} (K >= 2 is exact)"
    if device.type not in ("cpu", "cuda"):
        return f"device {device.type}"
    return None


def int8_matmul_emulated(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b_t [K, N] int8 -> int32 [M, N], exactly (float64 products and sums of integers)."""
    acc = a.double() @ b_t.double()  # exact: every partial sum is an integer below 2^53
    return acc.to(torch.int32)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """a [M, K] int8 @ b_t [K, N] int8 -> (int32 [M, N], 'int_mm' | 'emulated: <why>')."""
    assert a.dtype == torch.int8 and b_t.dtype == torch.int8, f"int8 inputs expected, got {a.dtype}, {b_t.dtype}"
    why = int_mm_why_not(a.device, a.shape[0], a.shape[1], b_t.shape[1])
    if why is None:
        return torch._int_mm(a.contiguous(), b_t), "int_mm"
    return int8_matmul_emulated(a, b_t), f"emulated: {why}"


def prepare_int8_weight(meta: PackedMeta, codes: torch.Tensor, scales, zeros, perm, dtype) -> torch.Tensor:
    """uint8 codes [out, in] of a sym 8-bit layer -> signed int8 [out, in] (code - 128), made once per layer
    (cpu_packed.prepared_for keeps it while the layer's buffers are unchanged)."""
    assert meta.bits == 8 and meta.sym and meta.qformat == "int" and perm is None, "W8A8 needs sym int8, no g_idx"
    from .reference import int8_from_codes

    return int8_from_codes(codes).contiguous()


def w8a8_int_mm(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 layer of kernels/reference.w8a8_ref with torch._int_mm as the integer product (same math);
    wq: the layer's int8 weight [out, in] (prepare_int8_weight)."""
    from .reference import act_quant_ref

    xq, sx = act_quant_ref(x, static_scale)  # [M, K] int8, [M]
    acc = torch._int_mm(xq, wq.t())  # [M, N] int32; the transposed view is the fast layout for the CPU op
    return w8a8_epilogue(acc, sx, scales, bias, x.dtype)


def w8a8_epilogue(acc: torch.Tensor, sx: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """Integer sums acc [M, N] -> y [M, N] in `dtype`: acc * x scale [M] * weight scale [N] (+ bias), in fp32."""
    y = acc.float() * sx[:, None] * scales.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)
