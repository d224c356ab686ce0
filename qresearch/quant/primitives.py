"""Quantization primitives: qparams, quantize, dequantize, fake-quant (STE). Pure functions on CPU/GPU tensors.

Every granularity reduces to one layout: a 2-D view [rows, cols] cut into groups along the last dim,
giving qparams [rows, n_groups]. A last partial group is legal; it is padded (for statistics only) by
repeating its own last element, so its min/max are unchanged (fitted formats give the padding weight 0).
`fit_qparams` is the general entry (any format, optional clip and per-value weights); `choose_qparams` /
`qparams_from_minmax` remain for range formats with single-level scales (activations, observers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .format_base import LayerParams, QParams
from .spec import QuantSpec


@dataclass
class QTensor:
    """Codes (uint8, < 2^code_bits of the spec's format) with their qparams; `shape` is the source's shape.

    `g_idx` [in] (act-order GPTQ) gives the group of each input column when groups are not contiguous; it
    travels with the codes so every dequantization honours it. `lut` is a codebook format's palette
    [rows | 1, n_groups | 1, K]; `scale2` the second-level scale of two-level scales [rows | 1, 1] (`scale` is then
    the effective scale, exactly what the stored codes decode to).
    """

    codes: torch.Tensor  # same shape as the source, uint8
    scale: torch.Tensor  # [rows, n_groups] float32
    zero: torch.Tensor  # [rows, n_groups] float32 (integer-valued for int formats)
    spec: QuantSpec
    g_idx: torch.Tensor | None = None  # [in] int32 group of each column; None = contiguous groups
    lut: torch.Tensor | None = None  # [rows | 1, n_groups | 1, K] float32 palette (codebook formats)
    scale2: torch.Tensor | None = None  # [rows | 1, 1] float32 second-level scale (two-level scales)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.g_idx is None:
            return dequantize(self.codes, self.scale, self.zero, self.spec, self.lut).to(dtype)
        g = self.g_idx.long()
        lut = self.lut if self.lut is None or self.lut.shape[1] == 1 else self.lut[:, g]  # [rows | 1, in, K]
        return decode(self.codes, self.scale[:, g], self.zero[:, g], self.spec, lut).to(dtype)


def encode(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
           lut: torch.Tensor | None = None) -> torch.Tensor:
    """The format's encode (codebook formats also get their palette, broadcast as scale + [K])."""
    if lut is None:
        return spec.format.encode(x, scale, zero, spec)
    return spec.format.encode(x, scale, zero, spec, lut=lut)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
           lut: torch.Tensor | None = None) -> torch.Tensor:
    """The format's decode (codebook formats also get their palette)."""
    if lut is None:
        return spec.format.decode(codes, scale, zero, spec)
    return spec.format.decode(codes, scale, zero, spec, lut=lut)


def saturated(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
              lut: torch.Tensor | None = None) -> torch.Tensor:
    """The format's saturation test (codebook formats also get their palette)."""
    if lut is None:
        return spec.format.saturated(x, scale, zero, spec)
    return spec.format.saturated(x, scale, zero, spec, lut=lut)


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
    """Scale and zero point from a (possibly clipped) range, by the spec's numeric format (range formats with
    single-level scales; the others need fit_qparams, which also returns what they store besides)."""
    fmt = spec.format
    if fmt.fitted or fmt.scale_coding(spec).level2 is not None:
        raise ConfigError(f"{spec.tag}: qparams need the values (fitted format or two-level scales); "
                          f"use quant.primitives.fit_qparams")
    return fmt.qparams(xmin, xmax, spec)


def group_weights(weight: torch.Tensor | None, rows: int, cols: int, g: int) -> torch.Tensor | None:
    """Per-column weights [cols] (or per-value [rows, cols]) -> [rows | 1, n_groups, g], 0 on the padding."""
    if weight is None:
        return None
    w2 = weight.float().reshape(-1, cols)  # [1 | rows, cols]
    pad = (-cols) % g
    w2 = torch.nn.functional.pad(w2, (0, pad))  # padding weighs nothing
    return w2.reshape(w2.shape[0], -1, g)  # [1 | rows, n_groups, g]


def fit_qparams(x: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None = None,
                clip: torch.Tensor | None = None, layer: LayerParams | None = None) -> tuple[QParams, LayerParams]:
    """qparams of x under any format: groups of the 2-D view, each clamped to [-clip, clip] when `clip`
    ([rows, n_groups]) is given, `weight` per column [cols] or per value (fitted formats; 0 = ignore). `layer`
    (second-level scale / per-layer codebook) is computed from the clamped values unless given."""
    x2 = as_2d(x, spec).float()
    rows, cols = x2.shape
    g = spec.group_for(cols)
    xg = to_groups(x2, g)  # [rows, n_groups, g]
    if clip is not None:
        c = clip.float().to(xg.device)[..., None]  # [rows, n_groups, 1]
        xg = torch.maximum(torch.minimum(xg, c), -c)
    wg = group_weights(weight, rows, cols, g)
    if wg is None and spec.format.fitted and cols % g:
        wg = group_weights(torch.ones(cols, device=x2.device), rows, cols, g)
    fmt = spec.format
    layer = fmt.prepare_layer(xg, spec, wg) if layer is None else layer
    return fmt.fit(xg, spec, wg, layer), layer


def choose_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max qparams for `x` under `spec`: (scale, zero), each [rows, n_groups]."""
    return qparams_from_minmax(*group_minmax(x, spec), spec)


def _lut_g(lut: torch.Tensor | None) -> torch.Tensor | None:
    return None if lut is None else lut[..., None, :]  # [rows, n_groups, 1, K]: broadcast over a group's values


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
             lut: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 codes for `x` (same shape), by the spec's numeric format."""
    x2 = as_2d(x, spec).float()
    rows, cols = x2.shape
    xg = to_groups(x2, spec.group_for(cols))  # [rows, n_groups, g]
    q = encode(xg, scale.float()[..., None], zero.float()[..., None], spec, _lut_g(lut))  # [rows, n_groups, g]
    return from_groups(q, cols).reshape(x.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               lut: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 values (same shape as codes), by the spec's numeric format."""
    q2 = as_2d(codes, spec)
    rows, cols = q2.shape
    qg = to_groups(q2, spec.group_for(cols))  # [rows, n_groups, g]
    x = decode(qg, scale.float()[..., None], zero.float()[..., None], spec, _lut_g(lut))  # [rows, n_groups, g]
    return from_groups(x, cols).reshape(codes.shape)


def quantize_tensor(x: torch.Tensor, spec: QuantSpec, scale=None, zero=None, weight: torch.Tensor | None = None,
                    clip: torch.Tensor | None = None) -> QTensor:
    """Quantize with given (scale, zero) (single-level range formats), or with qparams fitted to x (any format;
    `weight`, `clip` as in fit_qparams)."""
    if scale is not None:
        return QTensor(quantize(x, scale, zero, spec), scale, zero, spec)
    qp, layer = fit_qparams(x, spec, weight, clip)
    return QTensor(quantize(x, qp.scale, qp.zero, spec, qp.lut), qp.scale, qp.zero, spec, lut=qp.lut,
                   scale2=layer.scale2)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale=None, zero=None) -> torch.Tensor:
    """Quantize-dequantize in x's dtype, with a straight-through estimator: d out / d x = 1."""
    if scale is None:
        xq = quantize_tensor(x.detach(), spec).dequantize(x.dtype)
    else:
        xq = dequantize(quantize(x.detach(), scale, zero, spec), scale, zero, spec).to(x.dtype)
    return x + (xq - x).detach()
