"""FakeQuantLinear: dequantized weights in the model dtype (+ optional activation fake-quant / fp outlier columns)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..method import ActQuant, LayerResult
from ..quant.primitives import choose_qparams, dequantize, quantize
from ..quant.spec import QuantSpec


def fake_quant_act(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """Quantize-dequantize an activation [..., in]: dynamic per-token/per-tensor, or with a static scale."""
    if act.static_scale is not None:
        scale = act.static_scale.to(x.device)
        zero = torch.full_like(scale, 2 ** (act.spec.bits - 1)) if not act.spec.is_fp8 else torch.zeros_like(scale)
    else:
        scale, zero = choose_qparams(x, act.spec)
    return dequantize(quantize(x, scale, zero, act.spec), scale, zero, act.spec).to(x.dtype)


def layer_weight(res: LayerResult, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized weight [out, in], honouring an act-order group index."""
    w = res.weight
    if res.g_idx is None:
        return w.dequantize(dtype)
    # act-order: column j uses qparams of group g_idx[j]
    scale = w.scale[:, res.g_idx]  # [out, in]
    zero = w.zero[:, res.g_idx]  # [out, in]
    return ((w.codes.float() - zero) * scale).to(dtype)


class FakeQuantLinear(nn.Module):
    """y = fq_act(x) @ deq(W)^T + b, with input columns in `outliers` taken at full precision."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, res: LayerResult,
                 fp_weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)  # [out, in] dequantized
        self.register_buffer("bias", bias)
        self.act = res.act
        self.spec: QuantSpec = res.weight.spec
        self.register_buffer("outliers", res.outliers)  # [in] bool or None
        self.register_buffer("fp_weight_cols", None if res.outliers is None else fp_weight[:, res.outliers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outliers is None:
            xq = fake_quant_act(x, self.act) if self.act is not None else x
            return F.linear(xq, self.weight, self.bias)
        regular = x.masked_fill(self.outliers, 0)  # outlier columns go through the fp path only
        xq = fake_quant_act(regular, self.act) if self.act is not None else regular
        y = F.linear(xq, self.weight.masked_fill(self.outliers, 0), self.bias)
        return y + F.linear(x[..., self.outliers], self.fp_weight_cols)

    def extra_repr(self) -> str:
        act = "none" if self.act is None else (self.act.spec.tag + ("-static" if self.act.static_scale is not None
                                                                     else "-dynamic"))
        return (f"in={self.in_features}, out={self.out_features}, w={self.spec.tag}, act={act}, "
                f"outliers={0 if self.outliers is None else int(self.outliers.sum())}, kernel=fake")
