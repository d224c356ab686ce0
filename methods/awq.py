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


def _out(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def _take(x, b: int, n: int):
    """First n rows of every tensor in x whose leading dim is the batch size b (hidden, masks, cos/sin)."""
    if isinstance(x, torch.Tensor):
        return x[:n] if x.dim() > 0 and x.shape[0] == b and b > 1 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_take(v, b, n) for v in x)
    if isinstance(x, dict):
        return {k: _take(v, b, n) for k, v in x.items()}
    return x


def subset(io: BlockIO, n: int | None) -> BlockIO:
    """The first n calibration windows of io (all when n is None)."""
    if n is None:
        return io
    hidden, kwargs, left = [], [], n
    for h, kw in zip(io.hidden, io.kwargs):
        if left <= 0:
            break
        k = min(left, h.shape[0])
        hidden.append(h[:k])
        kwargs.append(_take(kw, h.shape[0], k) if k < h.shape[0] else kw)
        left -= k
    return BlockIO(hidden, kwargs)


@torch.no_grad()
def inspect_cache(block: nn.Module, io: BlockIO, names: set) -> dict:
    """{submodule name or None (whole block): [(args, kwargs, FP output)]} over the batches of io."""
    cache: dict = {n: [] for n in names}
    hooks = []
    for name in names - {None}:
        def hook(_m, args, kwargs, out, name=name):
            cache[name].append((args, dict(kwargs), _out(out).detach()))
        hooks.append(get_module(block, name).register_forward_hook(hook, with_kwargs=True))
    try:
        for h, kw in zip(io.hidden, io.kwargs):
            out = _out(block(h, **kw))
            if None in cache:
                cache[None].append(((h,), kw, out))
    finally:
        for hk in hooks:
            hk.remove()
    return cache


