"""Numeric formats as data: the table every quantizer, module, kernel, footprint and export reads.

A format maps real values to unsigned integer codes (uint8, < 2^code_bits) given per-group qparams and back; the
interface is quant/format_base.py, grid formats (FP8, FP4, MX, NV, NF4) are quant/grid.py, fitted formats (k-means
codebooks, binary, ternary) quant/fitted.py, two-level scale storage quant/scales.py.
Adding a format = one entry in FORMATS (a NumericFormat subclass instance); see tests/test_formats.py.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .fitted import BinaryFormat, KMeansFormat, TernaryFormat
from .format_base import LayerParams, NumericFormat, QParams
from .grid import FP4Format, FP8Format, MXFP4Format, NF4Format, NVFP4Format
from .scales import div_rn

__all__ = ["FORMATS", "LayerParams", "NumericFormat", "QParams", "get_format"]


class IntFormat(NumericFormat):
    """Uniform integers: q = clamp(round(x / s) + z, 0, 2^b - 1), x = (q - z) s. Codes are stored unsigned;
    symmetric layers use z = 2^(b-1) and store no zero points (2-bit sym has levels {-2, -1, 0, 1})."""

    name = "int"
    bits_allowed = tuple(range(2, 9))
    ct_type = "int"
    int_codes = True
    act_ok = True

    def zero_bits(self, spec):
        return 0 if spec.sym else spec.bits

    def sym_zero(self, spec):
        return float(2 ** (spec.bits - 1))

    def half_levels(self, spec):
        return 2 ** (spec.bits - 1) - 1

    def qparams(self, xmin, xmax, spec, scale2=None):
        xmin, xmax = xmin.float(), xmax.float()
        qmax = 2**spec.bits - 1
        if spec.sym:
            absmax = torch.maximum(xmin.abs(), xmax.abs())
            half = 2 ** (spec.bits - 1)
            scale = div_rn(absmax, half - 1) if spec.bits > 2 else absmax / half  # half: a power of 2
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            return self.coded_scale(scale, spec, scale2), torch.full_like(scale, float(half))
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)  # the range holds 0, so 0.0 is exact
        scale = div_rn(xmax - xmin, qmax)
        scale = self.coded_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), spec, scale2)
        return scale, torch.round(-xmin / scale).clamp(0, qmax)

    def encode(self, x, scale, zero, spec):
        return torch.clamp(torch.round(x.float() / scale) + zero, 0, 2**spec.bits - 1).to(torch.uint8)

    def decode(self, codes, scale, zero, spec):
        return (codes.float() - zero) * scale

    def saturated(self, x, scale, zero, spec):
        q = torch.round(x.float() / scale) + zero
        return (q < 0) | (q > 2**spec.bits - 1)


FORMATS: dict[str, NumericFormat] = {
    "int": IntFormat(),
    "fp8_e4m3": FP8Format("fp8_e4m3", torch.float8_e4m3fn),
    "fp8_e5m2": FP8Format("fp8_e5m2", torch.float8_e5m2),
    "fp4_e2m1": FP4Format(),
    "mxfp4": MXFP4Format(),
    "nvfp4": NVFP4Format(),
    "nf4": NF4Format(),
    "kmeans": KMeansFormat(),
    "binary": BinaryFormat(),
    "ternary": TernaryFormat(),
}


def get_format(name: str) -> NumericFormat:
    """The table entry for `name`, or a one-line error listing the formats."""
    if name not in FORMATS:
        raise ConfigError(f"qformat={name!r} is unknown; allowed: {', '.join(FORMATS)}")
    return FORMATS[name]
