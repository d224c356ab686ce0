"""Quantization primitives: qparams, quantize, dequantize, fake-quant (STE). Pure functions on CPU/GPU tensors.

Every granularity reduces to one layout: a 2-D view [rows, cols] cut into groups along the last dim,
giving qparams [rows, n_groups]. A last partial group is legal; it is padded (for statistics only) by
repeating its own last element, so its min/max are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantSpec


@dataclass
class QTensor:
    """Codes (uint8, < 2^code_bits of the spec's format) with their qparams; `shape` is the source's shape.

    `g_idx` [in] (act-order GPTQ) gives the group of each input column when groups are not contiguous; it
    travels with the codes so every dequantization honours it.
    """

    codes: torch.Tensor  # same shape as the source, uint8
    scale: torch.Tensor  # [rows, n_groups] float32
    zero: torch.Tensor  # [rows, n_groups] float32 (integer-valued for int formats)
    spec: QuantSpec
    g_idx: torch.Tensor | None = None  # [in] int32 group of each column; None = contiguous groups

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.g_idx is None:
            return dequantize(self.codes, self.scale, self.zero, self.spec).to(dtype)
        g = self.g_idx.long()
        return self.spec.format.decode(self.codes, self.scale[:, g], self.zero[:, g], self.spec).to(dtype)


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
    """Scale and zero point from a (possibly clipped) range, by the spec's numeric format."""
    return spec.format.qparams(xmin, xmax, spec)


def choose_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams for `x` under `spec`: (scale, zero), each [rows, n_groups]."""
    return qparams_from_minmax(*group_minmax(x, spec), spec)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """uint8 codes for `x` (same shape), by the spec's numeric format."""
    x2 = as_2d(x, spec).float()
    rows, cols = x2.shape
    xg = to_groups(x2, spec.group_for(cols))  # [rows, n_groups, g]
    q = spec.format.encode(xg, scale.float()[..., None], zero.float()[..., None], spec)  # [rows, n_groups, g]
    return from_groups(q, cols).reshape(x.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float32 values (same shape as codes), by the spec's numeric format."""
    q2 = as_2d(codes, spec)
    rows, cols = q2.shape
    qg = to_groups(q2, spec.group_for(cols))  # [rows, n_groups, g]
    x = spec.format.decode(qg, scale.float()[..., None], zero.float()[..., None], spec)  # [rows, n_groups, g]
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
