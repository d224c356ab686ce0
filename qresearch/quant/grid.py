"""Grid formats: every code decodes to a fixed table value times its group's scale (FP8, FP4 E2M1, MXFP4, NVFP4,
NF4). Encoding rounds x / scale (computed in float64) to the nearest table value, ties to the even code (IEEE
round-to-nearest-even for the float formats), and saturates beyond the largest value (never infinity).
"""
from __future__ import annotations

import torch

from .format_base import NumericFormat
from .scales import ScaleCoding, div_rn

# FP4 E2M1 magnitudes of codes 0..7 (bit 3 = sign), the OCP MX / NVFP4 / compressed-tensors code assignment
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NF4_OFFSET = 0.9677083  # QLoRA's outermost quantile: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def e2m1_table() -> torch.Tensor:
    """Value of each 4-bit code [16] float64 (code 8 is -0)."""
    mag = torch.tensor(E2M1, dtype=torch.float64)
    return torch.cat([mag, -mag])


def nf4_table() -> torch.Tensor:
    """NF4 levels [16] float64 (sorted, zero at code 7): 8 positive and 7 negative normal quantiles plus an exact
    zero, normalised to [-1, 1] (Dettmers et al. 2023), rounded to float32 as they are stored."""
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 quantiles
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 quantiles
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (v / v.max()).float().double()


def fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """Value of each of the 256 bit patterns of a float8 dtype [256] float64 (inf / nan included)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).double()


class GridFormat(NumericFormat):
    """Codes -> table[code] * scale (symmetric, scale = absmax / largest value). Subclasses give `table()`."""

    sym_only = True

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def _grid(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted distinct finite values, their codes, midpoints) in float64, cached per device."""
        cache = self.__dict__.setdefault("_cache", {})
        if device not in cache:
            t = self.table()
            codes = torch.arange(t.numel())
            keep = torch.isfinite(t) & ~((t == 0) & (codes != int((t == 0).nonzero()[0])))  # one zero code
            vals, order = t[keep].sort()
            cache[device] = (vals.to(device), codes[keep][order].to(device), ((vals[1:] + vals[:-1]) / 2).to(device))
        return cache[device]

    @property
    def max_level(self) -> float:
        return float(self.table()[torch.isfinite(self.table())].abs().max())

    def half_levels(self, spec):
        return int((self.table() > 0).sum())

    def qparams(self, xmin, xmax, spec, scale2=None):
        absmax = torch.maximum(xmin.abs(), xmax.abs()).float()
        raw = torch.where(absmax > 0, div_rn(absmax, self.max_level), torch.ones_like(absmax))
        return self.coded_scale(raw, spec, scale2), torch.zeros_like(raw)

    def encode(self, x, scale, zero, spec):
        vals, codes, mids = self._grid(x.device)
        r = x.double() / scale.double()
        idx = torch.bucketize(r, mids)  # mids[idx-1] < r <= mids[idx]; beyond the ends -> the end values
        tie = (idx < mids.numel()) & (r == mids[idx.clamp(max=mids.numel() - 1)])
        idx = torch.where(tie & (codes[idx] % 2 == 1), idx + 1, idx)  # ties to the even code
        return codes[idx].to(torch.uint8)

    def decode(self, codes, scale, zero, spec):
        table = self.__dict__.setdefault("_t32", {})
        if codes.device not in table:
            table[codes.device] = self.table().float().to(codes.device)
        return table[codes.device][codes.long()] * scale

    def saturated(self, x, scale, zero, spec):
        return (x.double() / scale.double()).abs() > self.max_level


class FP8Format(GridFormat):
    """8-bit floats with one scale per group: s = absmax / max_normal, codes = the float8 bit pattern of the nearest
    value. E4M3 (fn) has no infinity and saturates at 448; E5M2 has infinities (codes 0x7C / 0xFC decode to +-inf)
    but the encoder saturates at 57344 and never produces them."""

    bits_allowed = (8,)
    ct_type = "float"
    act_ok = True

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def table(self):
        return fp8_table(self.dtype)

    @property
    def max_level(self) -> float:
        return float(torch.finfo(self.dtype).max)

    def half_levels(self, spec):
        return 2**7


class FP4Format(GridFormat):
    """FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6) with a 16-bit float scale per group
    (absmax / 6); two-level integer scales with scale_bits."""

    name = "fp4_e2m1"
    bits_allowed = (4,)

    def table(self):
        return e2m1_table()


class MXFP4Format(FP4Format):
    """OCP MXFP4: E2M1 elements in blocks of 32 sharing a power-of-two scale stored as E8M0 (8 bits):
    scale = 2^(floor(log2(absmax)) - 2), the OCP MX v1.0 rule (2 = E2M1's largest exponent); values above 6 * scale
    (up to 8 * scale) saturate to 6 * scale."""

    name = "mxfp4"
    ct_type = "float"
    default_scales = ScaleCoding("e8m0", 8, None)
    fixed_scales = True
    group_required = 32

    def qparams(self, xmin, xmax, spec, scale2=None):
        absmax = torch.maximum(xmin.abs(), xmax.abs()).float()
        e = torch.floor(torch.log2(absmax.clamp_min(2.0**-125))) - 2
        scale = torch.where(absmax > 0, torch.exp2(e.clamp(-127, 127)), torch.ones_like(absmax))
        return scale, torch.zeros_like(scale)


class NVFP4Format(FP4Format):
    """NVIDIA NVFP4: E2M1 elements in blocks of 16 with an FP8 E4M3 block scale and one FP32 per-tensor scale g:
    effective scale = e4m3(absmax_block / 6 * g) / g with g = 448 * 6 / absmax_tensor."""

    name = "nvfp4"
    ct_type = "float"
    default_scales = ScaleCoding("e4m3", 8, "tensor")
    fixed_scales = True
    group_required = 16


class NF4Format(GridFormat):
    """NormalFloat4 (QLoRA): 16 levels at normal quantiles, absmax scale per group. Double quantization by default:
    group scales stored as 8-bit integers against one fp32 scale per tensor (QLoRA: 8-bit floats per 256 scales;
    uniform 8-bit codes lose < 0.1% relative weight error here); scale_bits=16: plain float scales."""

    name = "nf4"
    bits_allowed = (4,)
    default_scales = ScaleCoding("uint", 8, "tensor")

    def table(self):
        return nf4_table()
