"""Quantization primitives: qparams, quantize, dequantize, fake-quant (STE). Pure functions on CPU/GPU tensors.

Every granularity reduces to one layout: a 2-D view [rows, cols] cut into groups along the last dim,
giving qparams [rows, n_groups]. A last partial group is legal; it is padded (for statistics only) by
repeating its own last element, so its min/max are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantSpec

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


@dataclass
class QTensor:
    """Integer (or fp8) codes with their qparams; `shape` is the original tensor shape."""

    codes: torch.Tensor  # same shape as the source, uint8 (int formats) or float8
    scale: torch.Tensor  # [rows, n_groups] float32
    zero: torch.Tensor  # [rows, n_groups] float32 holding integers (int formats), zeros (fp8)
    spec: QuantSpec

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec).to(dtype)


def as_2d(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The 2-D view qparams refer to: per-tensor -> [1, numel], everything else -> [-1, last dim]."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def to_groups(x2d: torch.Tensor, g: int) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, g]; a partial last group is padded with its own last column."""
    rows, cols = x2d.shape
    pad = (-cols) % g
    if pad:
        x2d = torch.cat([x2d, x2d[:, -1:].expand(rows, pad)], dim=1)  # [rows, cols + pad]
    return x2d.reshape(rows, -1, g)  # [rows, n_groups, g]


def from_groups(xg: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, n_groups, g] -> [rows, cols] (drops padding)."""
    return xg.reshape(xg.shape[0], -1)[:, :cols]


def expand_groups(p: torch.Tensor, g: int, cols: int) -> torch.Tensor:
    """Per-group qparams [rows, n_groups] -> per-column [rows, cols]."""
    return p.repeat_interleave(g, dim=1)[:, :cols]


def group_minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per group of the 2-D view: each [rows, n_groups] float32."""
    x2 = as_2d(x, spec).float()
    xg = to_groups(x2, spec.group_for(x2.shape[1]))  # [rows, n_groups, g]
    return xg.amin(dim=-1), xg.amax(dim=-1)


def qparams_from_minmax(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a (possibly clipped) range. Asym ranges are widened to contain 0 so 0.0 is exact."""
    xmin, xmax = xmin.float(), xmax.float()
    if spec.is_fp8:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = torch.where(absmax > 0, absmax / FP8_MAX[spec.fmt], torch.ones_like(absmax))
        return scale, torch.zeros_like(scale)
    qmax = 2**spec.bits - 1
    if spec.sym:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        half = 2 ** (spec.bits - 1)
        scale = absmax / (half - 1) if spec.bits > 2 else absmax / half  # 2-bit sym: levels {-2,-1,0,1}
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, float(half))
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    scale = (xmax - xmin) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-xmin / scale).clamp(0, qmax)
    return scale, zero


def choose_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams for `x` under `spec`: (scale, zero), each [rows, n_groups]."""
    return qparams_from_minmax(*group_minmax(x, spec), spec)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Codes for `x` (same shape): uint8 in [0, 2^bits - 1] for int formats, float8 for fp8."""
    x2 = as_2d(x, spec).float()
    rows, cols = x2.shape
    g = spec.group_for(cols)
    xg = to_groups(x2, g)  # [rows, n_groups, g]
    s, z = scale.float()[..., None], zero.float()[..., None]  # [rows, n_groups, 1]
    if spec.is_fp8:
        q = (xg / s).clamp(-FP8_MAX[spec.fmt], FP8_MAX[spec.fmt]).to(FP8_DTYPES[spec.fmt])
        return from_groups(q.float(), cols).to(FP8_DTYPES[spec.fmt]).reshape(x.shape)
    q = torch.clamp(torch.round(xg / s) + z, 0, 2**spec.bits - 1)
    return from_groups(q, cols).to(torch.uint8).reshape(x.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float32 values (same shape as codes): (q - zero) * scale per group."""
    q2 = as_2d(codes.float(), spec)
    rows, cols = q2.shape
    qg = to_groups(q2, spec.group_for(cols))  # [rows, n_groups, g]
    x = (qg - zero.float()[..., None]) * scale.float()[..., None]
    return from_groups(x, cols).reshape(codes.shape)


def quantize_tensor(x: torch.Tensor, spec: QuantSpec, scale=None, zero=None) -> QTensor:
    """Quantize with given qparams, or min-max ones if none are given."""
    if scale is None:
        scale, zero = choose_qparams(x, spec)
    return QTensor(quantize(x, scale, zero, spec), scale, zero, spec)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale=None, zero=None) -> torch.Tensor:
    """Quantize-dequantize in x's dtype, with a straight-through estimator: d out / d x = 1."""
    if scale is None:
        scale, zero = choose_qparams(x.detach(), spec)
    xq = dequantize(quantize(x.detach(), scale, zero, spec), scale, zero, spec).to(x.dtype)
    return x + (xq - x).detach()
