"""AdaRound (Nagel et al. 2020) math: learn, per weight, whether to round down or up.

w_soft = s * (clamp(floor(w / s) + h(V) + z, 0, qmax) - z), h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)
(the rectified sigmoid, zeta = 1.1, gamma = -0.1). The rounding regularizer mean(1 - |2 h - 1|^beta) with beta
annealed from beta_start to beta_end after a warm-up (regularizer off) drives h to 0 or 1; the final rounding is
hard: up where h >= 0.5. Uniform integer grids only (floor / ceil are neighbouring codes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .primitives import QTensor, choose_qparams, expand_groups
from .spec import QuantSpec

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    iters: int = 200
    lr: float = 0.3
    reg_weight: float = 1.0  # lambda: weight of the rounding regularizer (mean over weights)
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the regularizer

    def __post_init__(self):
        if self.iters < 1 or self.lr <= 0 or self.reg_weight < 0 or not 0 <= self.warmup < 1:
            raise ConfigError(f"adaround iters={self.iters} / lr={self.lr} / reg_weight={self.reg_weight} / warmup="
                              f"{self.warmup} invalid; allowed: iters >= 1, lr > 0, reg_weight >= 0, 0 <= warmup < 1")
        if not self.beta_start >= self.beta_end > 0:
            raise ConfigError(f"beta_start={self.beta_start} / beta_end={self.beta_end} invalid; allowed: "
                              f"beta_start >= beta_end > 0")


def check_uniform_grid(method: str, spec: QuantSpec) -> None:
    if spec.qformat != "int":
        raise ConfigError(f"{method} learns floor-or-ceil on a uniform grid; qformat={spec.qformat} is not one; "
                          f"allowed: int")


def rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with rect_sigmoid(V) = frac (the rounding residual in [0, 1)): soft weights start at the FP weights."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def round_reg(v: torch.Tensor, beta: float) -> torch.Tensor:
    """mean(1 - |2 h(V) - 1|^beta): 0 when every h is 0 or 1."""
    return (1 - (2 * rect_sigmoid(v) - 1).abs().pow(beta)).mean()


def beta_at(it: int, cfg: AdaRoundConfig) -> float | None:
    """None during warm-up (no regularizer), then beta linearly from beta_start to beta_end."""
    start = int(cfg.warmup * cfg.iters)
    if it < start:
        return None
    t = (it - start) / max(1, cfg.iters - start - 1)
    return cfg.beta_start + (cfg.beta_end - cfg.beta_start) * min(1.0, t)


@dataclass
class Grid:
    """One weight's grid, per column: floor(w / s) [out, in], scale / zero [out, in], qparams [out, n_groups]."""

    floor: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    qscale: torch.Tensor
    qzero: torch.Tensor
    qmax: int
    spec: QuantSpec

    def soft(self, v: torch.Tensor) -> torch.Tensor:
        """Dequantized weights with soft rounding h(V) (differentiable in V)."""
        return (torch.clamp(self.floor + rect_sigmoid(v) + self.zero, 0, self.qmax) - self.zero) * self.scale

    def hard(self, v: torch.Tensor) -> QTensor:
        """Codes with h >= 0.5 rounded up."""
        up = (rect_sigmoid(v.detach()) >= 0.5).float()
        codes = torch.clamp(self.floor + up + self.zero, 0, self.qmax).to(torch.uint8)
        return QTensor(codes, self.qscale.clone(), self.qzero.clone(), self.spec)


def make_grid(W: torch.Tensor, spec: QuantSpec, qparams: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[Grid, torch.Tensor]:
    """Grid of W [out, in] (min-max qparams unless given) and the initial V [out, in]."""
    W = W.detach().float()
    s, z = qparams if qparams is not None else choose_qparams(W, spec)  # [out, n_groups]
    s, z = s.float().to(W.device), z.float().to(W.device)
    g, cols = spec.group_for(W.shape[1]), W.shape[1]
    S, Z = expand_groups(s, g, cols), expand_groups(z, g, cols)  # [out, in]
    x = W / S
    fl = torch.floor(x)
    return Grid(fl, S, Z, s, z, 2 ** spec.bits - 1, spec), init_v(x - fl)


def adaround_layer(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, cfg: AdaRoundConfig,
                   qparams: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> tuple[QTensor, dict]:
    """Layer-wise AdaRound: minimize tr(D H D^T) / tr(W H W^T) + lambda * round_reg, D = W - w_soft, with the
    input Hessian H = 2/N X^T X [in, in]. Returns hard-rounded codes and {'recon': final relative error}."""
    check_uniform_grid("adaround", spec)
    torch.manual_seed(seed)
    grid, v0 = make_grid(W, spec, qparams)
    v = torch.nn.Parameter(v0)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    Wf, Hf = W.detach().float(), H.detach().float().to(W.device)
    ref = ((Wf @ Hf) * Wf).sum().clamp_min(1e-30)
    for it in range(cfg.iters):
        D = Wf - grid.soft(v)  # [out, in]
        loss = ((D @ Hf) * D).sum() / ref
        beta = beta_at(it, cfg)
        if beta is not None:
            loss = loss + cfg.reg_weight * round_reg(v, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = grid.hard(v)
    D = Wf - q.dequantize()
    return q, {"recon": float(((D @ Hf) * D).sum() / ref)}
