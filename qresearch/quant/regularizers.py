"""Weight-distribution regularizers that make weights easier to quantize. Pure functions on grouped weights.

R2 loss (Kundu et al. 2023, range restriction), per group of a grouped view wg [rows, n_groups, g] -> [rows, n_groups]:
- linf:         max_i |w_i|
- margin:       mean_i relu(|w_i| - |m|)^2 + m^2, with a learnable margin m per group (weights beyond the
                margin are pulled in; the margin itself shrinks)
- soft_min_max: smax_a(w) - smin_a(w) + eta * exp(-a), smax_a = sum w e^{a w} / sum e^{a w} (smin: -a), with a
                learnable hardness a per group (the exp(-a) term pushes it up so smax/smin approach max/min)
KURE (Shkolnik et al. 2020): (kurtosis(w) - 1.8)^2 per tensor, 1.8 being a uniform distribution's kurtosis.

Callers pick the units: `normalize` divides the weights by a fixed reference scale first (e.g. their initial std),
so one regularizer weight means the same on layers of different magnitude.
"""
from __future__ import annotations

import torch

from .primitives import to_groups

R2_KINDS = ("linf", "margin", "soft_min_max")
KURTOSIS_UNIFORM = 1.8


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] (or conv [out, in, *k] as [out, in * prod(k)]) -> [out, n_groups, g]; -1 = one group per row,
    0 = one group for the whole tensor."""
    w2 = w.reshape(w.shape[0], -1)
    if group_size == 0:
        return w2.reshape(1, 1, -1)
    g = w2.shape[1] if group_size == -1 else min(group_size, w2.shape[1])
    return to_groups(w2, g)


def r2_linf(wg: torch.Tensor) -> torch.Tensor:
    """[rows, n_groups, g] -> [rows, n_groups]: the largest magnitude of each group."""
    return wg.abs().amax(dim=-1)


def r2_margin(wg: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """[rows, n_groups, g], margin [rows, n_groups] -> [rows, n_groups]."""
    m = margin.abs()
    return torch.relu(wg.abs() - m[..., None]).pow(2).mean(dim=-1) + m.pow(2)


def soft_max(wg: torch.Tensor, hardness: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted mean of each group with weights e^{a w}: -> [rows, n_groups] (a -> inf: the max)."""
    return (torch.softmax(hardness[..., None] * wg, dim=-1) * wg).sum(dim=-1)


def r2_soft_min_max(wg: torch.Tensor, hardness: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """[rows, n_groups, g], hardness [rows, n_groups] -> [rows, n_groups]."""
    return soft_max(wg, hardness) + soft_max(-wg, hardness) + eta * torch.exp(-hardness)


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """E[((w - mean) / std)^4] over all elements (population std); 3 for a Gaussian, 1.8 for a uniform."""
    x = w.reshape(-1).float()
    z = (x - x.mean()) / x.std(unbiased=False).clamp_min(1e-12)
    return z.pow(4).mean()


def kure(w: torch.Tensor, target: float = KURTOSIS_UNIFORM) -> torch.Tensor:
    """KURE term of one tensor: (kurtosis(w) - target)^2."""
    return (kurtosis(w) - target).pow(2)
