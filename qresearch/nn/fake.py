"""FakeQuantLinear: dequantized weights in the model dtype (+ optional activation fake-quant / fp outlier columns)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.primitives import choose_qparams, dequantize, quantize
from ..quant.spec import QuantSpec
from ..records import ActQuant, LayerResult
from .outliers import OutlierCounter, outlier_columns


def act_qparams(x: torch.Tensor, act: ActQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for an activation [..., in]: the static ones, or dynamic from x."""
    if act.static_scale is None:
        return choose_qparams(x, act.spec)
    scale = act.static_scale.to(x.device)
    zero = act.static_zero.to(x.device) if act.static_zero is not None else \
        torch.full_like(scale, act.spec.format.sym_zero(act.spec))
    return scale, zero


def fake_quant_act(x: torch.Tensor, act: ActQuant) -> torch.Tensor:
    """Quantize-dequantize an activation [..., in]: dynamic per-token/per-tensor, or with static qparams."""
    scale, zero = act_qparams(x, act)
    return dequantize(quantize(x, scale, zero, act.spec), scale, zero, act.spec).to(x.dtype)


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
        t = None if self.act is None else self.act.outlier_threshold
        self.outlier_counter = None if t is None else OutlierCounter(self.in_features)  # LLM.int8(), per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outlier_counter is not None:
            return self._decomposed(x)
        if self.outliers is None:
            xq = fake_quant_act(x, self.act) if self.act is not None else x
            return F.linear(xq, self.weight, self.bias)
        regular = x.masked_fill(self.outliers, 0)  # outlier columns go through the fp path only
        xq = fake_quant_act(regular, self.act) if self.act is not None else regular
        y = F.linear(xq, self.weight.masked_fill(self.outliers, 0), self.bias)
        return y + F.linear(x[..., self.outliers], self.fp_weight_cols)

    def _decomposed(self, x: torch.Tensor) -> torch.Tensor:
        """LLM.int8(): columns with |x| >= threshold in this call through a float matmul, the rest fake-quantized."""
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        cols = outlier_columns(x2, self.act.outlier_threshold, self.outlier_counter)
        y = F.linear(fake_quant_act(x2.masked_fill(cols, 0), self.act), self.weight, self.bias)
        y = y + F.linear(x2[:, cols], self.weight[:, cols])  # dequantized weight columns, float activations
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = "none" if self.act is None else (self.act.spec.act_tag + ("-static" if self.act.static_scale is not None
                                                                         else "-dynamic"))
        return (f"in={self.in_features}, out={self.out_features}, w={self.spec.tag}, act={act}, "
                f"outliers={0 if self.outliers is None else int(self.outliers.sum())}, kernel=fake")


def build_fake(lin: nn.Linear, res: LayerResult) -> nn.Module:
    """swap_linears builder for modules=fake."""
    w = lin.weight.data
    bias = None if lin.bias is None else lin.bias.data
    return FakeQuantLinear(res.weight.dequantize(w.dtype).to(w.device), bias, res, fp_weight=w)
