"""Fake quantization for training, with straight-through estimators (STE).

`FakeQuantSTE` quantize-dequantizes through the spec's numeric format. Backward: the gradient w.r.t. x passes
unchanged where x lies inside the grid's range and is zero where the format clamps it (`saturated`); the gradient
w.r.t. the scale (when it requires grad) is the LSQ one, d xq / d s = (xq - x * inside) / s. Zero points are fixed.
`pact_clip` is PACT's clip with its gradient to the clip value alpha: +1 above alpha, -1 below -alpha, 0 inside.
"""
from __future__ import annotations

import torch

from .primitives import as_2d, choose_qparams, from_groups, to_groups
from .spec import QuantSpec


class FakeQuantSTE(torch.autograd.Function):
    """xq = decode(encode(x)) with qparams broadcast against x; STE gradients (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        fmt = spec.format
        s, z = scale.detach(), zero.detach()
        xq = fmt.decode(fmt.encode(x.detach(), s, z, spec), s, z, spec)
        inside = ~fmt.saturated(x.detach(), s, z, spec)
        ctx.save_for_backward(x, xq, s, inside)
        ctx.scale_shape = scale.shape
        return xq.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, xq, s, inside = ctx.saved_tensors
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (grad.float() * (xq - x.float() * inside) / s).sum_to_size(ctx.scale_shape)
        return gx, gs, None, None


def fake_quant_groups(x2d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """STE fake-quant of a 2-D view [rows, cols] with qparams [rows, n_groups] (last partial group legal)."""
    rows, cols = x2d.shape
    xg = to_groups(x2d, spec.group_for(cols))  # [rows, n_groups, g]
    yg = FakeQuantSTE.apply(xg, scale[..., None], zero[..., None], spec)  # [rows, n_groups, g]
    return from_groups(yg, cols)


def fake_quant_weight(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
    """STE fake-quant of a weight [out, in] or a conv weight [out, in, *k] (viewed as [out, in * prod(k)]).
    Without qparams they are min-max of the current (detached) weight, so every weight is inside the range."""
    w2 = w.reshape(w.shape[0], -1) if spec.granularity != "tensor" else w.reshape(1, -1)
    if scale is None:
        scale, zero = choose_qparams(w2.detach(), spec)
    return fake_quant_groups(w2, scale, zero, spec).reshape(w.shape)


def fake_quant_act(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> torch.Tensor:
    """STE fake-quant of an activation [..., C] (channels last): per-token (a row per token) or per-tensor.
    `scale` None = dynamic min-max of x; else a fixed or learnable per-tensor scale [1, 1] (symmetric zero)."""
    x2 = as_2d(x, spec)  # [tokens, C] or [1, numel]
    if scale is None:
        scale, zero = choose_qparams(x2.detach(), spec)
    else:
        scale = scale.reshape(1, 1)
        zero = torch.full((1, 1), spec.format.sym_zero(spec), device=x.device)
    return fake_quant_groups(x2, scale, zero, spec).reshape(x.shape)


def pact_clip(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """clip(x, -alpha, alpha); d/d alpha = 1 where x > alpha, -1 where x < -alpha, 0 inside (PACT, symmetric)."""
    a = alpha.to(x.dtype)
    return torch.minimum(torch.maximum(x, -a), a)


def pact_quant(x: torch.Tensor, alpha: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """PACT: clip to [-alpha, alpha], then quantize that range (scale from alpha by the format, not learned
    through the rounding: the clipped values are inside, so the STE passes their gradient whole)."""
    y = pact_clip(x, alpha)
    a = alpha.detach().abs().reshape(1, 1).float()
    scale, zero = spec.format.qparams(-a, a, spec)
    y2 = as_2d(y, spec)
    return fake_quant_groups(y2, scale, zero, spec).reshape(x.shape)


def pact_scale(alpha: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The static per-tensor scale [1, 1] a PACT clip alpha stands for (what inference uses)."""
    a = alpha.detach().abs().reshape(1, 1).float()
    return spec.format.qparams(-a, a, spec)[0]