class AWQ(Method):
    """Activation-aware scaling + clipping, block by block, FP outputs propagated (as in the paper's code)."""

    name = "awq"
    needs_calibration = True

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, n_grid: int = 20, clip: bool = True,
                 clip_grid: int = 20, max_shrink: float = 0.5, search_samples: int | None = None,
                 load_artifacts: str | None = None, propagate: str = "fp", offload: bool = True, batch_size: int = 8):
        self.spec = weight_spec(bits, group_size, sym)
        if self.spec is None:
            raise ConfigError("awq with bits=16 quantizes nothing; allowed bits: 2..8 (use method=fp16 instead)")
        if n_grid < 1 or clip_grid < 1 or not 0 <= max_shrink < 1:
            raise ConfigError(f"n_grid={n_grid} / clip_grid={clip_grid} / max_shrink={max_shrink} invalid; allowed: "
                              f"n_grid, clip_grid >= 1 and 0 <= max_shrink < 1")
        if search_samples is not None and search_samples < 1:
            raise ConfigError(f"search_samples={search_samples} invalid; allowed: null (all) or a positive int")
        self.n_grid, self.clip, self.clip_grid, self.max_shrink = int(n_grid), bool(clip), int(clip_grid), max_shrink
        self.search_samples, self.load_artifacts = search_samples, load_artifacts
        self.engine = EngineConfig(int(batch_size), bool(offload), propagate)
        self.engine_stats: dict = {}

    def quantize(self, model: nn.Module, ctx: Context) -> QuantResult:
        if ctx.calib is None:
            raise ConfigError("awq needs calibration data; set data=c4 (or data=random)")
        loaded = load_artifacts(self.load_artifacts) if self.load_artifacts else None
        result = QuantResult()

        def process(i: int, block: nn.Module, io: BlockIO) -> dict[str, torch.Tensor]:
            return self._block(f"{ctx.arch.blocks}.{i}.", i, block, io, ctx.arch, loaded, result)

        self.engine_stats = calibrate(model, ctx.arch, ctx.calib, ctx.device, process, self.engine).as_dict()
        return result

    def _artifact(self, loaded, key: str, search: Callable[[], torch.Tensor]) -> torch.Tensor:
        if loaded is None:
            return search()
        if key not in loaded:
            raise ConfigError(f"load_artifacts: {key!r} is not in {self.load_artifacts}; was it saved by an awq run "
                              f"of the same model and settings?")
        return loaded[key]

    def _block(self, prefix, i, block, io, arch, loaded, result) -> dict[str, torch.Tensor]:
        groups = [g for g in ([n for n in grp if isinstance(get_module(block, n), nn.Linear)]
                              for grp in arch.sequential) if g]
        first = {n: grp[0] for grp in groups for n in grp}
        H = {grp[0]: (None, 0) for grp in groups}
        absmean: dict[str, torch.Tensor] = {}

        def fn(name, x):
            H[name] = accumulate_hessian(*H[name], x)
            a = x.reshape(-1, x.shape[-1]).abs().double().sum(0)  # [in]
            absmean[name] = absmean.get(name, 0) + a

        record_inputs(block, io, list(H), fn)
        Hs = {n: h for n, (h, _) in H.items()}
        xmean = {n: (absmean[n] / H[n][1]).float() for n in H}
        pairs = [p for p in arch.pairs if pair_channels(block, p) is not None]
        cache = inspect_cache(block, subset(io, self.search_samples), {p.inspect for p in pairs if p.kind == "norm"}) \
            if loaded is None else {}
        alphas = {}
        for pair in pairs:
            f, t0 = first[pair.linears[0]], time.perf_counter()
            loss_fn = self._loss(block, pair, Hs[f], cache)
            weights = [get_module(block, n).weight.data for n in pair.linears]
            found = {}
            s = self._artifact(loaded, f"awq.{prefix}{pair.prev}.scales", lambda: found.setdefault("s", (
                awq_search_scales(loss_fn, xmean[f], weights, self.spec, self.n_grid)))[0])
            result.artifacts[f"awq.{prefix}{pair.prev}.scales"] = s.float().cpu()
            for n in pair.linears:
                alphas[n] = {"alpha": found["s"][1] if found else None, "search_seconds": time.perf_counter() - t0}
            fold_scales(block, pair, s)
            Hs[f] = Hs[f] / torch.outer(s, s).to(Hs[f])  # inputs of the pair's linears are now x / s
        qweights = {}
        for name, lin in block_linears(block, arch).items():
            qweights[name] = self._layer(prefix, i, name, lin.weight.data, Hs[first[name]], arch, loaded, result)
            result.layers[prefix + name].stats.update(alphas.get(name, {"alpha": None, "search_seconds": 0.0}))
        return qweights

    def _loss(self, block, pair, H, cache):
        """Output error of the pair's consumer for candidate weights of its linears."""
        if pair.kind == "linear":  # consumer = the linear itself: exact from its input Gram matrix
            ws = [get_module(block, n).weight.data.float() for n in pair.linears]
            return lambda cand: sum(float(((w - c) @ H * (w - c)).sum()) for w, c in zip(ws, cand))
        mod = block if pair.inspect is None else get_module(block, pair.inspect)

        def loss(cand):
            with torch.no_grad(), swapped_weights(block, dict(zip(pair.linears, cand))):
                err = sum(float(((_out(mod(*a, **kw)) - ref) ** 2).sum()) for a, kw, ref in cache[pair.inspect])
            return err / sum(ref.numel() for _, _, ref in cache[pair.inspect])
        return loss

    def _layer(self, prefix, i, name, W, H, arch, loaded, result) -> torch.Tensor:
        t0, full = time.perf_counter(), prefix + name
        mx = None
        if self.clip and name not in arch.no_clip:
            mx = self._artifact(loaded, f"awq.{full}.clip",
                                lambda: awq_search_clip(W, H / 2, self.spec, self.clip_grid, self.max_shrink))
            result.artifacts[f"awq.{full}.clip"] = mx.float().cpu()
        q = clipped_qtensor(W.float(), self.spec, None if mx is None else mx.to(W.device))
        Wq = q.dequantize()
        check_finite(full, Wq)
        res = LayerResult(q, stats={"layer": full, "method": self.name, "block": i, "shape": list(W.shape),
                                    "out_rel_err": output_rel_error(W, Wq, H), "weight_rel_err": rel_error(W, Wq),
                                    "clipped": mx is not None, "seconds": time.perf_counter() - t0})
        result.layers[full] = res
        result.stats.append(res.stats)
        return Wq
