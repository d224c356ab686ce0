"""Mixed precision by sensitivity: a step that measures each linear's sensitivity at every candidate width and
allocates bits under an average bits-per-weight budget; the next step (rtn / gptq / awq with bits_map=prior)
quantizes with that map. Recipes: method=mixed_rtn | mixed_gptq | mixed_awq.

Sensitivity of a linear at width b (RTN under the run's format, group and scales; Hessian H from FP calibration
inputs, block by block):
  output:         E||x (W - Q_b(W))^T||^2 = tr(D H D^T) / 2   (the layer's output error)
  hessian_trace:  tr(H) / in * ||W - Q_b(W)||_F^2              (HAWQ-style: mean curvature x perturbation)
Costs are the footprint's storage bits at width b (codes + scales + zeros + palettes), so the budget is the effective
bits per weight the run records. The default widths start at 3: both proxies are layer-local and additive, and
with 2 among the candidates they rate a 2-bit o_proj / down_proj as cheap (small absolute output error) while it
costs the model far more (results/formats.md: a 3.5-bit allocation with widths 2..8 lost to uniform w3). The allocation is saved as artifacts bits.<layer> (artifacts.safetensors of the
run; reload with bits_map=<run dir>/artifacts.safetensors) and in the step's record (metrics.json).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from qresearch.artifacts import bits_map_artifacts
from qresearch.calib.engine import EngineConfig
from qresearch.calib.stats import input_stats, output_sq_error
from qresearch.errors import ConfigError
from qresearch.eval.footprint import layer_bits
from qresearch.method import Block, BlockMethod, Context, Recorder, TagFlag, require_weight_spec
from qresearch.models.arch import target_linears
from qresearch.quant import QuantSpec, quantize_tensor
from qresearch.quant.allocate import allocate_greedy, allocate_random, bits_per_weight
from qresearch.records import LayerResult, QuantResult

PROXIES = ("output", "hessian_trace")
ALLOCATORS = ("greedy", "random")


def sensitivity(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, proxy: str) -> tuple[float, float]:
    """(error proxy, storage bits) of RTN-quantizing W [out, in] under spec, given its input Hessian H [in, in]."""
    q = quantize_tensor(W.float(), spec)
    Wq = q.dequantize()
    if proxy == "output":
        err = output_sq_error(W, Wq, H)
    else:
        err = float(torch.trace(H)) / H.shape[0] * float(((W.float() - Wq) ** 2).sum())
    return err, float(sum(layer_bits(LayerResult(q)).values()))


def parse_candidates(widths, spec: QuantSpec) -> list[int]:
    """Sorted distinct candidate widths, each allowed by the format (at least two)."""
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in widths):
        raise ConfigError(f"mixed candidates={list(widths)} invalid; allowed: a list of bit widths, e.g. [2,3,4,8]")
    bits = sorted(set(widths))
    bad = [b for b in bits if b not in spec.format.bits_allowed]
    if len(bits) < 2 or bad:
        raise ConfigError(f"mixed candidates={bits}: need >= 2 widths allowed by qformat={spec.qformat} "
                          f"({', '.join(map(str, spec.format.bits_allowed))})")
    return bits


class MixedPrecision(BlockMethod):
    """Measure per-linear sensitivity at each candidate width; allocate bits under `budget` bits per weight."""

    name = "mixed"
    tag_flags = (TagFlag("budget", None, "b{}"), TagFlag("proxy", "output", "{}"),
                 TagFlag("allocator", "greedy", "{}"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 scale_bits: int | None = None, scale_level2: str = "channel", budget: float = 3.5,
                 candidates: list[int] | tuple[int, ...] = (3, 4, 5, 6, 8), proxy: str = "output",
                 allocator: str = "greedy",
                 propagate: str = "fp", offload: bool = True, batch_size: int = 8):
        self.base = require_weight_spec(self.name, bits, group_size, sym, qformat, scale_bits, scale_level2)
        self.candidates = parse_candidates(list(candidates), self.base)
        if proxy not in PROXIES or allocator not in ALLOCATORS:
            raise ConfigError(f"mixed proxy={proxy!r} / allocator={allocator!r} unknown; allowed: "
                              f"{', '.join(PROXIES)} / {', '.join(ALLOCATORS)}")
        if not budget > 0:
            raise ConfigError(f"mixed budget={budget} invalid; allowed: average bits per weight > 0")
        self.budget, self.proxy, self.allocator = float(budget), proxy, allocator
        self.engine = EngineConfig(int(batch_size), offload, propagate)
        self._err: dict[str, dict[int, float]] = {}
        self._cost: dict[str, dict[int, float]] = {}
        self._n: dict[str, int] = {}

    def prepare(self, model, ctx: Context) -> None:
        """Refuse a budget below the cheapest allocation before calibrating (RTN costs at the smallest width)."""
        low = replace(self.base, bits=self.candidates[0])
        lins = target_linears(model, ctx.arch, False)
        bits = sum(sum(layer_bits(LayerResult(quantize_tensor(m.weight.data.float(), low))).values())
                   for m in lins.values())
        n = sum(m.weight.numel() for m in lins.values())
        if bits > self.budget * n:
            raise ConfigError(f"mixed budget={self.budget} bits/weight is below the cheapest allocation "
                              f"(all w{low.bits}: {bits / n:.3f} bits/weight); raise it or add smaller candidates")

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        stats = input_stats(blk.module, blk.io, [grp[0] for grp in blk.groups])
        for grp in blk.groups:
            H = stats[grp[0]].hessian
            for name in grp:
                full, W = blk.prefix + name, blk.linear(name).weight.data
                res = {b: sensitivity(W, H, replace(self.base, bits=b), self.proxy) for b in self.candidates}
                self._err[full] = {b: e for b, (e, _) in res.items()}
                self._cost[full] = {b: c for b, (_, c) in res.items()}
                self._n[full] = W.numel()
                rec.result.stats.append({"layer": full, "method": self.name, "block": blk.index, "shape": list(W.shape),
                                         **{f"{self.proxy}_w{b}": e for b, (e, _) in res.items()}})
        return {}  # nothing quantized here: the next block sees FP outputs

    def quantize(self, model, ctx: Context) -> QuantResult:
        result = super().quantize(model, ctx)
        if self.allocator == "greedy":
            alloc = allocate_greedy(self._err, self._cost, self._n, self.budget)
        else:
            alloc = allocate_random(self._cost, self._n, self.budget, ctx.seed)
        for row in result.stats:
            row["alloc_bits"] = alloc[row["layer"]]
        result.artifacts.update(bits_map_artifacts(alloc))
        hist = {b: sum(1 for v in alloc.values() if v == b) for b in self.candidates}
        result.info.update(bits_map=alloc, bits_histogram=hist, budget=self.budget,
                           bits_per_weight=bits_per_weight(alloc, self._cost, self._n),
                           total_error={"allocated": sum(self._err[k][b] for k, b in alloc.items()),
                                        **{f"uniform_w{b}": sum(e[b] for e in self._err.values())
                                           for b in self.candidates}})
        return result
