"""torch's own CPU weight-packed ops as kernels for our packed layers (bf16 activations; see cpu_packed.py).

  int4: aten._weight_int4pack_mm_for_cpu dequantizes (q - 8) * scale + zero per group of 32/64/128/256 input
        columns; zero = (8 - z) * s gives our (q - z) * s. For bits <= 3 the codes are stored as q - z + 8 (in
        [1, 15]) with zero = 0, which avoids rounding a large zero term to bf16.
  int8: aten._weight_int8pack_mm is y = (x @ w^T) * scale per output channel; w = q - 2^(b-1) as int8, and
        asymmetric layers add rowsum(x) * (2^(b-1) - z) * s.
Each prepare_* takes unsigned codes [out, in] (act-order columns already permuted), scales and zero points
[out, n_groups], and returns the op's layout once; *_linear(x, prepared, bias) runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant.packing import PackedMeta

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
INT8_K_MULTIPLE = 16  # torch 2.13's bf16 _weight_int8pack_mm segfaults for M > 1 when in_features % 16 != 0


def int4_op_group(meta: PackedMeta) -> int | None:
    """Group length for the int4 op: divides our group, so no op group straddles two of ours (None: none does)."""
    if meta.n_groups == 1:  # per-channel: any op group works (K is padded up to a multiple of it)
        return next((g for g in INT4_GROUPS if meta.in_features % g == 0), INT4_GROUPS[-1])
    return next((g for g in INT4_GROUPS if meta.group % g == 0), None)


def x_in(x: torch.Tensor, perm: torch.Tensor | None, k_pad: int) -> torch.Tensor:
    """x [M, in] -> [M, k_pad] contiguous: act-order columns permuted, padded columns zero (they meet pad codes)."""
    x = x if perm is None else x[:, perm]
    return (F.pad(x, (0, k_pad - x.shape[1])) if k_pad != x.shape[1] else x).contiguous()


@dataclass(frozen=True)
class Int4Prepared:
    weight: torch.Tensor  # uint8 [n_pad, k_pad / 2], the op's layout
    scale_zero: torch.Tensor  # [k_pad / op_group, n_pad, 2] in the activation dtype: (scale, zero term)
    op_group: int
    out_features: int
    perm: torch.Tensor | None


def prepare_int4(meta: PackedMeta, codes, scales, zeros, perm, dtype: torch.dtype) -> Int4Prepared:
    gs_op = int4_op_group(meta)
    n, k = meta.out_features, meta.in_features
    n_pad, k_pad = -(-n // 16) * 16, -(-k // gs_op) * gs_op  # the op wants out % 16 == 0, in % group == 0
    codes, z = codes.to(torch.int32), zeros
    if meta.bits <= 3:  # q - z + 8 lies in [1, 15]: the op's own offset is the zero point, exactly
        codes = codes + 8 - z.to(torch.int32)[:, torch.arange(k) // meta.group]  # [out, in]
        z = torch.full_like(z, 8.0)
    codes = F.pad(codes, (0, k_pad - k, 0, n_pad - n), value=8)  # [n_pad, k_pad]
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # innerKTiles: unused by the CPU op
    col_group = torch.clamp(torch.arange(0, k_pad, gs_op) // meta.group, max=meta.n_groups - 1)  # [k_pad/gs_op]
    s = scales.float()[:, col_group]  # [out, k_pad / gs_op]
    zero = (8.0 - z[:, col_group]) * s  # exact in fp32 (small int x 16-bit scale); 0 for sym 4-bit and bits <= 3
    sz = F.pad(torch.stack([s.t(), zero.t()], dim=-1), (0, 0, 0, n_pad - n))  # [k_pad / gs_op, n_pad, 2]
    return Int4Prepared(weight, sz.to(dtype).contiguous(), gs_op, n, perm)


def int4_linear(x: torch.Tensor, p: Int4Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    xin = x_in(x, p.perm, p.scale_zero.shape[0] * p.op_group)  # [M, k_pad]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xin, p.weight, p.op_group, p.scale_zero)  # [M, n_pad]
    y = y[:, :p.out_features]
    return y if bias is None else y + bias.to(y.dtype)


@dataclass(frozen=True)
class Int8Prepared:
    weight: torch.Tensor  # int8 [out, k_pad]: code - 2^(bits-1), zero-padded columns
    scale: torch.Tensor  # [out] in the activation dtype
    shift: torch.Tensor | None  # fp32 [out]: (2^(bits-1) - z) * scale; None for symmetric layers
    perm: torch.Tensor | None


def prepare_int8(meta: PackedMeta, codes, scales, zeros, perm, dtype: torch.dtype) -> Int8Prepared:
    mid, k = 2 ** (meta.bits - 1), meta.in_features
    weight = (codes.to(torch.int16) - mid).to(torch.int8)  # [out, in]
    weight = F.pad(weight, (0, -k % INT8_K_MULTIPLE))  # [out, k_pad]: zero columns meet zero activations
    s = scales.float()[:, 0]  # [out]
    shift = None if meta.sym else (mid - zeros[:, 0]) * s
    return Int8Prepared(weight.contiguous(), s.to(dtype), shift, perm)


def int8_linear(x: torch.Tensor, p: Int8Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    xin = x_in(x, p.perm, p.weight.shape[1])  # [M, k_pad]
    y = torch.ops.aten._weight_int8pack_mm(xin, p.weight, p.scale)  # [M, out]
    if p.shift is not None:
        y = (y.float() + xin.float().sum(dim=1, keepdim=True) * p.shift).to(x.dtype)  # [M, out]
    return y if bias is None else y + bias.to(y.dtype)
