"""Run the original GPTQ code (IST-DASLab/gptq: gptq.py + quant.py, fetched into a folder that is NOT part of this
repository) beside ours: its solver on a given weight and Hessian, and a pipeline shaped like its llama.py
sequential loop. Nothing of it is copied here: the folder is imported as it is.

The reference targets CUDA: `fasterquant` calls torch.cuda.synchronize() and prints its time and error. On a CPU
build the synchronize is replaced by a no-op for the duration of the call and the prints are swallowed; nothing
else is changed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qresearch.calib.blockio import BlockIO, block_forward, capture_inputs
from qresearch.models.arch import ArchInfo, blocks_of, get_module, present_groups


@dataclass
class Reference:
    """The two modules of the reference implementation."""

    gptq: object  # its gptq.py (class GPTQ)
    quant: object  # its quant.py (class Quantizer, function quantize)
    path: Path


def load_reference(path: str | Path) -> Reference:
    """Import gptq.py and quant.py from `path` (gptq.py does `from quant import *`, so quant is registered first)."""
    path = Path(path).resolve()
    missing = [f for f in ("gptq.py", "quant.py") if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"--reference {path}: {', '.join(missing)} not found; fetch IST-DASLab/gptq there first")
    mods = {}
    for name, file in (("quant", "quant.py"), ("gptq_reference", "gptq.py")):
        spec = importlib.util.spec_from_file_location(name, path / file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        with contextlib.redirect_stdout(io.StringIO()):  # quant.py prints that its CUDA extension is missing
            spec.loader.exec_module(mod)
        mods[name] = mod
    return Reference(mods["gptq_reference"], mods["quant"], path)


@contextlib.contextmanager
def _cpu_ok():
    """torch.cuda.synchronize as a no-op (CPU build) and the reference's prints swallowed, for one call."""
    sync = torch.cuda.synchronize
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch.cuda.synchronize = sync


def _solver(ref: Reference, layer: nn.Linear, bits: int, sym: bool):
    obj = ref.gptq.GPTQ(layer)
    obj.quantizer = ref.quant.Quantizer()
    obj.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    return obj


def reference_solver(ref: Reference, W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                     act_order: bool, blocksize: int = 128, percdamp: float = 0.01) -> Callable[[], torch.Tensor]:
    """Set up the reference's solver on copies of W [out, in] and H [in, in] (a layer holding W, its GPTQ object
    holding H: what its own pipeline has in hand when it calls fasterquant), and return the call that runs
    fasterquant alone, returning its dequantized weight: timing the call times the reference's solver and nothing
    of this set-up. One call per set-up (fasterquant consumes its H)."""
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")  # no random init of a weight replaced next
    layer.weight = nn.Parameter(W.clone(), requires_grad=False)
    obj = _solver(ref, layer, bits, sym)
    obj.H = H.clone()

    def run() -> torch.Tensor:
        with _cpu_ok():
            obj.fasterquant(blocksize=blocksize, percdamp=percdamp, groupsize=group_size, actorder=act_order)
        return layer.weight.data

    return run


def reference_solve(ref: Reference, W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                    act_order: bool, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """The reference's fasterquant on weight W [out, in] with Hessian H [in, in]: returns its dequantized weight."""
    return reference_solver(ref, W, H, bits, group_size, sym, act_order, blocksize, percdamp)()


def reference_codes(ref: Reference, W, H, bits, group_size, sym, act_order, blocksize=128, percdamp=0.01):
    """One untimed reference solve that also records, through its `quantize` function, the integer code and the
    (scale, zero) of every column it rounds. Returns (dequantized W, codes [out, in] in the original column order,
    scale and zero [out, n_groups] per group in processing order)."""
    cols, seen = [], []
    orig = ref.gptq.quantize

    def spy(x, scale, zero, maxq):
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)  # the code its quantize rounds to
        cols.append(q.flatten().to(torch.uint8))
        seen.append((scale.flatten().clone(), zero.flatten().clone()))
        return orig(x, scale, zero, maxq)

    ref.gptq.quantize = spy
    try:
        deq = reference_solve(ref, W, H, bits, group_size, sym, act_order, blocksize, percdamp)
    finally:
        ref.gptq.quantize = orig
    codes = torch.stack(cols, dim=1)  # [out, in] in processing order
    if act_order:
        dead_fixed = torch.diag(H).clone()
        dead_fixed[dead_fixed == 0] = 1
        codes = codes[:, torch.argsort(torch.argsort(dead_fixed, descending=True))]
    g = group_size if group_size > 0 else W.shape[1]
    starts = range(0, W.shape[1], g)
    scale = torch.stack([seen[c][0] for c in starts], dim=1)
    zero = torch.stack([seen[c][1] for c in starts], dim=1)
    return deq, codes, scale, zero


@torch.no_grad()
def reference_pipeline(ref: Reference, model: nn.Module, arch: ArchInfo, calib: torch.Tensor, device, bits: int,
                       group_size: int, sym: bool, act_order: bool) -> None:
    """Quantize `model` in place the way the reference's llama.py does with --true-sequential: per block, per
    linear group, a hook on every linear feeds its own GPTQ object sample by sample (batch 1) through a full
    block forward; each linear is then solved with its own Hessian; the block is run once more on every sample to
    give the next block's inputs."""
    io_ = capture_inputs(model, arch, calib, device, batch_size=1)
    for block in blocks_of(model, arch):
        for names in present_groups(block, arch):
            objs = {n: _solver(ref, get_module(block, n), bits, sym) for n in names}
            hooks = [get_module(block, n).register_forward_hook(
                lambda _m, inp, out, n=n: objs[n].add_batch(inp[0].data, out.data)) for n in names]
            for h, kw in zip(io_.hidden, io_.kwargs):
                block_forward(block, h, kw)
            for hk in hooks:
                hk.remove()
            for n in names:
                with _cpu_ok():
                    objs[n].fasterquant(blocksize=128, percdamp=0.01, groupsize=group_size, actorder=act_order)
                objs[n].free()
        io_ = BlockIO([block_forward(block, h, kw) for h, kw in zip(io_.hidden, io_.kwargs)], io_.kwargs)
