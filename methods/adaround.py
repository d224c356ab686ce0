"""AdaRound (Nagel et al. 2020): learn, block by block, whether each weight rounds down or up.

objective=block (default): the rounding variables of all linears of a block are learned together to reproduce
the FP block's output on the calibration inputs (relative MSE, one engine batch of windows per iteration), plus
the annealed rounding regularizer (quant/rounding.py); the block's inputs come from the quantized earlier blocks
(propagate=quantized). objective=layer: each linear alone, from its input Hessian (the paper's layer-wise loss).
Grids: min-max per group, or the previous step's (qparams=prior, e.g. AWQ's clipped grid in awq_adaround).
"""
from __future__ import annotations

import time

import torch
from torch.func import functional_call

from qresearch.calib.blockio import BlockIO, run_block
from qresearch.calib.engine import EngineConfig
from qresearch.calib.stats import input_stats, output_rel_error
from qresearch.errors import ConfigError
from qresearch.method import Block, BlockMethod, Context, Recorder, TagFlag, require_weight_spec
from qresearch.models.arch import blocks_of
from qresearch.quant.rounding import (AdaRoundConfig, Grid, adaround_layer, beta_at, check_uniform_grid, make_grid,
                                      round_reg)

OBJECTIVES = ("block", "layer")
QPARAMS = ("minmax", "prior")


