"""Data-free quantization (Nagel et al. 2019): cross-layer equalization + RTN + bias correction.

LLM blocks (the DFQ step): CLE on the architecture table's linear -> linear scale pairs, which are exact (OPT's
fc1 -> ReLU -> fc2, Llama's v -> o and up -> down through act(gate) * up; pairs whose shapes do not line up, such
as v -> o under grouped-query attention, are skipped and listed in the step's info), then RTN per tensor /
channel / group, then empirical bias correction: each linear gets bias += (W - W_q) E[x], with E[x] its input's
mean over calibration windows as the quantized model sees them. Analytic bias correction needs batch-norm
statistics, which LLM blocks lack; `dfq_sequential` does it for conv / linear networks with BN.
High-bias absorption (the paper's third part) is not implemented.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from qresearch.calib.engine import EngineConfig, calibrate
from qresearch.calib.equalize import (EQUIVARIANT, WEIGHTED, cle_scales, correct_bias, equalize, expected_relu,
                                      fold_batchnorm, in_ranges, input_means, out_ranges)
from qresearch.calib.fold import fold_scales, pair_channels
from qresearch.calib.hooks import record_inputs, swapped_weights
from qresearch.errors import ConfigError
from qresearch.method import Context, Method, Recorder, TagFlag, require_calibration
from qresearch.models.arch import blocks_of, get_module, present_groups
from qresearch.quant import QuantSpec, quantize_tensor, weight_spec
from qresearch.records import QuantResult

BIAS_CORRECTIONS = ("none", "empirical", "analytic")


def dfq_spec(bits: int, group_size: int, sym: bool, qformat: str, per_tensor: bool) -> QuantSpec:
    if bits == 16:
        raise ConfigError("dfq with bits=16 quantizes nothing; allowed bits: 2..8")
    if per_tensor:
        return QuantSpec(bits=bits, group_size=-1, sym=sym, granularity="tensor", qformat=qformat)
    return weight_spec(bits, group_size, sym, qformat)


class DFQ(Method):
    """CLE + RTN + bias correction on every block (see module docstring)."""

    name = "dfq"
    tag_flags = (TagFlag("cle", True, "nocle"), TagFlag("bias_correction", "empirical", "bc-{}"))

    def __init__(self, bits: int = 8, group_size: int = -1, sym: bool = False, qformat: str = "int",
                 per_tensor: bool = True, cle: bool = True, bias_correction: str = "empirical", batch_size: int = 8):
        self.spec = dfq_spec(bits, group_size, sym, qformat, per_tensor)
        if bias_correction not in BIAS_CORRECTIONS:
            raise ConfigError(f"bias_correction={bias_correction!r} is unknown; allowed: {', '.join(BIAS_CORRECTIONS)}")
        if bias_correction == "analytic":
            raise ConfigError("bias_correction=analytic needs batch-norm statistics of each layer's input; LLM blocks "
                              "have none; allowed here: empirical (from calibration windows) or none")
        self.per_tensor, self.cle, self.bias_correction = per_tensor, cle, bias_correction
        self.needs_calibration = bias_correction == "empirical"
        self.batch_size = batch_size

    def quantize(self, model: nn.Module, ctx: Context) -> QuantResult:
        result = QuantResult()
        rec = Recorder(self.name, result)
        result.info["cle_pairs"], result.info["cle_skipped"] = [], []
        if self.needs_calibration:
            require_calibration(self.name, ctx)
            stats = calibrate(model, ctx.arch, ctx.calib, ctx.device,
                              lambda i, b, io: self._block(i, b, io, ctx, rec), EngineConfig(self.batch_size))
            result.info["engine"] = stats.as_dict()
        else:
            for i, block in enumerate(blocks_of(model, ctx.arch)):
                self._block(i, block, None, ctx, rec)
        return result

    def _equalize(self, block: nn.Module, prefix: str, ctx: Context, rec: Recorder) -> None:
        """CLE on the table's linear -> linear pairs of this block."""
        for pair in (p for p in ctx.arch.pairs if p.kind == "linear"):
            if pair_channels(block, pair) is None:
                rec.result.info["cle_skipped"].append(f"{prefix}{pair.prev} -> {', '.join(pair.linears)}: shapes do "
                                                      f"not line up (e.g. grouped-query attention)")
                continue
            prev = get_module(block, pair.prev)
            r2 = torch.stack([in_ranges(get_module(block, n)) for n in pair.linears]).amax(0)  # [C]
            s = cle_scales(out_ranges(prev), r2)
            fold_scales(block, pair, s)
            rec.result.artifacts[f"dfq.{prefix}{pair.prev}.scales"] = s.float().cpu()
            rec.result.info["cle_pairs"].append(f"{prefix}{pair.prev} -> {', '.join(pair.linears)}")

    def _block(self, i: int, block: nn.Module, io, ctx: Context, rec: Recorder) -> dict[str, torch.Tensor]:
        prefix = f"{ctx.arch.blocks}.{i}."
        if self.cle:
            self._equalize(block, prefix, ctx, rec)
        deq: dict[str, torch.Tensor] = {}
        for grp in present_groups(block, ctx.arch):
            means = self._input_mean(block, io, grp[0], deq) if io is not None else None
            for name in grp:
                t0, lin = time.perf_counter(), block.get_submodule(name)
                W = lin.weight.data
                q = quantize_tensor(W, self.spec)
                Wq = q.dequantize().to(W.dtype)
                extra = {}
                if means is not None:
                    c = correct_bias(lin, Wq, means)
                    extra = {"bias_correction_rms": float(c.float().pow(2).mean().sqrt())}
                deq[name] = rec.record(prefix + name, q, W, block=i, t0=t0, **extra)
        return deq

    def _input_mean(self, block: nn.Module, io, name: str, deq: dict) -> torch.Tensor:
        """Mean [in] of `name`'s input over the calibration windows, earlier linears of the block quantized."""
        acc = {"sum": None, "n": 0}

        def add(_n, x):
            x2 = x.reshape(-1, x.shape[-1]).double()  # [tokens, in]
            acc["sum"] = x2.sum(0) if acc["sum"] is None else acc["sum"] + x2.sum(0)
            acc["n"] += x2.shape[0]
        with swapped_weights(block, deq):
            record_inputs(block, io, [name], add, stop_after=True)
        return (acc["sum"] / acc["n"]).float()


