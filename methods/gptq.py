"""GPTQ (Frantar et al. 2022): column-by-column rounding with inverse-Hessian error feedback, lazy batch updates,
act-order (optionally with static groups) and true-sequential block calibration. Math: `gptq_quantize`
(methods/gptq_solver.py).

Per block: one Hessian and one inverse factor per input group (q/k/v, gate/up share theirs); with true_sequential,
the group forwards replay the outputs of submodules already final (qresearch/calib/replay.py), and the last one
gives the block's quantized outputs to the engine (no separate output forward)."""
from __future__ import annotations

import contextlib
import time

import torch

from qresearch.calib.blockio import run_block
from qresearch.calib.engine import BlockResult, EngineConfig
from qresearch.calib.hooks import swapped_weights
from qresearch.calib.replay import Replay
from qresearch.calib.stats import input_stats
from qresearch.errors import ConfigError
from qresearch.method import Block, BlockMethod, Context, Recorder, TagFlag, require_weight_spec
from qresearch.quant import QTensor, QuantSpec
from qresearch.quant.codebook import finetune_lut

from .gptq_solver import INVERSES, PreparedHessian, gptq_quantize, inverse_hessian_cholesky, prepare_hessian

QPARAMS = ("minmax", "prior")  # prior = the previous stacked step's scale/zero (e.g. AWQ's clipped ranges)
__all__ = ["GPTQ", "PreparedHessian", "gptq_quantize", "inverse_hessian_cholesky", "prepare_hessian"]


class GPTQ(BlockMethod):
    """Block-by-block GPTQ on calibration inputs. `true_sequential`: each linear group sees the quantized output of
    the groups before it inside the block; otherwise all inputs come from the FP block."""

    name = "gptq"
    tag_flags = (TagFlag("act_order", False, "ao"), TagFlag("static_groups", False, "sg"),
                 TagFlag("true_sequential", True, "nts"), TagFlag("percdamp", 0.01, "d{}"),
                 TagFlag("qparams", "minmax", "{}"), TagFlag("weighted_fit", True, "uwfit"),
                 TagFlag("lut_finetune", False, "lutft"), TagFlag("bits_map", None, "bitsmap"),
                 TagFlag("inverse", "exact", "inv{}"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 scale_bits: int | None = None, scale_level2: str = "channel", bits_map: str | None = None,
                 blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                 true_sequential: bool = True, qparams: str = "minmax", weighted_fit: bool = True,
                 lut_finetune: bool = False, propagate: str = "quantized", offload: bool = True, batch_size: int = 8,
                 inverse: str = "exact"):
        self.spec = require_weight_spec(self.name, bits, group_size, sym, qformat, scale_bits, scale_level2)
        self.use_bits_map(bits_map)
        if lut_finetune and self.spec.qformat != "kmeans":
            raise ConfigError(f"lut_finetune=true refits codebook entries; it needs qformat=kmeans "
                              f"(got {self.spec.qformat})")
        self.weighted_fit, self.lut_finetune = weighted_fit, lut_finetune
        if blocksize < 1 or not 0 <= percdamp < 1:
            raise ConfigError(f"blocksize={blocksize} / percdamp={percdamp} invalid; allowed: blocksize >= 1, "
                              f"0 <= percdamp < 1")
        if inverse not in INVERSES:
            raise ConfigError(f"gptq inverse={inverse!r} is unknown; allowed: {', '.join(INVERSES)}")
        if qparams not in QPARAMS:
            raise ConfigError(f"gptq qparams={qparams!r} is unknown; allowed: {', '.join(QPARAMS)}")
        self.blocksize, self.percdamp, self.qparams, self.inverse = int(blocksize), float(percdamp), qparams, inverse
        self.act_order, self.static_groups, self.true_sequential = act_order, static_groups, true_sequential
        self.engine = EngineConfig(int(batch_size), offload, propagate)
        self._prior = None

    def prepare(self, model, ctx: Context) -> None:
        if self.qparams == "prior" and not (ctx.prior and ctx.prior.layers):
            raise ConfigError("gptq qparams=prior needs an earlier step that quantized the linears (e.g. awq in "
                              "method=awq_gptq); use qparams=minmax on its own")
        self._prior = ctx.prior if self.qparams == "prior" else None

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor] | BlockResult:
        qweights: dict[str, torch.Tensor] = {}
        names = [n for grp in blk.groups for n in grp]
        replay = Replay(blk.module, names, len(blk.io.hidden)) if self.true_sequential else None
        if replay is None:
            stats = input_stats(blk.module, blk.io, [grp[0] for grp in blk.groups])
        for grp in blk.groups:
            if replay is not None:  # inputs after the quantized groups before this one
                with swapped_weights(blk.module, qweights), replay.active():
                    stats = input_stats(blk.module, blk.io, [grp[0]], stop=True)
                self._note_replay(rec, replay)
            t0, H = time.perf_counter(), stats[grp[0]].hessian
            prep = prepare_hessian(H, self.percdamp, self.act_order, self.inverse)  # once for the whole group
            for name in grp:
                qweights[name] = self._layer(blk, name, H, prep, rec, t0)
                t0 = time.perf_counter()
            if replay is not None:
                replay.finalize(grp)
        if self.engine.propagate != "quantized":
            return qweights
        with swapped_weights(blk.module, qweights), replay.active(record=False) if replay else contextlib.nullcontext():
            outputs = run_block(blk.module, blk.io)
        return BlockResult(qweights, outputs)

    @staticmethod
    def _note_replay(rec: Recorder, replay: Replay) -> None:
        """The most memory replayed outputs took (one block's worth), for the step's record."""
        info = rec.result.info
        info["replay_peak_bytes"] = max(info.get("replay_peak_bytes", 0), replay.nbytes)

    def _layer(self, blk: Block, name: str, H: torch.Tensor, prep: PreparedHessian, rec: Recorder,
               t0: float) -> torch.Tensor:
        full = blk.prefix + name
        W = blk.linear(name).weight.data
        spec, extra = self.spec_for(full), {}
        q, loss = gptq_quantize(W, prep, spec, self.blocksize, self.percdamp, self.act_order, self.static_groups,
                                self._prior_qparams(full, spec), stats=extra, weighted_fit=self.weighted_fit)
        if self.lut_finetune:
            q = finetune_lut(W, H, q)
        return rec.record(full, q, W, block=blk.index, H=H, t0=t0, gptq_loss=loss, gptq_clamped=extra["clamped"],
                          gptq_clamped_loss=extra["clamped_loss"])

    def _prior_qparams(self, full: str, spec: QuantSpec) -> QTensor | None:
        """The earlier step's result for this linear when qparams=prior (its scale, zero, palette, scale2)."""
        if self._prior is None:
            return None
        prev = self._prior.layers.get(full)
        if prev is None or prev.weight.g_idx is not None or prev.weight.spec != spec:
            why = "no result" if prev is None else "act-order groups" if prev.weight.g_idx is not None else \
                f"spec {prev.weight.spec}"
            raise ConfigError(f"gptq qparams=prior: the earlier step left {why} for {full}; it needs contiguous "
                              f"groups with the same bits/group_size/sym ({spec})")
        return prev.weight
