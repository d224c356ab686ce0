"""Fitted formats: qparams are fitted to the values, optionally weighted (e.g. by the Hessian diagonal), not taken
from a min / max range.

- kmeans: a palette (codebook, `lut`) of 2^bits centroids per group, per row (group_size=-1, SqueezeLLM) or per
  layer (granularity tensor), fitted by weighted 1-D k-means; codes are indices into the sorted palette
  (nearest centroid, ties to the lower one). Centroids are rounded to fp16, as stored. No scales.
- binary: sign codes {-a, +a}, a = weighted mean |x| per group / channel (XNOR-Net's optimum for sign codes).
- ternary: codes {-a, 0, +a} with threshold a / 2 (nearest), a fitted by alternating a = weighted mean |x| over
  |x| > threshold and threshold = a / 2, from TWN's threshold 0.7 * mean |x|.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .format_base import LayerParams, NumericFormat, QParams
from .scales import ScaleCoding, level2_of

KMEANS_ITERS = 30
TERNARY_ITERS = 10


def _weights(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-value weights broadcast to x, float64 (ones when none)."""
    return torch.ones_like(x, dtype=torch.float64) if weight is None else weight.double().expand_as(x)


def kmeans_1d(x: torch.Tensor, weight: torch.Tensor | None, k: int, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """Weighted Lloyd k-means of each row of x [B, n] into k sorted centroids [B, k] (float64). Init at the
    quantiles (i + 1/2) / k; an empty cluster is re-seeded at the row's worst-fitted value."""
    x, w = x.double(), _weights(x, weight)
    n = x.shape[1]
    xs = x.sort(dim=1).values
    c = xs[:, ((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp(max=n - 1)]  # [B, k]
    rows = torch.arange(x.shape[0])
    for _ in range(iters):
        idx = nearest_sorted(x, c)  # [B, n]
        sw = torch.zeros_like(c).scatter_add_(1, idx, w)
        swx = torch.zeros_like(c).scatter_add_(1, idx, w * x)
        new = torch.where(sw > 0, swx / sw.clamp_min(1e-300), c)
        empty = sw == 0
        if empty.any():  # move the first empty centroid of each such row to its worst-fitted value
            err = w * (x - new.gather(1, idx)) ** 2
            worst = x[rows, err.argmax(dim=1)]  # [B]
            first = empty.double().argmax(dim=1)  # [B]
            has = empty.any(dim=1)
            new[rows[has], first[has]] = worst[has]
        new = new.sort(dim=1).values
        if torch.equal(new, c):
            break
        c = new
    return c


def _per_row(r: torch.Tensor, lut: torch.Tensor) -> torch.Tensor | None:
    """lut as one palette per row of r ([..., K] sharing r's leading dims, or [..., 1, K]), else None."""
    if lut.dim() == r.dim() + 1 and lut.shape[-2] == 1:
        lut = lut.squeeze(-2)
    if lut.dim() == r.dim():
        return lut.expand(*r.shape[:-1], lut.shape[-1])
    return None


def nearest_sorted(r: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of sorted palettes (ties to the lower one). lut is one palette per row of r
    ([..., K] or [..., 1, K] with r [..., n]) or one per value (r's shape + [K])."""
    rows = _per_row(r, lut.double())  # midpoints in float64: exact for float32 palettes
    if rows is not None:
        mids = ((rows[..., 1:] + rows[..., :-1]) / 2).contiguous()  # [..., K - 1]
        return torch.searchsorted(mids, r.double().contiguous())
    lut = lut.double()
    mids = ((lut[..., 1:] + lut[..., :-1]) / 2).expand(*r.shape, lut.shape[-1] - 1).contiguous()
    return torch.searchsorted(mids, r.double()[..., None].contiguous()).squeeze(-1)


def lut_lookup(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Palette values of codes (same broadcast rule as nearest_sorted), float32."""
    c = codes.long()
    rows = _per_row(c, lut)
    if rows is not None:
        return torch.gather(rows, -1, c).float()
    return torch.gather(lut.expand(*c.shape, lut.shape[-1]), -1, c[..., None]).squeeze(-1).float()


class KMeansFormat(NumericFormat):
    """Codebook quantization: codes index a fitted palette of 2^bits fp16 centroids (no scales, no zeros)."""

    name = "kmeans"
    bits_allowed = (2, 3, 4)
    sym_only = True
    fitted = True

    def scale_coding(self, spec):
        if spec.scale_bits is not None:
            raise ConfigError(f"qformat=kmeans stores a codebook and no scales; got scale_bits={spec.scale_bits}; "
                              f"allowed: null")
        return ScaleCoding()

    def scale_bits(self, spec):
        return 0

    def half_levels(self, spec):
        return 2 ** (spec.bits - 1)

    def levels(self, spec):
        raise ConfigError("qformat=kmeans has no fixed levels: its palette is fitted per layer / row / group")

    def prepare_layer(self, xg, spec, weight=None):
        if spec.granularity != "tensor":
            return LayerParams()
        w = None if weight is None else _weights(xg, weight).reshape(1, -1)
        return LayerParams(lut=self._palette(xg.reshape(1, -1), w, spec).reshape(1, 1, -1))  # [1, 1, K]

    def _palette(self, x2: torch.Tensor, w2: torch.Tensor | None, spec) -> torch.Tensor:
        """fp16-representable sorted centroids [B, K] (float32) of each row of x2 [B, n]."""
        return kmeans_1d(x2, w2, 2**spec.bits).half().float().sort(dim=-1).values

    def fit(self, xg, spec, weight=None, layer=None):
        rows, ng, g = xg.shape
        ones = torch.ones(rows, ng, dtype=torch.float32, device=xg.device)
        if layer is not None and layer.lut is not None:
            return QParams(ones, torch.zeros_like(ones), layer.lut)
        if spec.granularity == "tensor":
            return QParams(ones, torch.zeros_like(ones), self.prepare_layer(xg, spec, weight).lut)
        w = None if weight is None else _weights(xg, weight).reshape(rows * ng, g)
        lut = self._palette(xg.reshape(rows * ng, g), w, spec).reshape(rows, ng, -1)  # [rows, n_groups, K]
        return QParams(ones, torch.zeros_like(ones), lut)

    def encode(self, x, scale, zero, spec, lut=None):
        return nearest_sorted(x, lut).to(torch.uint8)

    def decode(self, codes, scale, zero, spec, lut=None):
        return lut_lookup(lut, codes)

    def saturated(self, x, scale, zero, spec, lut=None):
        rows = _per_row(x, lut)
        lo, hi = (rows[..., :1], rows[..., -1:]) if rows is not None else (lut[..., 0], lut[..., -1])
        return (x < lo) | (x > hi)


class _SignFormat(NumericFormat):
    """Shared parts of binary / ternary: a symmetric scale per group fitted to the values."""

    sym_only = True
    fitted = True

    def _raw_scale(self, xg: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def prepare_layer(self, xg, spec, weight=None):
        coding = self.scale_coding(spec)
        if coding.level2 is None:
            return LayerParams()
        return LayerParams(scale2=level2_of(self._raw_scale(xg, weight), coding))

    def fit(self, xg, spec, weight=None, layer=None):
        layer = self.prepare_layer(xg, spec, weight) if layer is None else layer
        a = self._raw_scale(xg, weight)
        a = torch.where(a > 0, a, torch.zeros_like(a))  # an all-zero group: +-0, exact (a = 1 made binary's +-1)
        return QParams(self.coded_scale(a, spec, layer.scale2), torch.zeros_like(a))

    def qparams(self, xmin, xmax, spec, scale2=None):
        raise ConfigError(f"qformat={self.name} fits its scale to the values (mean |x|), not to a min / max range; "
                          f"use quant.primitives.fit_qparams")


class BinaryFormat(_SignFormat):
    """1-bit sign codes: 0 -> -a, 1 -> +a (x >= 0 -> +a)."""

    name = "binary"
    bits_allowed = (1,)

    def half_levels(self, spec):
        return 1

    def _raw_scale(self, xg, weight):
        w = _weights(xg, weight)
        return ((w * xg.double().abs()).sum(-1) / w.sum(-1).clamp_min(1e-300)).float()

    def encode(self, x, scale, zero, spec):
        return (x >= 0).to(torch.uint8)

    def decode(self, codes, scale, zero, spec):
        return (2 * codes.float() - 1) * scale

    def saturated(self, x, scale, zero, spec):
        return (x.float() / scale).abs() > 2  # error beyond half the step between -a and +a


class TernaryFormat(_SignFormat):
    """2-bit codes 0 -> -a, 1 -> 0, 2 -> +a (code 3 unused); |x| <= a / 2 -> 0."""

    name = "ternary"
    bits_allowed = (2,)

    def n_codes(self, spec):
        return 3

    def half_levels(self, spec):
        return 1

    def _raw_scale(self, xg, weight):
        w, ax = _weights(xg, weight), xg.double().abs()
        mean = (w * ax).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1e-300)
        thr, a = 0.7 * mean, mean  # TWN's threshold as the start
        for _ in range(TERNARY_ITERS):
            m = (ax > thr).double() * w
            a = torch.where(m.sum(-1, keepdim=True) > 0, (m * ax).sum(-1, keepdim=True) /
                            m.sum(-1, keepdim=True).clamp_min(1e-300), ax.amax(-1, keepdim=True))
            thr = a / 2
        return a.squeeze(-1).float()

    def encode(self, x, scale, zero, spec):
        r = x.double() / scale.double()
        return torch.where(r > 0.5, 2, torch.where(r < -0.5, 0, 1)).to(torch.uint8)

    def decode(self, codes, scale, zero, spec):
        return (codes.float() - 1) * scale

    def saturated(self, x, scale, zero, spec):
        return (x.double() / scale.double()).abs() > 1.5