# --- conv / linear networks (nn.Sequential), with batch norm -------------------------------------------------

PASSTHROUGH = (nn.Identity, nn.Flatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)  # keep channels and means


def relu_pairs(seq: nn.Sequential) -> list[tuple[int, int]]:
    """(prev, next) indices of weighted -> [BN / identity] -> ReLU-family -> [pool / flatten] -> weighted."""
    mods, out = list(seq), []
    for i, m in enumerate(mods):
        if not isinstance(m, WEIGHTED):
            continue
        j = i + 1
        while j < len(mods) and isinstance(mods[j], (nn.modules.batchnorm._BatchNorm, nn.Identity)):
            j += 1
        if j >= len(mods) or not isinstance(mods[j], EQUIVARIANT):
            continue
        k = j + 1
        while k < len(mods) and isinstance(mods[k], PASSTHROUGH):
            k += 1
        if k < len(mods) and isinstance(mods[k], WEIGHTED):
            out.append((i, k))
    return out


def fold_all_bn(seq: nn.Sequential) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Fold each BN into the weighted layer before it (BN -> Identity); {layer index: (beta, gamma)}."""
    stats = {}
    for i in range(len(seq) - 1):
        if isinstance(seq[i], WEIGHTED) and isinstance(seq[i + 1], nn.modules.batchnorm._BatchNorm):
            stats[i] = fold_batchnorm(seq[i], seq[i + 1])
            seq[i + 1] = nn.Identity()
    return stats


def _analytic_means(seq: nn.Sequential, pairs, stats) -> dict[int, torch.Tensor]:
    """E[input] of each pair's `next` from the BN statistics of `prev`'s output, through a ReLU."""
    return {k: expected_relu(*stats[i]) for i, k in pairs if i in stats
            and any(type(m) is nn.ReLU for m in list(seq)[i + 1:k])}


@torch.no_grad()
def dfq_sequential(seq: nn.Sequential, spec: QuantSpec, cle: bool = True, bias_correction: str = "analytic",
                   batches=None, cle_iters: int = 3) -> dict:
    """In place: fold BN, equalize ReLU pairs (cle_iters sweeps), quantize every Linear / Conv weight (RTN, the
    [out, in * k] view) and correct biases (analytic from BN statistics, or empirical from `batches` of inputs).
    The network then computes with dequantized weights. Returns what was done."""
    if bias_correction not in BIAS_CORRECTIONS:
        raise ConfigError(f"bias_correction={bias_correction!r} is unknown; allowed: {', '.join(BIAS_CORRECTIONS)}")
    stats = fold_all_bn(seq)
    pairs = relu_pairs(seq)
    for _ in range(cle_iters if cle else 0):
        for i, k in pairs:
            s = equalize(seq[i], seq[k])
            if i in stats:
                stats[i] = (stats[i][0] / s, stats[i][1] / s)
    weighted = {str(i): m for i, m in enumerate(seq) if isinstance(m, WEIGHTED)}
    if bias_correction == "analytic":
        means = {str(k): v for k, v in _analytic_means(seq, pairs, stats).items()}
    elif bias_correction == "empirical":
        if batches is None:
            raise ConfigError("bias_correction=empirical needs input batches")
        means = input_means(seq, weighted, batches, lambda m, b: m(b))
    else:
        means = {}
    for name, m in weighted.items():
        w = m.weight.data
        wq = quantize_tensor(w.reshape(w.shape[0], -1), spec).dequantize().reshape(w.shape).to(w.dtype)
        if name in means:
            correct_bias(m, wq, means[name])
        m.weight.data = wq
    return {"pairs": pairs, "corrected": sorted(means), "bn_folded": sorted(stats)}
