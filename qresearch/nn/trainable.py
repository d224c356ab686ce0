"""Trainable fake-quant modules for Linear, Conv1d and Conv2d (QAT).

The latent full-precision weight stays a parameter of the wrapped module; every forward fake-quantizes it (and the
input) with straight-through estimators (quant/ste.py). Weights: per channel or per group, scales recomputed from
the weight each step ('minmax') or learned (LSQ gradient, 'learned'). Activations: per token (dynamic) or per
tensor with a 'static' fixed scale, a 'learned' scale, or a 'pact' learnable clip (PACT). After training,
`qtensor()` / `act_quant()` give the codes + qparams and the activation record every method returns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..quant.primitives import QTensor, choose_qparams, quantize
from ..quant.spec import QuantSpec
from ..quant.ste import fake_quant_act, fake_quant_weight, pact_quant, pact_scale
from ..records import ActQuant

WEIGHT_SCALES = ("minmax", "learned")
ACT_MODES = ("dynamic", "static", "learned", "pact")
QAT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _view(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return w.reshape(1, -1) if spec.granularity == "tensor" else w.reshape(w.shape[0], -1)  # [out, in * k]


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight [out, in, *k] per channel / group (or tensor); `scale` 'minmax' (from the current
    weight each step) or 'learned' (LSQ gradient; learned as a factor on the initial min-max scale, so one Adam lr
    suits every layer). Zero points stay at their initial values."""

    def __init__(self, spec: QuantSpec, weight: torch.Tensor, scale: str = "minmax",
                 qparams: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if scale not in WEIGHT_SCALES:
            raise ConfigError(f"weight scale={scale!r} is unknown; allowed: {', '.join(WEIGHT_SCALES)}")
        self.spec, self.mode = spec, scale
        s, z = qparams if qparams is not None else choose_qparams(_view(weight.detach(), spec), spec)
        learned = scale == "learned"
        self.register_buffer("scale0", s.float().clone() if learned else None)  # [rows, n_groups]
        self.register_buffer("zero", z.float().clone() if learned else None)
        self.scale_rel = nn.Parameter(torch.ones_like(s.float())) if learned else None

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale_rel is None:
            return choose_qparams(_view(w.detach(), self.spec), self.spec)
        return self.scale0 * self.scale_rel.abs().clamp_min(1e-3), self.zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s, z = self.qparams(w)
        return fake_quant_weight(w, self.spec, s, z)

    @torch.no_grad()
    def qtensor(self, w: torch.Tensor) -> QTensor:
        """Codes + qparams of the current weight (conv weights as their [out, in * k] view)."""
        s, z = (t.detach().float() for t in self.qparams(w))
        w2 = _view(w.detach().float(), self.spec)
        return QTensor(quantize(w2, s, z, self.spec), s.clone(), z.clone(), self.spec)


def range_of_scale(spec: QuantSpec) -> float:
    """Clip value a symmetric per-tensor scale of 1 stands for under the spec's format (int8: 127)."""
    one = torch.ones(1, 1)
    return float(1 / spec.format.qparams(-one, one, spec)[0])


class ActQuantizer(nn.Module):
    """Fake-quantizes an input with channels at `channel_dim` (-1 for linears, 1 for convs).
    mode: dynamic (per token / per tensor from x), static (fixed scale), learned (LSQ scale), pact (clip alpha).
    static / learned / pact start from `init_scale` ([1, 1], e.g. a calibration observer's); learned values are
    factors on their initial value (one Adam lr suits every layer)."""

    def __init__(self, spec: QuantSpec, mode: str = "dynamic", init_scale: torch.Tensor | None = None,
                 channel_dim: int = -1):
        super().__init__()
        if mode not in ACT_MODES:
            raise ConfigError(f"activation mode={mode!r} is unknown; allowed: {', '.join(ACT_MODES)}")
        if mode != "dynamic" and spec.granularity != "tensor":
            raise ConfigError(f"activation mode={mode} sets one scale per tensor; it needs act granularity=tensor "
                              f"(got {spec.granularity})")
        if mode != "dynamic" and init_scale is None:
            raise ConfigError(f"activation mode={mode} needs an initial scale (from calibration data)")
        self.spec, self.mode, self.channel_dim = spec, mode, channel_dim
        s0 = None if init_scale is None else init_scale.detach().float().reshape(1, 1).clone()
        self.register_buffer("scale0", s0)
        self.rel = nn.Parameter(torch.ones(())) if mode in ("learned", "pact") else None

    @property
    def alpha(self) -> torch.Tensor:
        """PACT's clip value (differentiable in `rel`)."""
        return self.scale0.reshape(()) * range_of_scale(self.spec) * self.rel.abs()

    def scale(self) -> torch.Tensor | None:
        if self.mode == "dynamic":
            return None
        if self.mode == "static":
            return self.scale0
        return self.scale0 * self.rel.abs().clamp_min(1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.movedim(self.channel_dim, -1) if self.channel_dim != -1 else x  # channels last
        y = pact_quant(xc, self.alpha, self.spec) if self.mode == "pact" else fake_quant_act(xc, self.spec, self.scale())
        return y.movedim(-1, self.channel_dim) if self.channel_dim != -1 else y

    def act_quant(self) -> ActQuant:
        """The record inference uses: dynamic, or a static per-tensor scale (PACT: the clip's scale)."""
        if self.mode == "dynamic":
            return ActQuant(self.spec)
        s = pact_scale(self.alpha, self.spec) if self.mode == "pact" else self.scale().detach().reshape(1, 1)
        return ActQuant(self.spec, static_scale=s.float().clone())

    def l2(self) -> torch.Tensor:
        """PACT's L2 term on the clip, measured relative to its initial value: (alpha / alpha_init)^2 (zero for the
        other modes). Relative, because LLM activation ranges differ by orders of magnitude between layers."""
        return self.rel.abs().pow(2) if self.mode == "pact" else torch.zeros(())


class QATModule(nn.Module):
    """A Linear / Conv1d / Conv2d (`inner`, whose weight and bias keep training) with fake-quantized weight and
    input. `wq` None = weights stay FP; `aq` None = inputs stay FP."""

    def __init__(self, inner: nn.Module, wq: WeightQuantizer | None, aq: ActQuantizer | None):
        super().__init__()
        if not isinstance(inner, QAT_TYPES):
            raise TypeError(f"QATModule wraps {', '.join(t.__name__ for t in QAT_TYPES)}, not {type(inner).__name__}")
        self.inner, self.wq, self.aq = inner, wq, aq

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.aq(x) if self.aq is not None else x
        w = self.wq(self.inner.weight) if self.wq is not None else self.inner.weight
        if isinstance(self.inner, nn.Linear):
            return F.linear(xq, w, self.inner.bias)
        return self.inner._conv_forward(xq, w, self.inner.bias)


def wrap(model: nn.Module, names: list[str], make_wq, make_aq) -> dict[str, QATModule]:
    """Replace each named module by a QATModule(module, make_wq(name, module), make_aq(name, module))."""
    out = {}
    for name in names:
        inner = model.get_submodule(name)
        m = QATModule(inner, make_wq(name, inner), make_aq(name, inner))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m)
        out[name] = m
    return out


def unwrap(model: nn.Module, wrapped: dict[str, QATModule]) -> None:
    """Put the inner modules (with their trained weights) back in place of the QAT wrappers."""
    for name, m in wrapped.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.inner)
