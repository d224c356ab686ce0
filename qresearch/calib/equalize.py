"""Data-free quantization helpers (Nagel et al. 2019): batch-norm folding, cross-layer equalization (CLE) of layer
pairs, and bias correction of the expected output shift that weight quantization causes.

CLE rescales a pair prev -> f -> next with f positively homogeneous (ReLU, LeakyReLU; or prev entering a product
linearly, as Llama's up_proj through act(gate) * up): prev's output channel i is divided by s_i and next's input
channel i multiplied by s_i, s_i = sqrt(r1_i / r2_i) (r1: range of prev's output channel, r2: range of next's input
channel), which leaves the FP function unchanged and gives both channels the range sqrt(r1_i r2_i).
Bias correction: E[y - y_q] = (W - W_q) E[x], added to the bias (conv: summed over kernel positions).
"""
from __future__ import annotations

import math

import torch
from torch import nn

EQUIVARIANT = (nn.ReLU, nn.LeakyReLU)  # f(x / s) = f(x) / s for s > 0
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def out_ranges(m: nn.Module) -> torch.Tensor:
    """max |w| per output channel [out] of a Linear / Conv weight [out, in, *k]."""
    return m.weight.detach().abs().reshape(m.weight.shape[0], -1).amax(dim=1)


def in_ranges(m: nn.Module) -> torch.Tensor:
    """max |w| per input channel [in] (over outputs and kernel positions); groups=1 layers only."""
    w = m.weight.detach().abs()
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1)


def cle_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s = sqrt(r1 / r2) per channel; channels with a zero range keep s = 1."""
    ok = (r1 > 0) & (r2 > 0)
    return torch.where(ok, (r1 / torch.where(ok, r2, torch.ones_like(r2))).sqrt(), torch.ones_like(r1))


@torch.no_grad()
def rescale_pair(prev: nn.Module, nxt: nn.Module, s: torch.Tensor) -> None:
    """prev's output channels / s (weight rows and bias), nxt's input channels * s. In place."""
    shape_out = (-1,) + (1,) * (prev.weight.dim() - 1)
    prev.weight.div_(s.to(prev.weight).reshape(shape_out))
    if prev.bias is not None:
        prev.bias.div_(s.to(prev.bias))
    shape_in = (1, -1) + (1,) * (nxt.weight.dim() - 2)
    nxt.weight.mul_(s.to(nxt.weight).reshape(shape_in))


def equalize(prev: nn.Module, nxt: nn.Module) -> torch.Tensor:
    """One CLE step on a pair; returns the scales s [C] it applied."""
    if getattr(nxt, "groups", 1) != 1 or getattr(prev, "groups", 1) != 1:
        raise ValueError("CLE here handles groups=1 layers only (depthwise pairs need per-group ranges)")
    s = cle_scales(out_ranges(prev), in_ranges(nxt))
    rescale_pair(prev, nxt, s)
    return s


@torch.no_grad()
def fold_batchnorm(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN into the preceding Linear / Conv (creating its bias if needed). Returns the BN's
    (beta, gamma) [C]: the mean and std of the folded layer's output the BN statistics promise."""
    std = (bn.running_var + bn.eps).sqrt()
    g = bn.weight / std if bn.affine else 1 / std
    b = bn.bias if bn.affine else torch.zeros_like(std)
    layer.weight.mul_(g.reshape((-1,) + (1,) * (layer.weight.dim() - 1)))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * g + b
    layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    beta = bn.bias.detach().clone() if bn.affine else torch.zeros_like(std)
    gamma = bn.weight.detach().abs().clone() if bn.affine else torch.ones_like(std)
    return beta, gamma


def expected_relu(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[relu(z)] for z ~ N(mu, sigma^2), per channel: mu Phi(mu / sigma) + sigma phi(mu / sigma)."""
    sigma = sigma.clamp_min(1e-12)
    t = mu / sigma
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return mu * cdf + sigma * pdf


def output_shift(w: torch.Tensor, wq: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """E[y - y_q] [out] = (W - W_q) E[x] for an input with per-channel mean x_mean [in] (conv: over kernel
    positions, border padding ignored). w, wq: [out, in, *k]."""
    d = (w.float() - wq.float()).reshape(w.shape[0], w.shape[1], -1).sum(dim=2)  # [out, in]
    return d @ x_mean.float().to(d.device)


@torch.no_grad()
def correct_bias(layer: nn.Module, wq: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """Add E[y - y_q] to `layer`'s bias (created when absent), so the quantized layer's mean output matches the FP
    one. `layer.weight` must still hold the FP weight. Returns the correction [out]."""
    c = output_shift(layer.weight, wq, x_mean).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(c.clone())
    else:
        layer.bias.add_(c)
    return c


class InputMean:
    """Running per-channel mean of a layer input (Linear: [..., in]; Conv: [N, C, *spatial])."""

    def __init__(self, conv: bool):
        self.conv, self.total, self.n = conv, None, 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().float().movedim(1, -1).reshape(-1, x.shape[1]) if self.conv else \
            x.detach().float().reshape(-1, x.shape[-1])  # [samples, C]
        s = x2.sum(0).double()
        self.total = s if self.total is None else self.total + s
        self.n += x2.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(1, self.n)).float()


@torch.no_grad()
def input_means(model: nn.Module, layers: dict[str, nn.Module], batches, forward) -> dict[str, torch.Tensor]:
    """Per-channel mean [C] of each named layer's input over `batches`, running forward(model, batch)."""
    acc = {n: InputMean(not isinstance(m, nn.Linear)) for n, m in layers.items()}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: acc[n].update(args[0])) for n, m in layers.items()]
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in hooks:
            h.remove()
    return {n: a.mean for n, a in acc.items()}
