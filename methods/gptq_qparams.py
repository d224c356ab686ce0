"""Per-group qparams of the GPTQ solve through the spec's numeric format: one group fitted from its current
columns (`fit_cols`), the groups fixed before the column loop (given, static, or one grid per tensor), what the
whole tensor shares (`layer_params`: second-level scales, a per-layer codebook), and the QTensor's stacked tables."""
from __future__ import annotations

import torch

from qresearch.quant import QTensor, QuantSpec
from qresearch.quant.format_base import LayerParams
from qresearch.quant.primitives import fit_qparams, group_weights, to_groups

GroupQP = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # scale [out | 1], zero, lut [out | 1, K]


def fit_cols(cols: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None, layer: LayerParams) -> GroupQP:
    """(scale, zero, lut) of one group from its columns cols [out, k] by the format's fit (weight [k] or None)."""
    qp = spec.format.fit(cols[:, None, :], spec, None if weight is None else weight[None, None, :], layer)
    return qp.scale[:, 0], qp.zero[:, 0], None if qp.lut is None else qp.lut[:, 0]  # [out], [out], [out | 1, K]


def layer_params(W: torch.Tensor, spec: QuantSpec, wdiag: torch.Tensor | None, qparams) -> LayerParams:
    """What W's groups share, fixed from the unquantized W (dead columns zeroed): an earlier step's scale2 when
    its QTensor is given, else the format's prepare_layer (weighted by wdiag [in] for fitted formats)."""
    if isinstance(qparams, QTensor):
        return LayerParams(qparams.scale2, None)
    out, cols = W.shape
    g = spec.group_for(cols)
    return spec.format.prepare_layer(to_groups(W, g), spec, group_weights(wdiag, out, cols, g))


def fixed_groups(W: torch.Tensor, spec: QuantSpec, wdiag: torch.Tensor | None, layer: LayerParams,
                 qparams, static_groups: bool) -> list[GroupQP] | None:
    """Per-group qparams fixed before the column loop: given ones (an earlier step's), static groups from the
    unquantized weights, or one set for the whole tensor (granularity tensor); None = fitted as the loop goes."""
    out, cols = W.shape
    g, n_groups = spec.group_for(cols), spec.n_groups(cols)
    if qparams is not None:
        scale, zero = (qparams.scale, qparams.zero) if isinstance(qparams, QTensor) else qparams
        scale, zero = scale.float().to(W.device), zero.float().to(W.device)
        lut = qparams.lut.to(W.device) if isinstance(qparams, QTensor) and qparams.lut is not None else None
        if scale.shape != (out, n_groups) or zero.shape != (out, n_groups):
            raise ValueError(f"qparams shapes {tuple(scale.shape)} / {tuple(zero.shape)} do not fit W "
                             f"{tuple(W.shape)} with group {g}: expected {(out, n_groups)}")
        return [(scale[:, k], zero[:, k], None if lut is None else lut[:, min(k, lut.shape[1] - 1)])
                for k in range(n_groups)]
    if spec.granularity == "tensor":  # one grid for the whole matrix, from the unquantized weights
        qp, _ = fit_qparams(W, spec, None if wdiag is None else wdiag.expand_as(W), layer=layer)
        return [(qp.scale[0], qp.zero[0], None if qp.lut is None else qp.lut[0])]
    if static_groups:
        return [fit_cols(W[:, k * g:(k + 1) * g], spec, None if wdiag is None else wdiag[k * g:(k + 1) * g], layer)
                for k in range(n_groups)]
    return None


def stack_qparams(groups: list[GroupQP], spec: QuantSpec, out: int) -> tuple[torch.Tensor, ...]:
    """The QTensor's scale, zero [out | 1, n_groups] and lut [out | 1, n_groups | 1, K] from per-group qparams."""
    rows = 1 if spec.granularity == "tensor" else out
    scale = torch.stack([f[0].expand(rows) for f in groups], dim=1)
    zero = torch.stack([f[1].expand(rows) for f in groups], dim=1)
    lut = None if groups[0][2] is None else torch.stack([f[2] for f in groups], dim=1)
    return scale, zero, lut
