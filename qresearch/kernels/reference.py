"""Pure-torch reference kernels: dequantize + matmul. Used on CPU, for unsupported shapes, and as test ground truth.

The Triton kernels compute the same math in the same order where it matters: weights are dequantized in fp32 as
(q - zero) * scale, rounded once to the activation dtype, and multiplied with fp32 accumulation.
Non-integer formats decode through the format table (quant/formats.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.packing import PackedMeta, unpack_rows, unpack_zeros
from ..quant.primitives import decode
from ..quant.scales import decode_scales, div_rn


def weight_zeros(meta: PackedMeta, qzeros: torch.Tensor | None) -> torch.Tensor:
    """Zero points [out, n_groups] float32 (the format's symmetric zero for layers that store none)."""
    if meta.sym or qzeros is None:
        spec = meta.spec
        return torch.full((meta.out_features, meta.n_groups), spec.format.sym_zero(spec))
    return unpack_zeros(qzeros, meta.bits, meta.out_features)


def weight_scales(meta: PackedMeta, scales: torch.Tensor | None, scale2: torch.Tensor | None) -> torch.Tensor:
    """Effective group scales [out, n_groups] float32: stored floats, or decoded two-level codes; ones for codebooks."""
    if scales is None:
        return torch.ones(meta.out_features, meta.n_groups)
    return decode_scales(scales, scale2, meta.scale_coding)


def dequant_weight(meta: PackedMeta, qweight: torch.Tensor, scales: torch.Tensor | None, qzeros: torch.Tensor | None,
                   g_idx: torch.Tensor | None = None, scale2: torch.Tensor | None = None,
                   lut: torch.Tensor | None = None) -> torch.Tensor:
    """Packed buffers -> float32 weight [out, in]; column j uses group g_idx[j] (or j // group)."""
    spec = meta.spec
    codes = unpack_rows(qweight, meta.bits, meta.in_features)  # [out, in] uint8
    zeros = weight_zeros(meta, qzeros).to(qweight.device)  # [out, n_groups]
    s = weight_scales(meta, scales, scale2).to(qweight.device)  # [out, n_groups]
    lut = None if lut is None else lut.float()
    if g_idx is not None:
        g = g_idx.long()
        lut = lut if lut is None or lut.shape[1] == 1 else lut[:, g]  # [out | 1, in, K]
        return decode(codes, s[:, g], zeros[:, g], spec, lut)  # [out, in]
    n, k, gs = meta.out_features, meta.in_features, meta.group
    codes = F.pad(codes, (0, meta.n_groups * gs - k)).view(n, meta.n_groups, gs)  # [out, n_groups, group]
    lut = None if lut is None else lut[:, :, None, :]  # [out | 1, n_groups | 1, 1, K]
    w = decode(codes, s[:, :, None], zeros[:, :, None], spec, lut)  # [out, n_groups, group]
    return w.reshape(n, -1)[:, :k]  # [out, in]


def wa16_ref(x: torch.Tensor, meta: PackedMeta, qweight, scales, qzeros, g_idx, bias, scale2=None,
             lut=None) -> torch.Tensor:
    """Weight-only quantized linear: y = x @ deq(W)^T + b in x's dtype."""
    w = dequant_weight(meta, qweight, scales, qzeros, g_idx, scale2, lut).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def act_quant_ref(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 activation quantization: x [M, K] -> (q int8 [M, K], scale fp32 [M]).

    Dynamic: one scale per token, absmax / 127 (1.0 for an all-zero row), as the int format's qparams compute it.
    Static: the given per-tensor scale.
    """
    xf = x.float()
    if static_scale is None:
        s = div_rn(xf.abs().amax(dim=1), 127.0)  # [M] IEEE division on every device (quant.scales.div_rn)
        s = torch.where(s > 0, s, torch.ones_like(s))
    else:
        s = static_scale.float().reshape(1).expand(x.shape[0]).to(x.device).contiguous()  # [M]
    q = torch.clamp(torch.round(xf / s[:, None]), -128, 127).to(torch.int8)
    return q, s


def int8_from_codes(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned 8-bit symmetric codes [out, in] (uint8, any strides) -> signed int8 code - 128, i.e. code ^ 0x80
    read as int8: one pass, into `out` (uint8, codes' shape) when given."""
    return torch.bitwise_xor(codes, 0x80, out=out).view(torch.int8)


def int8_weight(meta: PackedMeta, qweight: torch.Tensor) -> torch.Tensor:
    """8-bit symmetric integer codes as signed int8 [out, in] (code - 128)."""
    assert meta.bits == 8 and meta.sym and meta.qformat == "int", "int8 weights need qformat=int, bits=8, sym"
    return int8_from_codes(unpack_rows(qweight, 8, meta.in_features))


def w8a8_ref(x: torch.Tensor, meta: PackedMeta, qweight, scales, bias, static_scale=None) -> torch.Tensor:
    """W8A8: int8 act (per-token or static) x int8 weight (per-channel), exact integer accumulation, rescale."""
    xq, sx = act_quant_ref(x, static_scale)
    wq = int8_weight(meta, qweight)
    acc = xq.double() @ wq.double().t()  # [M, N], exact: |sum| < 2^53
    y = acc.float() * sx[:, None] * scales.float().reshape(1, -1)  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
