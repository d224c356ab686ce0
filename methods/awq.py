"""AWQ (Lin et al. 2023): per scaling pair, grid-search s = mean|x|^alpha minimizing the output error of the
pair's consumer (attention / MLP / block, or the linear itself) under pseudo-quantized weights, fold s into the
model, then search per-group weight clipping. Searched scales and clips are artifacts and can be reloaded."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from qresearch.method import Context, LayerResult, Method, QuantResult
from qresearch.models.arch import block_linears, get_module
from qresearch.pipeline.engine import BlockIO, EngineConfig, calibrate, record_inputs, swapped_weights
from qresearch.pipeline.fold import fold_scales, pair_channels
from qresearch.pipeline.hessian import accumulate_hessian, output_rel_error
from qresearch.quant import QTensor, QuantSpec, group_minmax, qparams_from_minmax, quantize, weight_spec
from qresearch.quant.primitives import dequantize, to_groups
from qresearch.quant.spec import ConfigError
from qresearch.quant.stats import check_finite, rel_error
from qresearch.tracking.store import load_artifacts

from .awq_search import InspectCache


def clipped_qtensor(W: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None) -> QTensor:
    """Min-max quantization of W [out, in] with each group's range clipped to [-max_val, max_val] ([out, n_groups])."""
    xmin, xmax = group_minmax(W, spec)  # [out, n_groups]
    if max_val is not None:
        xmin, xmax = torch.maximum(xmin, -max_val), torch.minimum(xmax, max_val)
    scale, zero = qparams_from_minmax(xmin, xmax, spec)
    return QTensor(quantize(W, scale, zero, spec), scale, zero, spec)


def pseudo_quantize(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN quantize-dequantize (float32) of W [out, in]."""
    return clipped_qtensor(W.float(), spec).dequantize()


def act_scales(x_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, clamped and normalised by sqrt(max * min) so scales sit around 1 ([C])."""
    s = x_absmean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_search_scales(loss_fn: Callable[[list[torch.Tensor]], float], x_absmean: torch.Tensor,
                      weights: list[torch.Tensor], spec: QuantSpec, n_grid: int = 20
                      ) -> tuple[torch.Tensor, float, list[float]]:
    """Grid alpha in {0, 1/n, ..., (n-1)/n}; for each, candidate weights Q(W * s) / s go to loss_fn.
    Returns (best s [C], best alpha, loss per grid point). alpha = 0 is plain RTN, so the result is never worse."""
    losses, best = [], (math.inf, None, 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = act_scales(x_absmean, alpha).to(weights[0].device)
        cand = [pseudo_quantize(w.float() * s, spec) / s for w in weights]
        loss = float(loss_fn(cand))
        losses.append(loss)
        if loss < best[0]:
            best = (loss, s, alpha)
    if best[1] is None:
        raise FloatingPointError(f"AWQ scale search: every grid point gave a non-finite loss ({losses[:3]}...)")
    return best[1], best[2], losses


def awq_search_clip(W: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, n_grid: int = 20,
                    max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group clip max_val [out, n_groups] minimizing E[(x_g . (w_g - q(clip(w_g))))^2] for each group g,
    from the input Gram matrix gram = E[x x^T] [in, in] (all calibration tokens, no subsampling)."""
    W = W.float()
    out, cols = W.shape
    g, ng = spec.group_for(cols), spec.n_groups(cols)
    pad = ng * g - cols
    Gp = torch.nn.functional.pad(gram.float(), (0, pad, 0, pad))  # [ng*g, ng*g], zero rows for padding
    Gb = torch.stack([Gp[k * g:(k + 1) * g, k * g:(k + 1) * g] for k in range(ng)])  # [ng, g, g]
    Wg = to_groups(W, g)  # [out, ng, g]
    absmax = Wg.abs().amax(dim=-1)  # [out, ng]
    best_err = torch.full_like(absmax, math.inf)
    best = absmax.clone()
    for k in range(int(max_shrink * n_grid)):
        mx = absmax * (1 - k / n_grid)
        q = clipped_qtensor(W, spec, mx)
        D = Wg - to_groups(dequantize(q.codes, q.scale, q.zero, spec), g)  # [out, ng, g]
        err = torch.einsum("ong,ngh,onh->on", D, Gb, D)  # [out, ng]
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, mx, best)
    return best