def relative_mse(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((out.float() - ref.float()) ** 2).mean() / (ref.float() ** 2).mean().clamp_min(1e-30)


@torch.no_grad()
def block_error(block, io: BlockIO, targets: list[torch.Tensor], weights: dict[str, torch.Tensor]) -> float:
    """Relative MSE of the block's output with `weights` swapped in, over all batches."""
    params = {f"{n}.weight": w for n, w in weights.items()}
    num = den = 0.0
    for h, kw, ref in zip(io.hidden, io.kwargs, targets):
        out = functional_call(block, params, (h,), kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        num += float(((out.float() - ref.float()) ** 2).sum())
        den += float((ref.float() ** 2).sum())
    return num / max(den, 1e-30)


class AdaRound(BlockMethod):
    """Learned rounding, block by block (see module docstring)."""

    name = "adaround"
    tag_flags = (TagFlag("objective", "block", "{}"), TagFlag("iters", 200, "i{}"), TagFlag("reg_weight", 1.0, "l{}"),
                 TagFlag("qparams", "minmax", "{}"), TagFlag("keep_best", True, "nokeep"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 iters: int = 200, lr: float = 0.3, reg_weight: float = 1.0, beta_start: float = 20.0,
                 beta_end: float = 2.0, warmup: float = 0.2, objective: str = "block", qparams: str = "minmax",
                 propagate: str = "quantized", offload: bool = True, batch_size: int = 4, keep_best: bool = True):
        self.spec = require_weight_spec(self.name, bits, group_size, sym, qformat)
        check_uniform_grid(self.name, self.spec)
        if objective not in OBJECTIVES:
            raise ConfigError(f"adaround objective={objective!r} is unknown; allowed: {', '.join(OBJECTIVES)}")
        if qparams not in QPARAMS:
            raise ConfigError(f"adaround qparams={qparams!r} is unknown; allowed: {', '.join(QPARAMS)}")
        self.cfg = AdaRoundConfig(iters, lr, reg_weight, beta_start, beta_end, warmup)
        self.iters, self.reg_weight, self.objective, self.qparams = iters, reg_weight, objective, qparams
        self.keep_best = keep_best
        self.engine = EngineConfig(batch_size, offload, propagate)
        self._prior = None

    def prepare(self, model, ctx: Context) -> None:
        if self.qparams == "prior" and not (ctx.prior and ctx.prior.layers):
            raise ConfigError("adaround qparams=prior needs an earlier step that quantized the linears (e.g. awq in "
                              "method=awq_adaround); use qparams=minmax on its own")
        self._prior = ctx.prior if self.qparams == "prior" else None
        self._seed = ctx.seed
        self._n_blocks, self._t0 = len(blocks_of(model, ctx.arch)), time.perf_counter()

    def _prior_qparams(self, full: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._prior is None:
            return None
        prev = self._prior.layers.get(full)
        if prev is None or prev.weight.g_idx is not None or prev.weight.spec != self.spec:
            why = "no result" if prev is None else "act-order groups" if prev.weight.g_idx is not None else \
                f"spec {prev.weight.spec}"
            raise ConfigError(f"adaround qparams=prior: the earlier step left {why} for {full}; it needs contiguous "
                              f"groups with the same bits/group_size/sym ({self.spec})")
        return prev.weight.scale, prev.weight.zero

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        names = [n for grp in blk.groups for n in grp]
        stats = input_stats(blk.module, blk.io, [grp[0] for grp in blk.groups])
        H = {n: stats[grp[0]].hessian for grp in blk.groups for n in grp}
        grids = {n: make_grid(blk.linear(n).weight.data, self.spec, self._prior_qparams(blk.prefix + n))
                 for n in names}
        if self.objective == "layer":
            return {n: self._layer(blk, n, H[n], rec) for n in names}
        return self._block(blk, names, grids, H, rec)

    def _layer(self, blk: Block, name: str, H: torch.Tensor, rec: Recorder) -> torch.Tensor:
        t0, full = time.perf_counter(), blk.prefix + name
        W = blk.linear(name).weight.data
        q, info = adaround_layer(W, H, self.spec, self.cfg, self._prior_qparams(full), self._seed)
        rtn = _rtn(W, self.spec, self._prior_qparams(full))
        return rec.record(full, q, W, block=blk.index, H=H, t0=t0, layer_recon=info["recon"],
                          rtn_out_rel_err=output_rel_error(W, rtn, H))

    def _block(self, blk: Block, names: list[str], grids: dict, H: dict, rec: Recorder) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        targets = run_block(blk.module, blk.io)  # FP block on these inputs
        Ws = {n: blk.linear(n).weight.data for n in names}
        rtn = {n: _rtn(Ws[n], self.spec, self._prior_qparams(blk.prefix + n)) for n in names}
        err_rtn = block_error(blk.module, blk.io, targets, rtn)
        vs = self._optimize(blk, {n: g for n, (g, _) in grids.items()}, {n: v for n, (_, v) in grids.items()},
                            targets)
        qs = {n: grids[n][0].hard(vs[n]) for n in names}
        hard = {n: q.dequantize() for n, q in qs.items()}
        err = block_error(blk.module, blk.io, targets, hard)
        secs = (time.perf_counter() - t0) / len(names)
        self._progress(blk.index, err, err_rtn)
        kept_rtn = self.keep_best and err > err_rtn  # learned rounding worse than RTN on these windows: keep RTN
        if kept_rtn:
            qs = {n: grids[n][0].hard(grids[n][1]) for n in names}  # the initial V rounds as RTN does
        out = {}
        for n in names:
            flips = 0.0 if kept_rtn else float((hard[n] != rtn[n]).float().mean())
            out[n] = rec.record(blk.prefix + n, qs[n], Ws[n], block=blk.index, H=H[n], seconds=secs,
                                rtn_out_rel_err=output_rel_error(Ws[n], rtn[n], H[n]), block_rel_mse=err,
                                block_rel_mse_rtn=err_rtn, changed_vs_rtn=flips, kept_rtn=kept_rtn)
        return out

    def _progress(self, i: int, err: float, err_rtn: float) -> None:
        spent = time.perf_counter() - self._t0
        left = spent / (i + 1) * (self._n_blocks - i - 1)
        print(f"adaround block {i + 1}/{self._n_blocks}: block rel. MSE {err:.4g} (RTN {err_rtn:.4g}), "
              f"{self.cfg.iters} iters, {spent / 60:.1f} min so far, ~{left / 60:.1f} min left", flush=True)

    def _optimize(self, blk: Block, grids: dict[str, Grid], v0: dict[str, torch.Tensor], targets) -> dict:
        """Adam on the rounding variables of every linear of the block against the FP block output."""
        vs = {n: torch.nn.Parameter(v.clone()) for n, v in v0.items()}
        opt = torch.optim.Adam(list(vs.values()), lr=self.cfg.lr)
        gen = torch.Generator().manual_seed(self._seed * 7919 + blk.index)
        total = sum(v.numel() for v in vs.values())
        frozen = [p for p in blk.module.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            for it in range(self.cfg.iters):
                b = int(torch.randint(len(blk.io.hidden), (1,), generator=gen))
                params = {f"{n}.weight": grids[n].soft(vs[n]) for n in vs}
                out = functional_call(blk.module, params, (blk.io.hidden[b],), blk.io.kwargs[b])
                loss = relative_mse(out[0] if isinstance(out, (tuple, list)) else out, targets[b])
                beta = beta_at(it, self.cfg)
                if beta is not None:
                    loss = loss + self.cfg.reg_weight * sum(round_reg(v, beta) * v.numel() for v in vs.values()) / total
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return {n: v.detach() for n, v in vs.items()}


def _rtn(W: torch.Tensor, spec, qparams) -> torch.Tensor:
    """Round-to-nearest on the same grid (dequantized), the baseline AdaRound is measured against."""
    grid, _ = make_grid(W, spec, qparams)
    x = W.float() / grid.scale
    up = ((x - grid.floor) >= 0.5).float()
    return (torch.clamp(grid.floor + up + grid.zero, 0, grid.qmax) - grid.zero) * grid.scale
