"""AWQ (Lin et al. 2023): per scaling pair, grid-search s = mean|x|^alpha minimizing the output error of the
pair's consumer (attention / MLP / block, or the linear itself) under pseudo-quantized weights, fold s into the
model, then search per-group weight clipping. Searched scales and clips are artifacts and can be reloaded."""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from qresearch.artifacts import load_artifacts
from qresearch.calib.blockio import first_output, subset
from qresearch.calib.engine import EngineConfig
from qresearch.calib.fold import fold_scales, foldable_pairs
from qresearch.calib.hooks import output_cache, swapped_weights
from qresearch.calib.stats import input_stats
from qresearch.errors import ConfigError
from qresearch.method import Block, BlockMethod, Context, Recorder, TagFlag, require_weight_spec
from qresearch.models.arch import get_module
from qresearch.quant import QTensor, QuantSpec, quantize_tensor
from qresearch.quant.primitives import to_groups


def clipped_qtensor(W: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None) -> QTensor:
    """Quantization of W [out, in] by the spec's format with each group's values clipped to [-max_val, max_val]
    ([out, n_groups]) for fitting its qparams (min-max formats: the clipped range)."""
    return quantize_tensor(W, spec, clip=max_val)


def pseudo_quantize(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN quantize-dequantize (float32) of W [out, in]."""
    return clipped_qtensor(W.float(), spec).dequantize()


def act_scales(x_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, clamped and normalised by sqrt(max * min) so scales sit around 1 ([C])."""
    s = x_absmean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def awq_search_scales(loss_fn: Callable[[list[torch.Tensor]], float], x_absmean: torch.Tensor,
                      weights: list[torch.Tensor], spec: QuantSpec | list[QuantSpec], n_grid: int = 20
                      ) -> tuple[torch.Tensor, float, list[float]]:
    """Grid alpha in {0, 1/n, ..., (n-1)/n}; for each, candidate weights Q(W * s) / s go to loss_fn (`spec`: one for
    all weights or one per weight). Returns (best s [C], best alpha, loss per grid point). alpha = 0 is plain RTN,
    so the result is never worse."""
    specs = spec if isinstance(spec, list) else [spec] * len(weights)
    losses, best = [], (math.inf, None, 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = act_scales(x_absmean, alpha).to(weights[0].device)
        cand = [pseudo_quantize(w.float() * s, sp) / s for w, sp in zip(weights, specs)]
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
        D = Wg - to_groups(q.dequantize(), g)  # [out, ng, g]
        err = torch.einsum("ong,ngh,onh->on", D, Gb, D)  # [out, ng]
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, mx, best)
    return best


class AWQ(BlockMethod):
    """Activation-aware scaling + clipping, block by block, FP outputs propagated (as in the paper's code)."""

    name = "awq"
    tag_flags = (TagFlag("clip", True, "noclip"), TagFlag("n_grid", 20, "grid{}"),
                 TagFlag("search_samples", None, "n{}"), TagFlag("load_artifacts", None, "loaded"),
                 TagFlag("bits_map", None, "bitsmap"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 scale_bits: int | None = None, scale_level2: str = "channel", bits_map: str | None = None,
                 n_grid: int = 20, clip: bool = True, clip_grid: int = 20, max_shrink: float = 0.5,
                 search_samples: int | None = None, load_artifacts: str | None = None, propagate: str = "fp",
                 offload: bool = True, batch_size: int = 8):
        self.spec = require_weight_spec(self.name, bits, group_size, sym, qformat, scale_bits, scale_level2)
        self.use_bits_map(bits_map)
        if clip and self.spec.granularity == "tensor":
            raise ConfigError("awq clip searches a range per group / channel; with a per-layer palette "
                              "(group_size=0) set method.awq.clip=false")
        if n_grid < 1 or clip_grid < 1 or not 0 <= max_shrink < 1:
            raise ConfigError(f"n_grid={n_grid} / clip_grid={clip_grid} / max_shrink={max_shrink} invalid; allowed: "
                              f"n_grid, clip_grid >= 1 and 0 <= max_shrink < 1")
        if search_samples is not None and search_samples < 1:
            raise ConfigError(f"search_samples={search_samples} invalid; allowed: null (all) or a positive int")
        self.n_grid, self.clip, self.clip_grid, self.max_shrink = n_grid, clip, clip_grid, max_shrink
        self.search_samples, self.load_artifacts = search_samples, load_artifacts
        self.engine = EngineConfig(batch_size, offload, propagate)
        self._loaded = None

    def prepare(self, model, ctx: Context) -> None:
        self._loaded = load_artifacts(self.load_artifacts) if self.load_artifacts else None

    def _artifact(self, key: str, search: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._loaded is None:
            return search()
        if key not in self._loaded:
            raise ConfigError(f"load_artifacts: {key!r} is not in {self.load_artifacts}; was it saved by an awq run "
                              f"of the same model and settings?")
        return self._loaded[key]

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        first = {n: grp[0] for grp in blk.groups for n in grp}
        stats = input_stats(blk.module, blk.io, [grp[0] for grp in blk.groups], want=("hessian", "absmean"))
        Hs = {n: st.hessian for n, st in stats.items()}
        pairs = foldable_pairs(blk.module, blk.ctx.arch)
        cache = {} if self._loaded is not None else \
            output_cache(blk.module, subset(blk.io, self.search_samples), {p.inspect for p in pairs if p.kind == "norm"})
        searched = {}
        for pair in pairs:
            f, t0 = first[pair.linears[0]], time.perf_counter()
            key = f"awq.{blk.prefix}{pair.prev}.scales"
            weights = [blk.linear(n).weight.data for n in pair.linears]
            found = {}
            specs = [self.spec_for(blk.prefix + n) for n in pair.linears]
            s = self._artifact(key, lambda: found.setdefault("s", awq_search_scales(
                self._loss(blk.module, pair, Hs[f], cache), stats[f].absmean, weights, specs, self.n_grid))[0])
            rec.result.artifacts[key] = s.float().cpu()
            for n in pair.linears:
                searched[n] = {"alpha": found["s"][1] if found else None, "search_seconds": time.perf_counter() - t0}
            fold_scales(blk.module, pair, s)
            Hs[f] = Hs[f] / torch.outer(s, s).to(Hs[f])  # inputs of the pair's linears are now x / s
        return {name: self._layer(blk, name, Hs[first[name]], rec, searched.get(name))
                for grp in blk.groups for name in grp}

    def _loss(self, block, pair, H, cache):
        """Output error of the pair's consumer for candidate weights of its linears."""
        if pair.kind == "linear":  # consumer = the linear itself: exact from its input Gram matrix
            ws = [get_module(block, n).weight.data.float() for n in pair.linears]
            return lambda cand: sum(float(((w - c) @ H * (w - c)).sum()) for w, c in zip(ws, cand))
        mod = block if pair.inspect is None else get_module(block, pair.inspect)

        def loss(cand):
            with torch.no_grad(), swapped_weights(block, dict(zip(pair.linears, cand))):
                err = sum(float(((first_output(mod(*a, **kw)) - ref) ** 2).sum()) for a, kw, ref in cache[pair.inspect])
            return err / sum(ref.numel() for _, _, ref in cache[pair.inspect])
        return loss

    def _layer(self, blk: Block, name: str, H: torch.Tensor, rec: Recorder, searched: dict | None) -> torch.Tensor:
        t0, full = time.perf_counter(), blk.prefix + name
        W, spec = blk.linear(name).weight.data, self.spec_for(full)
        mx = None
        if self.clip and name not in blk.ctx.arch.no_clip:
            mx = self._artifact(f"awq.{full}.clip",
                                lambda: awq_search_clip(W, H / 2, spec, self.clip_grid, self.max_shrink))
            rec.result.artifacts[f"awq.{full}.clip"] = mx.float().cpu()
        q = clipped_qtensor(W.float(), spec, None if mx is None else mx.to(W.device))
        return rec.record(full, q, W, block=blk.index, H=H, t0=t0, clipped=mx is not None,
                          **(searched or {"alpha": None, "search_seconds": 0.0}))
