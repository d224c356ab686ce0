"""A numeric format and a block method defined here only, to prove that adding either touches nothing else:
the format is one table entry (FORMATS), the method is one class + one step config (written by the test)."""
from __future__ import annotations

import time

import torch

from qresearch.calib.engine import EngineConfig
from qresearch.calib.stats import input_stats
from qresearch.method import Block, BlockMethod, Recorder, TagFlag, require_weight_spec
from qresearch.quant import quantize_tensor
from qresearch.quant.formats import NumericFormat


class Log2Format(NumericFormat):
    """4-bit sign + exponent codes: value = sign * scale * 2^-e for e in 0..6, plus an exact zero (code 0).
    Code layout: bit 3 = sign, bits 0..2 = e + 1 (0 = zero). Nothing like a uniform grid, on purpose."""

    name = "toy_log2"
    bits_allowed = (4,)
    sym_only = True

    def half_levels(self, spec):
        return 7

    def qparams(self, xmin, xmax, spec):
        absmax = torch.maximum(xmin.abs(), xmax.abs()).float()
        return torch.where(absmax > 0, absmax, torch.ones_like(absmax)), torch.zeros_like(absmax)

    def _grid(self, device) -> torch.Tensor:
        return torch.tensor([0.0] + [2.0 ** -e for e in range(7)], device=device)  # magnitude of codes 0..7

    def encode(self, x, scale, zero, spec):
        r = (x.float() / scale).clamp(-1, 1)
        mag = (r.abs()[..., None] - self._grid(x.device)).abs().argmin(-1)  # nearest magnitude code
        return (mag + 8 * ((r < 0) & (mag > 0)).long()).to(torch.uint8)

    def decode(self, codes, scale, zero, spec):
        c = codes.long()
        mag = self._grid(codes.device)[c & 7]
        return torch.where(c >= 8, -mag, mag) * scale

    def saturated(self, x, scale, zero, spec):
        return (x.float() / scale).abs() > 1


class HalfwayRTN(BlockMethod):
    """A test-only block method: RTN per linear, recorded with the block's input Hessian (so the stats row carries
    the output error). Enough to show a new method needs one hook and one record call."""

    name = "halfway_rtn"
    tag_flags = (TagFlag("note", "", "{}"),)

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 note: str = "", batch_size: int = 8):
        self.spec = require_weight_spec(self.name, bits, group_size, sym, qformat)
        self.note = note
        self.engine = EngineConfig(batch_size)

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        stats = input_stats(blk.module, blk.io, [g[0] for g in blk.groups])
        out = {}
        for grp in blk.groups:
            for name in grp:
                t0, W = time.perf_counter(), blk.linear(name).weight.data
                out[name] = rec.record(blk.prefix + name, quantize_tensor(W, self.spec), W, block=blk.index,
                                       H=stats[grp[0]].hessian, t0=t0)
        return out
