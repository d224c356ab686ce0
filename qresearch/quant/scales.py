"""How per-group scales are stored: plain 16-bit floats, or codes of a second quantization level.

Two-level scales (VS-Quant; NVFP4; NF4's double quantization; MX's shared exponents) store each group scale as a
small code and, where the code is relative, one float per channel or per tensor (`scale2`):

  kind    group scale stored as                     second level            effective scale
  float   16-bit float (fp16/bf16 in packed layers)  none                    the float
  uint    k-bit unsigned integer c in 1..2^k-1       fp32 per channel/tensor c * scale2
  e4m3    FP8 E4M3 value e (saturating at 448)       fp32 per tensor (g)     e / g   (NVFP4: g = 448 * 6 / amax)
  e8m0    8-bit biased exponent e (E8M0, bias 127)   none                    2^(e - 127)

The effective scale is always exactly decodable from what is stored, so fake-quant, packed layers, footprint and
exports agree bit for bit. Pure functions on CPU/GPU tensors; qparams [rows, n_groups], scale2 [rows or 1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

KINDS = ("float", "uint", "e4m3", "e8m0")
LEVEL2 = ("channel", "tensor")
SCALE2_BITS = 32  # second-level scales are fp32
E4M3_MAX = 448.0


@dataclass(frozen=True)
class ScaleCoding:
    """Storage of the group scales of one tensor: kind, bits per group scale, second level (None, channel, tensor)."""

    kind: str = "float"
    bits: int = 16
    level2: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"scale kind={self.kind!r} is unknown; allowed: {', '.join(KINDS)}")
        if self.level2 is not None and self.level2 not in LEVEL2:
            raise ConfigError(f"scale_level2={self.level2!r} is unknown; allowed: {', '.join(LEVEL2)}")

    @property
    def coded(self) -> bool:
        """Scales are stored as integer codes (uint8 buffers), not floats."""
        return self.kind != "float"

    @property
    def tag(self) -> str:
        """Tag fragment: '' for float scales, -s8ch / -s6t for integer two-level scales (fixed kinds show nothing)."""
        if self.kind != "uint":
            return ""
        return f"-s{self.bits}{'ch' if self.level2 == 'channel' else 't'}"


def div_rn(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c rounded as IEEE division on every device. torch's CUDA division by a Python number multiplies by its
    reciprocal (one ulp off for c = 15, 7, ...), so scales on a GPU would differ from the CPU's and from
    reference implementations that divide by a device tensor; a one-element tensor on t's device divides truly."""
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


def level2_of(raw: torch.Tensor, c: ScaleCoding) -> torch.Tensor | None:
    """Second-level scale from raw float group scales [rows, n_groups]: [rows, 1] (channel) or [1, 1] (tensor)."""
    if c.level2 is None:
        return None
    top = raw.float().amax(dim=-1, keepdim=True) if c.level2 == "channel" else raw.float().amax().reshape(1, 1)
    top = torch.where(top > 0, top, torch.ones_like(top))
    if c.kind == "uint":
        return div_rn(top, 2**c.bits - 1)
    if c.kind == "e4m3":
        return E4M3_MAX / top  # a divisor, as NVFP4's global scale (compressed-tensors: scale / global_scale)
    raise ConfigError(f"scale kind {c.kind} takes no second-level scale")


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round to FP8 E4M3 (saturating at +-448) and back to float32; zero scales become the smallest subnormal."""
    q = v.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return torch.where(q > 0, q, torch.full_like(q, 2.0**-9))


def encode_scales(scale: torch.Tensor, scale2: torch.Tensor | None, c: ScaleCoding) -> torch.Tensor:
    """uint8 codes of (already representable or raw) float scales; float kind returns the scales unchanged."""
    if c.kind == "uint":
        return torch.round(scale.float() / scale2).clamp(1, 2**c.bits - 1).to(torch.uint8)
    if c.kind == "e4m3":
        return _e4m3(scale.float() * scale2).to(torch.float8_e4m3fn).view(torch.uint8)
    if c.kind == "e8m0":
        e = torch.floor(torch.log2(scale.float().clamp_min(2.0**-127)))
        return (e + 127).clamp(0, 254).to(torch.uint8)
    return scale


def decode_scales(codes: torch.Tensor, scale2: torch.Tensor | None, c: ScaleCoding) -> torch.Tensor:
    """float32 effective scales of stored codes (float kind: the stored floats)."""
    if c.kind == "uint":
        return codes.float() * scale2.float()
    if c.kind == "e4m3":
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).float() / scale2.float()
    if c.kind == "e8m0":
        return torch.exp2(codes.float() - 127)
    return codes.float()


def code_scales(raw: torch.Tensor, scale2: torch.Tensor | None, c: ScaleCoding) -> torch.Tensor:
    """Raw float scales -> the nearest representable effective scales (float kind: unchanged)."""
    if not c.coded:
        return raw.float()
    return decode_scales(encode_scales(raw, scale2, c), scale2, c)
