"""ZeroQuant (Yao et al. 2022): group-wise weight quantization, token-wise dynamic activation quantization, and
LKD (layer-by-layer knowledge distillation): block by block, the quantized block (weights and activations
fake-quantized with straight-through estimators) is trained to reproduce the FP block's outputs on the FP block's
calibration inputs (MSE). Only the linears' latent weights train; the FP model itself is left as it was, and the
trained weights are quantized into the result. The optimizer steps go through accelerate (CPU or GPU alike).
keep_best (default on): a block whose output MSE on the calibration batches is higher after LKD than before keeps
the weights it started from (the paper has no such guard; each block's before / after / kept is recorded).
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from qresearch.calib.blockio import block_forward, run_block
from qresearch.calib.engine import EngineConfig
from qresearch.errors import ConfigError
from qresearch.method import Block, BlockMethod, Context, Recorder, TagFlag, require_weight_spec
from qresearch.nn.swap import set_module
from qresearch.quant import QuantSpec, fake_quantize, quantize_tensor
from qresearch.records import ActQuant

log = logging.getLogger(__name__)


class STELinear(nn.Module):
    """Training view of a quantized linear: y = fq(x) @ fq(W)^T + b with straight-through gradients to W."""

    def __init__(self, lin: nn.Linear, spec: QuantSpec, act: QuantSpec | None):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().float().clone())
        self.bias = None if lin.bias is None else lin.bias.detach()
        self.spec, self.act = spec, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quantize(x, self.act) if self.act is not None else x
        return F.linear(xq, fake_quantize(self.weight, self.spec).to(x.dtype), self.bias)


def block_mse(block: nn.Module, io, refs: list[torch.Tensor]) -> float:
    """Mean squared error of the block's outputs against `refs` over all batches of io."""
    with torch.no_grad():
        outs = run_block(block, io)
    return sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, refs)) / sum(r.numel() for r in refs)


def lkd_train(block: nn.Module, io, refs: list[torch.Tensor], params: list[nn.Parameter], steps: int, lr: float,
              accelerator, seed: int = 0) -> list[float]:
    """`steps` Adam steps on `params` minimizing MSE(block(io batch), ref batch); batches in a seeded random order.
    Returns the loss of every step."""
    opt = accelerator.prepare_optimizer(torch.optim.Adam(params, lr=lr), device_placement=False)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve = []
    with torch.enable_grad():
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(io.hidden), generator=g).tolist()
            i = order.pop()
            loss = F.mse_loss(block_forward(block, io.hidden[i], io.kwargs[i]).float(), refs[i].float())
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(float(loss.detach()))
    return curve


class ZeroQuant(BlockMethod):
    """Group-wise weights + token-wise dynamic activations; `lkd` trains each quantized block against the FP one."""

    name = "zeroquant"
    tag_flags = (TagFlag("lkd", True, "nolkd"), TagFlag("steps", 100, "s{}"), TagFlag("lr", 1e-4, "lr{}"),
                 TagFlag("keep_best", True, "nokeep"))

    def __init__(self, bits: int = 8, group_size: int = 128, sym: bool = True, act_bits: int = 8, lkd: bool = True,
                 steps: int = 100, lr: float = 1e-4, keep_best: bool = True, batch_size: int = 4,
                 propagate: str = "fp", offload: bool = True):
        self.spec = require_weight_spec(self.name, bits, group_size, sym)
        if not 2 <= act_bits <= 8:
            raise ConfigError(f"zeroquant act_bits={act_bits} is out of range; allowed: 2..8")
        if steps < 1 or not lr > 0:
            raise ConfigError(f"zeroquant steps={steps} / lr={lr} invalid; allowed: steps >= 1, lr > 0")
        self.act = QuantSpec(bits=act_bits, sym=True, granularity="token")
        self.lkd, self.steps, self.lr, self.keep_best = lkd, int(steps), float(lr), keep_best
        self.engine = EngineConfig(batch_size, offload, propagate)
        self._accelerator = None
        self._seed = 0

    def prepare(self, model, ctx: Context) -> None:
        if self.lkd:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=ctx.device.type == "cpu", device_placement=False)
        self._seed = ctx.seed

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        names = [n for grp in blk.groups for n in grp]
        fp = {n: blk.linear(n) for n in names}
        ste = {n: STELinear(fp[n], self.spec, self.act).to(fp[n].weight.device) for n in names}
        t0 = time.perf_counter()
        refs = run_block(blk.module, blk.io)  # FP block outputs: the teacher
        frozen = [p for p in blk.module.parameters() if p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            for n in names:
                set_module(blk.module, n, ste[n])
            before = block_mse(blk.module, blk.io, refs)
            guard = self.lkd and self.keep_best
            start = {n: m.weight.detach().clone() for n, m in ste.items()} if guard else {}
            curve = lkd_train(blk.module, blk.io, refs, [m.weight for m in ste.values()], self.steps, self.lr,
                              self._accelerator, self._seed + blk.index) if self.lkd else []
            after = block_mse(blk.module, blk.io, refs) if self.lkd else before
            kept = not (guard and after > before)
            if not kept:  # training made the block's own objective worse: keep the weights it started from
                with torch.no_grad():
                    for n, m in ste.items():
                        m.weight.copy_(start[n])
        finally:
            for n in names:
                set_module(blk.module, n, fp[n])
            for p in frozen:
                p.requires_grad_(True)
        self._log(blk, rec, before, after, curve, kept)
        act = ActQuant(self.act)
        return {n: rec.record(blk.prefix + n, quantize_tensor(ste[n].weight.detach().to(fp[n].weight.dtype), self.spec),
                              fp[n].weight.data, block=blk.index, act=act, t0=t0, lkd_mse_before=before,
                              lkd_mse_after=after, lkd_kept=kept) for n in names}

    def _log(self, blk: Block, rec: Recorder, before: float, after: float, curve: list[float], kept: bool) -> None:
        """Loss curve into the artifacts (run dir) and the step's info (metrics.json, wandb), one log line."""
        info = rec.result.info.setdefault("lkd", {"enabled": self.lkd, "steps": self.steps, "lr": self.lr,
                                                   "blocks": []})
        info["blocks"].append({"block": blk.index, "mse_before": before, "mse_after": after, "kept": kept,
                               "curve": curve[:: max(1, len(curve) // 50)]})
        if curve:
            rec.result.artifacts[f"zeroquant.lkd.{blk.prefix}loss"] = torch.tensor(curve)
        log.info("zeroquant block %d: block output MSE %.4g -> %.4g%s%s", blk.index, before, after,
                 f" ({len(curve)} LKD steps, lr {self.lr})" if curve else " (no LKD)",
                 "" if kept else "; worse than before training: the block keeps its untrained weights (keep_best)")
