"""Weight regularizers over a set of named weights, with their own learnable parameters (R2 margins / hardness),
for QAT and for a regularization phase before PTQ. Math: quant/regularizers.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.regularizers import R2_KINDS, grouped, kure, r2_linf, r2_margin, r2_soft_min_max


@dataclass(frozen=True)
class RegConfig:
    """r2: null | linf | margin | soft_min_max, weighted by r2_weight; kure_weight 0 = off. group_size: the groups
    R2 acts on (-1 = per row, 0 = per tensor; match the later quantizer's groups). eta: soft-min-max's hardness term."""

    r2: str | None = None
    r2_weight: float = 0.0
    kure_weight: float = 0.0
    group_size: int = -1
    eta: float = 1.0
    kure_target: float = 1.8

    def __post_init__(self):
        if self.r2 is not None and self.r2 not in R2_KINDS:
            raise ConfigError(f"r2={self.r2!r} is unknown; allowed: null, {', '.join(R2_KINDS)}")
        if self.r2_weight < 0 or self.kure_weight < 0:
            raise ConfigError(f"r2_weight={self.r2_weight} / kure_weight={self.kure_weight} invalid; allowed: >= 0")
        if self.r2 is not None and self.r2_weight == 0:
            raise ConfigError(f"r2={self.r2} with r2_weight=0 does nothing; set r2_weight > 0 or r2=null")
        if self.group_size < -1:
            raise ConfigError(f"regularizer group_size={self.group_size} invalid; allowed: -1 (rows), 0 (tensor), "
                              f"or a positive int")

    @property
    def active(self) -> bool:
        return self.r2 is not None or self.kure_weight > 0


class WeightRegularizer(nn.Module):
    """sum over weights of r2_weight * mean_groups R2(w / ref) + kure_weight * KURE(w), averaged over weights.
    `ref` = each weight's initial std (fixed), so R2 is measured in units of it; margins start at max |w| / ref and
    hardness at 1 (learnable, trained with the weights)."""

    def __init__(self, weights: dict[str, torch.Tensor], cfg: RegConfig):
        super().__init__()
        self.cfg, self.names = cfg, list(weights)
        self.ref = {n: float(w.detach().float().std().clamp_min(1e-12)) for n, w in weights.items()}
        self.params = nn.ParameterDict()
        for i, (n, w) in enumerate(weights.items()):
            wg = grouped(w.detach().float(), cfg.group_size) / self.ref[n]  # [rows, n_groups, g]
            if cfg.r2 == "margin":
                self.params[str(i)] = nn.Parameter(r2_linf(wg))
            elif cfg.r2 == "soft_min_max":
                self.params[str(i)] = nn.Parameter(torch.ones(wg.shape[:2], device=w.device))

    def r2_term(self, i: int, name: str, w: torch.Tensor) -> torch.Tensor:
        wg = grouped(w.float(), self.cfg.group_size) / self.ref[name]  # [rows, n_groups, g]
        if self.cfg.r2 == "linf":
            return r2_linf(wg).mean()
        if self.cfg.r2 == "margin":
            return r2_margin(wg, self.params[str(i)]).mean()
        return r2_soft_min_max(wg, self.params[str(i)], self.cfg.eta).mean()

    def forward(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{'r2': ..., 'kure': ...} (weighted, averaged over the weights) for the active terms."""
        out = {}
        if self.cfg.r2 is not None:
            terms = [self.r2_term(i, n, weights[n]) for i, n in enumerate(self.names)]
            out["r2"] = self.cfg.r2_weight * torch.stack(terms).mean()
        if self.cfg.kure_weight > 0:
            terms = [kure(weights[n], self.cfg.kure_target) for n in self.names]
            out["kure"] = self.cfg.kure_weight * torch.stack(terms).mean()
        return out
