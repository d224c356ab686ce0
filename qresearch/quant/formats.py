"""Numeric formats as data: the table every quantizer, module, kernel, footprint and export reads.

A format maps real values to unsigned integer codes (uint8, < 2^code_bits) given per-group qparams
(scale, zero), and back. All functions are elementwise with broadcasting qparams, so the same code
quantizes a group tensor [rows, n_groups, g], one GPTQ column [out] or an activation row.
Adding a format = one entry in FORMATS (a NumericFormat subclass instance); see tests/test_formats.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from .spec import QuantSpec


class NumericFormat:
    """Base: a name, the bit widths it allows, and the math. Subclasses override the methods below."""

    name = "base"
    bits_allowed: tuple[int, ...] = ()
    sym_only = False  # scaling is symmetric by construction (a spec asking for asym is made sym)
    ct_type: str | None = None  # compressed-tensors QuantizationArgs.type, None = not expressible
    int_codes = False  # codes are two's-complement-offset integers usable by integer kernels

    def validate(self, spec: "QuantSpec") -> None:
        if spec.bits not in self.bits_allowed:
            allowed = ", ".join(map(str, self.bits_allowed))
            raise ConfigError(f"bits={spec.bits} does not fit qformat={self.name}; allowed: {allowed}"
                              f"{' (or 16 for no quantization)' if self.int_codes else ''}")

    def code_bits(self, spec: "QuantSpec") -> int:
        """Bits one stored code takes."""
        return spec.bits

    def scale_bits(self, spec: "QuantSpec") -> int:
        """Bits one stored scale takes."""
        return 16

    def zero_bits(self, spec: "QuantSpec") -> int:
        """Bits one stored zero point takes (0: none stored)."""
        return 0

    def sym_zero(self, spec: "QuantSpec") -> float:
        """Zero point implied when none is stored (symmetric)."""
        return 0.0

    def half_levels(self, spec: "QuantSpec") -> int:
        """Positive quantization steps of a symmetric range (what clipping searches trade off)."""
        raise NotImplementedError

    def qparams(self, xmin: torch.Tensor, xmax: torch.Tensor, spec: "QuantSpec") -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per group from a (possibly clipped) range; float32, same shape as xmin."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
        """uint8 codes of x (qparams broadcast against x)."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
        """float32 values of codes."""
        raise NotImplementedError

    def saturated(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: "QuantSpec") -> torch.Tensor:
        """bool: x lies beyond the grid's range (its error exceeds rounding: it was clamped)."""
        raise NotImplementedError

    def levels(self, spec: "QuantSpec") -> torch.Tensor:
        """Every code decoded at scale 1 and the implied zero: [2^code_bits] float32 (for tests and tables)."""
        codes = torch.arange(2 ** self.code_bits(spec), dtype=torch.int32).to(torch.uint8)
        one = torch.ones(())
        return self.decode(codes, one, torch.full((), self.sym_zero(spec)), spec)


class IntFormat(NumericFormat):
    """Uniform integers: q = clamp(round(x / s) + z, 0, 2^b - 1), x = (q - z) s. Codes are stored unsigned;
    symmetric layers use z = 2^(b-1) and store no zero points (2-bit sym has levels {-2, -1, 0, 1})."""

    name = "int"
    bits_allowed = tuple(range(2, 9))
    ct_type = "int"
    int_codes = True

    def zero_bits(self, spec):
        return 0 if spec.sym else spec.bits

    def sym_zero(self, spec):
        return float(2 ** (spec.bits - 1))

    def half_levels(self, spec):
        return 2 ** (spec.bits - 1) - 1

    def qparams(self, xmin, xmax, spec):
        xmin, xmax = xmin.float(), xmax.float()
        qmax = 2**spec.bits - 1
        if spec.sym:
            absmax = torch.maximum(xmin.abs(), xmax.abs())
            half = 2 ** (spec.bits - 1)
            scale = absmax / (half - 1) if spec.bits > 2 else absmax / half
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return scale, torch.full_like(scale, float(half))
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)  # the range holds 0, so 0.0 is exact
        scale = (xmax - xmin) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.round(-xmin / scale).clamp(0, qmax)

    def encode(self, x, scale, zero, spec):
        return torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**spec.bits - 1).to(torch.uint8)

    def decode(self, codes, scale, zero, spec):
        return (codes.float() - zero) * scale

    def saturated(self, x, scale, zero, spec):
        q = torch.round(x.float() / scale) + zero
        return (q < 0) | (q > 2**spec.bits - 1)


class FP8Format(NumericFormat):
    """8-bit floats with one scale per group: s = absmax / max_normal, codes = the float8 bit pattern of
    clamp(x / s) (saturating: values beyond the range clamp to +-max; E5M2's infinities are never produced)."""

    bits_allowed = (8,)
    sym_only = True
    ct_type = "float"

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype, self.max = name, dtype, float(torch.finfo(dtype).max)

    def half_levels(self, spec):
        return 2**7

    def qparams(self, xmin, xmax, spec):
        absmax = torch.maximum(xmin.abs(), xmax.abs()).float()
        scale = torch.where(absmax > 0, absmax / self.max, torch.ones_like(absmax))
        return scale, torch.zeros_like(scale)

    def encode(self, x, scale, zero, spec):
        return (x.float() / scale).clamp(-self.max, self.max).to(self.dtype).view(torch.uint8)

    def decode(self, codes, scale, zero, spec):
        return codes.to(torch.uint8).view(self.dtype).float() * scale

    def saturated(self, x, scale, zero, spec):
        return (x.float() / scale).abs() > self.max


FORMATS: dict[str, NumericFormat] = {
    "int": IntFormat(),
    "fp8_e4m3": FP8Format("fp8_e4m3", torch.float8_e4m3fn),
    "fp8_e5m2": FP8Format("fp8_e5m2", torch.float8_e5m2),
}


def get_format(name: str) -> NumericFormat:
    """The table entry for `name`, or a one-line error listing the formats."""
    if name not in FORMATS:
        raise ConfigError(f"qformat={name!r} is unknown; allowed: {', '.join(FORMATS)}")
    return FORMATS[name]
