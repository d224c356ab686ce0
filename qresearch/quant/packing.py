"""Packing codes into int32 storage (the layer between primitives and QuantLinear).

Layout "int32_k" (the only storage layout; the Triton kernels read it directly):
  each row of unsigned codes is one dense little-endian bit stream along its columns; code j of a row occupies
  bits [j*b, j*b + b) of the stream, word w holds stream bits [32w, 32w + 32). A row of C codes takes
  ceil(C * b / 32) int32 words, so storage is exactly b bits per code up to the row's last word.
  For b in {1, 2, 4, 8} no code straddles a word (32 / b codes per word); for b = 3 (and 5..7) some codes span two
  words. This is bit-for-bit the compressed-tensors "pack-quantized" weight_packed layout (codes stored unsigned,
  i.e. signed value + 2^(b-1)), so export is a copy.

Codes of every numeric format are unsigned integers < 2^code_bits (quant/formats.py), so every format packs the
same way; `PackedMeta.qformat` says how to decode them.
Scales are stored in fp16 (bf16 for bf16 models) as [out, n_groups], or as uint8 codes of a two-level scale coding
(quant/scales.py) with an fp32 `scale2` [out | 1, 1]; asymmetric zero points are packed with the same bit stream
along the out dim, [ceil(out * b / 32), n_groups]; symmetric layers store no zeros (2^(b-1)). Codebook formats store
their palette `lut` [out | 1, n_groups | 1, K] in fp16 and no scales. For 4-bit codes the stream's bytes are
compressed-tensors' nvfp4 / mxfp4 `weight_packed` (two codes per byte, low nibble first).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantSpec

LAYOUT = "int32_k"
PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class PackedMeta:
    """Static description of one packed weight (what a kernel needs besides the buffers)."""

    bits: int  # bits per stored code
    group: int  # effective group length along `in` (in_features for per-channel)
    in_features: int
    out_features: int
    sym: bool
    layout: str = LAYOUT
    qformat: str = "int"
    scale_bits: int | None = None  # QuantSpec.scale_bits (None = the format's default scale storage)
    scale_level2: str = "channel"
    lut_shape: tuple[int, ...] | None = None  # codebook formats: palette shape [out | 1, n_groups | 1, K]

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group)

    @property
    def spec(self) -> QuantSpec:
        """The weight spec these codes decode with (contiguous groups of `group` columns)."""
        return QuantSpec(bits=self.bits, group_size=self.group, sym=self.sym, granularity="group",
                         qformat=self.qformat, scale_bits=self.scale_bits, scale_level2=self.scale_level2)

    @property
    def scale_coding(self):
        """How the scales buffer stores group scales (quant/scales.py)."""
        spec = self.spec
        return spec.format.scale_coding(spec)


def packed_words(cols: int, bits: int) -> int:
    """int32 words per row of `cols` codes."""
    return -(-cols * bits // 32)


def _check_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"bits={bits} cannot be packed; allowed: {PACK_BITS}")


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [rows, cols] (values < 2^bits) -> int32 [rows, ceil(cols * bits / 32)] dense bit stream."""
    _check_bits(bits)
    assert codes.dim() == 2, f"pack_rows wants [rows, cols], got {tuple(codes.shape)}"
    rows, cols = codes.shape
    v = codes.to(torch.int64)
    assert int(v.min()) >= 0 and int(v.max()) < 2**bits, f"codes out of range for {bits} bits"
    pad = (-cols) % 32
    v = torch.nn.functional.pad(v, (0, pad)).reshape(rows, -1, 32)  # [rows, n_blocks, 32]: 32 codes -> `bits` words
    words = torch.zeros(rows, v.shape[1], bits + 1, dtype=torch.int64, device=codes.device)  # +1: overflow slot
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        words[:, :, word] |= (v[:, :, j] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code's high bits spill into the next word
            words[:, :, word + 1] |= v[:, :, j] >> (32 - shift)
    words = words[:, :, :bits].reshape(rows, -1)[:, :packed_words(cols, bits)]  # [rows, n_words]
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [rows, n_words] -> uint8 codes [rows, cols]."""
    _check_bits(bits)
    rows, n_words = packed.shape
    assert n_words == packed_words(cols, bits), f"{n_words} words cannot hold {cols} codes of {bits} bits"
    if 32 % bits == 0:  # no code straddles a word: split every word at once (the mask drops sign extension)
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)  # [32 / bits]
        codes = (packed[:, :, None] >> shifts) & (2**bits - 1)  # [rows, n_words, 32 / bits]
        return codes.reshape(rows, -1)[:, :cols].to(torch.uint8)  # [rows, cols]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    n_blocks = -(-cols // 32)
    w = torch.nn.functional.pad(w, (0, n_blocks * bits + 1 - n_words)).long()  # [rows, n_blocks*bits + 1]
    stream = w[:, : n_blocks * bits].reshape(rows, n_blocks, bits)  # [rows, n_blocks, bits]
    nxt = torch.cat([stream[:, :, 1:], w[:, bits::bits][:, :n_blocks, None]], dim=2)  # word after each word
    mask = 2**bits - 1
    out = torch.empty(rows, n_blocks, 32, dtype=torch.int64, device=packed.device)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        val = stream[:, :, word] >> shift
        if shift + bits > 32:
            val = val | (nxt[:, :, word] << (32 - shift))
        out[:, :, j] = val & mask
    return out.reshape(rows, -1)[:, :cols].to(torch.uint8)  # [rows, cols]


def pack_zeros(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued float zero points [out, n_groups] -> int32 [ceil(out * bits / 32), n_groups]: each group's
    column of zeros is one bit stream along `out` (compressed-tensors packs zero points along dim 0 too)."""
    return pack_rows(zero.round().to(torch.int64).t(), bits).t().contiguous()  # [words(out), n_groups]


def unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of pack_zeros, as float32 [out, n_groups]."""
    return unpack_rows(qzeros.t(), bits, out_features).t().float()  # [out, n_groups]


def scale_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    """Scales are 16-bit: bf16 for bf16 models (range), fp16 otherwise (precision)."""
    return torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16
