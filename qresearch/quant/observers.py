"""Observers: collect statistics of a tensor stream, then give a clipping range -> qparams.

min-max and moving-average min-max keep per-group ranges (the QuantSpec's 2-D view); the histogram observer
keeps one |x| histogram (per-tensor) and chooses a clip threshold by percentile, MSE or KL divergence.
"""
from __future__ import annotations

import math

import torch

from .primitives import group_minmax, qparams_from_minmax
from ..errors import ConfigError
from .spec import QuantSpec

OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "kl")


class MinMaxObserver:
    """Running min / max per group over all updates."""

    def __init__(self, spec: QuantSpec):
        self.spec, self.min, self.max = spec, None, None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = group_minmax(x.detach(), self.spec)  # [rows, n_groups]
        if self.spec.granularity == "token":  # a token's range is not a property of the next batch: pool rows
            lo, hi = lo.amin(0, keepdim=True), hi.amax(0, keepdim=True)
        return lo, hi

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min is None:
            raise RuntimeError("observer saw no data; run calibration batches through the model first")
        return self.min, self.max

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_minmax(*self.range(), self.spec)


class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of per-batch min / max (less sensitive to one extreme batch)."""

    def __init__(self, spec: QuantSpec, momentum: float = 0.1):
        super().__init__(spec)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min = self.min + self.momentum * (lo - self.min)
            self.max = self.max + self.momentum * (hi - self.max)


class HistogramObserver:
    """Histogram of |x| over [0, max seen]; the range grows by merging bins. Per-tensor, symmetric clip."""

    def __init__(self, spec: QuantSpec, method: str = "percentile", bins: int = 2048, percentile: float = 99.99):
        if method not in ("percentile", "mse", "kl"):
            raise ConfigError(f"histogram method={method!r} is unknown; allowed: percentile, mse, kl")
        self.spec, self.method, self.bins, self.percentile = spec, method, bins, percentile
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.edge = 0.0  # upper edge of the last bin
        self.xmin, self.xmax = math.inf, -math.inf

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        self.xmin, self.xmax = min(self.xmin, float(x.min())), max(self.xmax, float(x.max()))
        top = float(a.max())
        if top > self.edge:
            self.hist = rebin(self.hist, self.edge, top) if self.edge > 0 else self.hist
            self.edge = top
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.edge).double()

    def threshold(self) -> float:
        """Clip threshold T (|x| <= T is kept) by the configured method."""
        if self.xmin == math.inf:
            raise RuntimeError("observer saw no data; run calibration batches through the model first")
        if self.edge == 0:  # it saw only zeros: nothing to clip (qparams then fall back to scale 1, exact for 0)
            return 0.0
        levels = self.spec.format.half_levels(self.spec)  # positive levels
        if self.method == "percentile":
            return percentile_threshold(self.hist, self.edge, self.percentile)
        if self.method == "mse":
            return mse_threshold(self.hist, self.edge, levels)
        return kl_threshold(self.hist, self.edge, levels)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.threshold()
        lo = torch.tensor([[max(self.xmin, -t)]])
        hi = torch.tensor([[min(self.xmax, t)]])
        if self.spec.sym:
            lo, hi = torch.tensor([[-t]]), torch.tensor([[t]])
        return qparams_from_minmax(lo, hi, self.spec)


def rebin(hist: torch.Tensor, old_edge: float, new_edge: float) -> torch.Tensor:
    """Move counts of a [0, old_edge] histogram into the same number of bins over [0, new_edge]."""
    n = len(hist)
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) * (old_edge / n)
    idx = torch.clamp((centres / new_edge * n).long(), max=n - 1)
    return torch.zeros(n, dtype=torch.float64).index_add_(0, idx, hist.double())


def percentile_threshold(hist: torch.Tensor, edge: float, pct: float) -> float:
    """Smallest bin edge below which `pct` percent of the mass lies."""
    cdf = torch.cumsum(hist, 0) / hist.sum()
    i = int(torch.searchsorted(cdf, torch.tensor(pct / 100, dtype=torch.float64)))
    return edge * min(i + 1, len(hist)) / len(hist)


def mse_threshold(hist: torch.Tensor, edge: float, levels: int, candidates: int = 100) -> float:
    """Threshold minimizing the expected squared error of uniform quantization with `levels` steps per side:
    rounding noise step^2/12 inside the range, (|x| - T)^2 for clipped values."""
    n = len(hist)
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) * (edge / n)
    best, best_t = math.inf, edge
    for k in range(1, candidates + 1):
        t = edge * k / candidates
        step = t / levels
        err = torch.where(centres <= t, torch.full_like(centres, step**2 / 12), (centres - t) ** 2)
        e = float((err * hist).sum())
        if e < best:
            best, best_t = e, t
    return best_t


def kl_threshold(hist: torch.Tensor, edge: float, levels: int) -> float:
    """Entropy calibration: threshold whose clipped-and-requantized distribution is closest in KL to the original."""
    n = len(hist)
    target = levels + 1  # quantized bins on the |x| side
    best, best_i = math.inf, n
    step = max(1, (n - target) // 256)
    for i in sorted(set(range(target, n + 1, step)) | {n}):  # n (no clipping) always a candidate
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()  # clipped mass goes to the last kept bin
        q = _requantize(hist[:i], target)
        pn, qn = p / p.sum(), q / q.sum().clamp_min(1e-30)
        mask = pn > 0
        kl = float((pn[mask] * torch.log(pn[mask] / qn[mask].clamp_min(1e-12))).sum())
        if kl < best:
            best, best_i = kl, i
    return edge * best_i / n


def _requantize(p: torch.Tensor, target: int) -> torch.Tensor:
    """Merge p's bins into `target` groups, then spread each group's mass evenly over its non-empty bins."""
    i = len(p)
    group = torch.clamp((torch.arange(i) * target) // i, max=target - 1)  # [i] group of each bin
    mass = torch.zeros(target, dtype=torch.float64).index_add_(0, group, p)
    nonzero = torch.zeros(target, dtype=torch.float64).index_add_(0, group, (p > 0).double())
    return torch.where(p > 0, mass[group] / nonzero[group].clamp_min(1), torch.zeros_like(p))


def make_observer(kind: str, spec: QuantSpec, **kw):
    """Observer by name: minmax | moving_average | percentile | mse | kl."""
    if kind == "minmax":
        return MinMaxObserver(spec)
    if kind == "moving_average":
        return MovingAverageObserver(spec, **kw)
    if kind in ("percentile", "mse", "kl"):
        if spec.granularity != "tensor":
            raise ConfigError(f"observer={kind} is per-tensor; got granularity={spec.granularity!r}")
        return HistogramObserver(spec, kind, **kw)
    raise ConfigError(f"observer={kind!r} is unknown; allowed: {', '.join(OBSERVERS)}")
