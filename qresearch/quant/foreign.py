"""Other tools' packed weight layouts -> our codes and qparams (pure tensor math, no files).

compressed-tensors "pack-quantized" (llm-compressor): weight_packed int32 [out, ceil(in*b/32)] is our int32_k
  layout bit for bit (codes = signed value + 2^(b-1)); weight_zero_point int32 [ceil(out*b/32), n_groups] likewise;
  weight_scale [out, n_groups]; optional weight_g_idx [in] (act-order).
GPTQ (AutoGPTQ / GPTQModel, checkpoint_format gptq | gptq_v2): qweight int32 [ceil(in*b/32), out], a dense
  little-endian bit stream along `in` per output column (3-bit codes straddle words), codes unsigned; qzeros int32
  [n_groups, ceil(out*b/32)] streamed along `out`, stored minus one in the v1 format (read as (stored + 1) mod 2^b;
  AutoGPTQ wrote a zero point of 0 as -1 over its neighbours, which no reader can undo); scales [n_groups, out];
  g_idx int32 [in].
AWQ GEMM (AutoAWQ, version gemm): 4-bit only; qweight int32 [in, out/8] and qzeros int32 [n_groups, out/8], eight
  output columns per word in the order (0, 2, 4, 6, 1, 3, 5, 7) (nibble i holds column 8w + ORDER[i]);
  scales [n_groups, out]; weight = (q - zero) * scale.
"""
from __future__ import annotations

import torch

from .packing import unpack_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_FORMATS = ("gptq", "gptq_v2")


def gptq_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """GPTQ qweight [words(in), out] -> unsigned codes [out, in] uint8 (the stream runs down each column)."""
    return unpack_rows(qweight.t().contiguous(), bits, in_features)  # [out, in]


def gptq_zeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """GPTQ qzeros [n_groups, words(out)] -> zero points [out, n_groups] float32 (v1 stores zero - 1)."""
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"GPTQ checkpoint_format={checkpoint_format!r} is unknown; allowed: {', '.join(GPTQ_FORMATS)}")
    z = unpack_rows(qzeros, bits, out_features).to(torch.int64)  # [n_groups, out]
    if checkpoint_format == "gptq":
        z = (z + 1) % (2**bits)
    return z.t().float()  # [out, n_groups]


def contiguous_groups(g_idx: torch.Tensor | None, group: int, in_features: int) -> torch.Tensor | None:
    """None when g_idx is the plain j // group assignment (no act-order), else g_idx as int32."""
    if g_idx is None:
        return None
    plain = torch.arange(in_features, dtype=torch.int64) // group
    return None if torch.equal(g_idx.to(torch.int64).cpu(), plain) else g_idx.to(torch.int32)


def awq_unpack(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """AWQ GEMM words [rows, out/8] -> 4-bit values [rows, out] int64, undoing the interleaved column order."""
    rows, words = packed.shape
    assert words * 8 == out_features, f"AWQ packs 8 columns per word: {words} words != {out_features} / 8"
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)  # [8]: nibble i at bits 4i
    nib = (packed.to(torch.int64)[:, :, None] >> shifts) & 0xF  # [rows, words, 8]
    out = torch.empty_like(nib)
    out[:, :, list(AWQ_ORDER)] = nib  # nibble i -> column ORDER[i] of its word
    return out.reshape(rows, out_features)  # [rows, out]


def awq_codes(qweight: torch.Tensor, out_features: int) -> torch.Tensor:
    """AWQ qweight [in, out/8] -> codes [out, in] uint8."""
    return awq_unpack(qweight, out_features).t().contiguous().to(torch.uint8)  # [out, in]


def awq_zeros(qzeros: torch.Tensor, out_features: int) -> torch.Tensor:
    """AWQ qzeros [n_groups, out/8] -> zero points [out, n_groups] float32."""
    return awq_unpack(qzeros, out_features).t().float()  # [out, n_groups]
