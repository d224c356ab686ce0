"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights with per-input-channel scales
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded into the preceding norm (or linear) through the architecture
table's scale pairs, then quantize weights (int, symmetric) and activations as the paper's schemes:
O1 per-token dynamic, O2 per-tensor dynamic, O3 per-tensor static (scale from calibration, after smoothing).

Weights: per output channel by default; the paper's O1-O3 use per-tensor weights (`weight_granularity=tensor`).
Not quantized here (nor by the naive W8A8 baseline): the attention BMMs (q.k^T, attn.v) the paper also runs in int8.
"""
from __future__ import annotations

import copy
import time

import torch

from qresearch.calib.blockio import run_block, subset
from qresearch.calib.engine import EngineConfig
from qresearch.calib.fold import checked_fold, foldable_pairs
from qresearch.calib.stats import input_stats
from qresearch.errors import ConfigError
from qresearch.eval.ppl import chunk_nll
from qresearch.method import Block, BlockMethod, Context, Recorder, TagFlag, require_calibration
from qresearch.nn.swap import swap_linears
from qresearch.quant import QuantSpec, qparams_from_minmax, quantize_tensor
from qresearch.records import ActQuant, QuantResult

SCHEMES = {"O1": ("token", False), "O2": ("tensor", False), "O3": ("tensor", True)}  # act granularity, static
PAIRS = ("norm", "all")  # norm: the paper's norm -> linears pairs; all: also the table's linear -> linear pairs
WEIGHT_GRANULARITIES = ("channel", "tensor")


def smooth_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [C] = max|X_j|^alpha / max|W_j|^(1-alpha), the weight max over every linear fed by the channel (as the
    paper, both clamped at 1e-5); s = 1 where the channel never fired on calibration data (nothing to migrate)."""
    w_max = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)  # [C]
    x = x_absmax.float().to(w_max.device)
    s = (x.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    return torch.where(x > 0, s, torch.ones_like(s))


def check_alpha(alpha: float, what: str = "alpha") -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothquant {what}={alpha} is out of range; allowed: 0 <= alpha <= 1")


def act_quant(spec: QuantSpec, static: bool, absmax: float) -> ActQuant:
    """Activation quantization of one linear input: dynamic, or static per-tensor from its calibration max |x|."""
    if not static:
        return ActQuant(spec)
    m = torch.tensor([[absmax]])
    scale, _ = qparams_from_minmax(-m, m, spec)
    return ActQuant(spec, static_scale=scale)  # [1, 1]


class SmoothQuant(BlockMethod):
    """Smooth block by block (FP block outputs propagate: smoothing keeps the FP function), then quantize."""

    name = "smoothquant"
    tag_flags = (TagFlag("scheme", "O1", "{}"), TagFlag("alpha", 0.5, "alpha{}"),
                 TagFlag("alpha_grid", None, "alphasearch"), TagFlag("pairs", "norm", "pairs-{}"),
                 TagFlag("weight_granularity", "channel", "w{}"))
    folds_scales = True  # the outlier report measures activations again after this step

    def __init__(self, bits: int = 8, act_bits: int = 8, scheme: str = "O1", alpha: float = 0.5,
                 alpha_grid: list[float] | None = None, search_samples: int = 16, pairs: str = "norm",
                 weight_granularity: str = "channel", offload: bool = True, batch_size: int = 8):
        check_alpha(alpha)
        for a in alpha_grid or []:
            check_alpha(a, "alpha_grid entry")
        if scheme not in SCHEMES:
            raise ConfigError(f"smoothquant scheme={scheme!r} is unknown; allowed: {', '.join(SCHEMES)}")
        if pairs not in PAIRS or weight_granularity not in WEIGHT_GRANULARITIES:
            raise ConfigError(f"smoothquant pairs={pairs!r} / weight_granularity={weight_granularity!r} invalid; "
                              f"allowed: pairs {'|'.join(PAIRS)}, weight_granularity {'|'.join(WEIGHT_GRANULARITIES)}")
        if not 2 <= bits <= 8 or not 2 <= act_bits <= 8:
            raise ConfigError(f"smoothquant bits={bits} / act_bits={act_bits} out of range; allowed: 2..8 each")
        if search_samples < 1:
            raise ConfigError(f"smoothquant search_samples={search_samples} invalid; allowed: a positive int")
        gran, self.static = SCHEMES[scheme]
        self.spec = QuantSpec(bits=bits, group_size=-1, sym=True, granularity=weight_granularity)
        self.act = QuantSpec(bits=act_bits, sym=True, granularity=gran)
        self.scheme, self.alpha, self.pairs, self.weight_granularity = scheme, float(alpha), pairs, weight_granularity
        self.alpha_grid = [float(a) for a in alpha_grid] if alpha_grid else None
        self.search_samples = search_samples
        self.engine = EngineConfig(batch_size, offload, "fp")
        self._alpha = self.alpha
        self._folds: list[dict] = []

    def quantize(self, model, ctx: Context) -> QuantResult:
        require_calibration(self.name, ctx)
        search = self._search_alpha(model, ctx) if self.alpha_grid else None
        self._alpha = search["alpha"] if search else self.alpha
        self._folds = []
        result = super().quantize(model, ctx)
        refused = [f for f in self._folds if not f["folded"]]
        result.info.update(alpha=self._alpha, alpha_search=search, folds=self._folds,
                           folds_refused=len(refused), folds_applied=len(self._folds) - len(refused))
        return result

    def _search_alpha(self, model, ctx: Context) -> dict:
        """Per-model alpha: the grid point whose quantized model (fake modules, on a copy) has the lowest mean NLL on
        the first `search_samples` calibration windows."""
        windows = ctx.calib[:self.search_samples]
        losses = {}
        for a in self.alpha_grid:
            self._alpha, self._folds = a, []
            trial = copy.deepcopy(model)
            swap_linears(trial, super().quantize(trial, ctx), "fake")
            nll = chunk_nll(trial, windows, ctx.device, batch_size=self.engine.batch_size, desc=f"sq alpha {a}")
            losses[a] = float(nll.sum()) / (windows.numel() - windows.shape[0])
            del trial
        best = min(losses, key=losses.get)
        return {"alpha": best, "calib_nll": {str(a): v for a, v in losses.items()}, "windows": int(windows.shape[0])}

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        first = {n: grp[0] for grp in blk.groups for n in grp}
        stats = input_stats(blk.module, blk.io, [grp[0] for grp in blk.groups], want=("absmax",))
        before = {f: st.absmax for f, st in stats.items()}  # [in] per shared input, FP model
        after = dict(before)
        one = subset(blk.io, 1)
        refs = run_block(blk.module, one)  # FP outputs: every fold must leave them unchanged
        for pair in foldable_pairs(blk.module, blk.ctx.arch):
            if self.pairs == "norm" and pair.kind != "norm":
                continue
            f = first[pair.linears[0]]
            s = smooth_scales(before[f], [blk.linear(n).weight.data for n in pair.linears], self._alpha)
            kept, err = checked_fold(blk.module, pair, s, lambda: run_block(blk.module, one), refs)
            self._folds.append({"block": blk.index, "prev": pair.prev, "linears": list(pair.linears),
                                "folded": kept, "block_rel_err": err})
            if kept:
                after[f] = before[f] / s.to(before[f])  # the pair's linears now see x / s
        out = {}
        for grp in blk.groups:
            for name in grp:
                t0, W = time.perf_counter(), blk.linear(name).weight.data
                mx_b, mx_a = float(before[grp[0]].max()), float(after[grp[0]].max())
                out[name] = rec.record(blk.prefix + name, quantize_tensor(W, self.spec), W, block=blk.index,
                                       act=act_quant(self.act, self.static, mx_a), t0=t0, alpha=self._alpha,
                                       x_absmax_before=mx_b, x_absmax_after=mx_a,
                                       smoothed=bool(not torch.equal(before[grp[0]], after[grp[0]])))
        return out
