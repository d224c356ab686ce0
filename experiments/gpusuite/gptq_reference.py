"""Section 6 (with --reference DIR): our GPTQ solver against the original implementation on the device.

The reference (IST-DASLab/gptq: gptq.py + quant.py, never part of this repository) is imported from the folder
given with --reference, through experiments/gptq_reference_adapter.py, as bench_gptq_vs_reference.py does on CPU:
the same weight and Hessian per Llama-2-7B layer shape (bench_gptq_vs_reference.problem), act-order off and on,
w4 g128 asym, blocksize 128, percdamp 0.01. Per cell: one untimed run of each (compiles, allocator, cuSOLVER
handles), then `repeat` alternating timed runs (best of), the device synchronized around each (the reference's
timing is its fasterquant call alone: its layer and GPTQ object are set up before); then one more
reference run that records the codes and (scale, zero) it rounds with, against ours. The files' SHA-256 name the
reference's version (a carried folder has no .git).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import lib
from .common import Ctx, free_device_memory
from .gptq_block import Stopwatch

GPU_SHAPES = ("4096x4096", "11008x4096", "4096x11008")  # [out x in] of Llama-2-7B's q/k/v/o, gate/up, down
QUICK_SHAPES = ("96x160", "160x96")  # quick mode: one and two groups of 128 plus a partial one
FIRST_CELL_S = 20.0  # budget asked for the first cell; later cells ask for 1.5x the slowest so far


def fingerprint(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()[:16] for f in ("gptq.py", "quant.py")}


def cell(ref, W, H, act_order: bool, repeat: int, device) -> dict:
    """One (W, H, act-order): seconds of ours and of the reference, and whether the outputs are identical."""
    from experiments.gptq_reference_adapter import reference_codes, reference_solver

    ours_fn = lambda: lib.gptq_exact_solve(W, H, act_order)  # noqa: E731
    ref_setup = lambda: reference_solver(ref, W, H, 4, 128, False, act_order)  # noqa: E731 - not timed
    ours_fn(), ref_setup()()  # untimed
    t_ours, t_ref = [], []
    for _ in range(repeat):
        with Stopwatch(device) as sw:
            codes, scale, zero, deq = ours_fn()
        t_ours.append(sw.s)
        solve = ref_setup()
        with Stopwatch(device) as sw:
            solve()
        t_ref.append(sw.s)
    rdeq, rcodes, rscale, rzero = reference_codes(ref, W, H, 4, 128, False, act_order)
    same = {"codes": torch.equal(codes, rcodes.to(codes)), "scales": torch.equal(scale, rscale.to(scale)),
            "zeros": torch.equal(zero, rzero.to(zero)), "dequantized": torch.equal(deq, rdeq.to(deq))}
    return {"shape": "x".join(map(str, W.shape)), "act_order": act_order, "ours_s": min(t_ours),
            "reference_s": min(t_ref), "ours_all": t_ours, "reference_all": t_ref,
            "speedup": min(t_ref) / min(t_ours), "identical": same,
            "codes_differing": float((codes != rcodes.to(codes)).float().mean())}


def run(ctx: Ctx, state: dict, repeat: int = 2) -> None:
    """state += {reference, files_sha256, rows, skipped}; rows appended (and saved) cell by cell, each cell only
    while the budget left covers it (a skipped cell says why)."""
    from experiments.bench_gptq_vs_reference import problem
    from experiments.gptq_reference_adapter import load_reference

    path = Path(ctx.reference)
    state.update(reference=str(ctx.reference), files_sha256=fingerprint(path), rows=[], repeat=repeat, skipped=[],
                 setting="w4 g128 asym, blocksize 128, percdamp 0.01; W ~ N(0, 0.02^2), H = M^T M + diag")
    ref = load_reference(path)
    need = FIRST_CELL_S if ctx.full else 2.0
    for shape in (GPU_SHAPES if ctx.full else QUICK_SHAPES):
        out_f, in_f = (int(v) for v in shape.split("x"))
        W = H = None
        for act_order in (False, True):
            why = ctx.skip_reason(need, f"{shape} act-order {'on' if act_order else 'off'}", reserve=False)
            if why:
                state["skipped"].append(why)
                continue
            if W is None:
                W, H = (t.to(ctx.device) for t in problem(out_f, in_f))
            row = cell(ref, W, H, act_order, repeat, ctx.device)
            state["rows"].append(row)
            need = max(need, 1.5 * (row["ours_s"] + row["reference_s"]) * (repeat + 2))
            ctx.save()
        del W, H
        free_device_memory(ctx.device)
