"""Section 2: every Triton kernel family against float64 truth, on the device (or the Triton interpreter in --quick).

Truth is the exact function of the packed buffers: y = x @ deq(W)^T + b in float64, deq from the stored codes and
16-bit scales (exact in float64); for W8A8, the reference's int8 activations times the int8 codes, exact in
float64. The torch reference in the activation dtype (kernels/reference.py) is measured against the same truth
(`ref_rel`). A case passes when every output is finite and rel = ||y - truth||_F / ||truth||_F <= TOL[dtype].
Outputs: NaN-poisoned allocator blocks (common.poison_allocator) make unwritten elements show as non-finite.
Tiles are fixed per M class (GEMV / split-K tile / prefill tile) so each case compiles one kernel; the autotuned
launches are checked against the reference in the benchmark section (ref_rel_err) and end to end (logits).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch

from . import lib
from .common import Ctx, errors, poison_allocator, sync

# rel. Frobenius bounds vs float64 truth: fp32 accumulation order; fp16 output rounding 2^-11 (+ weight rounding
# to the activation dtype on the tensor-core path); bf16 2^-8
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GPU_SHAPE, QUICK_SHAPE = (200, 576), (40, 160)  # (N, K): odd tiles in N; K = 4.5 groups of 128 (SmolLM2: 576)
GPU_MS, QUICK_MS = (1, 3, 16, 64, 300), (1, 3, 33)
GPU_TILES = {"gemv": dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4),
             "splitk": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2),
             "prefill": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1),
             # w8a8: K = 576 is a multiple of the small tile's BLOCK_K (unmasked main loop) and not of the big one's
             "w8a8_small": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), "w8a8": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128),
             "gemv2": dict(BLOCK_N=64, BLOCK_K_CODES=128, SPLIT_K=2), "dequant": None,
             "small1": (64, 2, 4, 2, 1), "small2": (64, 2, 4, 2, 2)}  # triton_small DOT_CONFIGS tuples
QUICK_TILES = {"gemv": dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2),
               "splitk": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3),
               "prefill": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1),
               "w8a8_small": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32), "w8a8": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
               "gemv2": dict(BLOCK_N=16, BLOCK_K_CODES=64, SPLIT_K=2), "dequant": None,
               "small1": (16, 2, 4, 2, 1), "small2": (16, 2, 4, 2, 2)}


@dataclass(frozen=True)
class Case:
    family: str  # wq | gemv2 (the one-token GEMV, triton_gemv) | dequant (triton_dequant + dense GEMM) | small
    # (triton_small's skinny tensor-core kernel, M = 2..16) | act_perm (an act-order layer permuted to contiguous
    # groups, then the fixed-tile kernel of its M: lib.act_order_kernel) | w8a8 | act_quant
    m: int
    n: int
    k: int
    dtype: torch.dtype
    bits: int = 8
    group: int = -1  # -1 = per-channel
    sym: bool = True
    act_order: bool = False
    bias: bool = False
    static: bool = False  # W8A8 with a static per-tensor activation scale
    xperm: int = 0  # small: how x reaches the dots (1: a copy in code-position order, 2: a tile split in registers)

    @property
    def name(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        if self.family == "act_quant":
            return f"act_quant int8 {dt} M={self.m} K={self.k}"
        w = f"w{self.bits}{'a8' if self.family == 'w8a8' else 'a16'} g{self.group if self.group > 0 else 'ch'}" \
            f" {'sym' if self.sym else 'asym'}" \
            f"{' ' + self.family if self.family in ('gemv2', 'dequant', 'act_perm') else ''}" \
            f"{f' small xperm={self.xperm}' if self.family == 'small' else ''}"
        extras = [e for e, on in (("act-order", self.act_order), ("bias", self.bias), ("static", self.static)) if on]
        return f"{w}{' ' + '+'.join(extras) if extras else ''} {dt} M={self.m} {self.n}x{self.k}"

    def tile(self, tiles: dict) -> tuple[str, dict | None]:
        if self.family == "act_quant":
            return "act_quant", None
        if self.family == "act_perm":  # the kernel for its M is picked inside (lib.act_order_kernel)
            return "act_perm", tiles
        if self.family in ("gemv2", "dequant"):
            key = self.family
        elif self.family == "small":
            key = f"small{self.xperm}"
        elif self.family == "w8a8":
            key = "w8a8_small" if self.m <= 16 else "w8a8"
        else:
            key = "gemv" if self.m == 1 else "splitk" if self.m <= 16 else "prefill"
        return key, tiles[key]


def cases(quick: bool) -> list[Case]:
    """The case matrix (GPU: 124 cases; quick: small shapes the interpreter can run, fp32 + some 16-bit)."""
    n, k = QUICK_SHAPE if quick else GPU_SHAPE
    ms, few = (QUICK_MS, (1, 33)) if quick else (GPU_MS, (1, 3, 300))
    half = torch.float32 if quick else torch.float16  # quick: the interpreter is exact in fp32
    wq = lambda m, bits, group, sym, dt=half, **kw: Case("wq", m, n, k, dt, bits, group, sym, **kw)  # noqa: E731
    out = [wq(m, b, 128, False) for b in range(2, 9) for m in ms]  # W2..W8, partial last group (K = 4.5 x 128)
    out += [wq(m, b, 128, True) for b in ((3, 4, 8) if quick else (2, 3, 4, 8)) for m in few]
    out += [wq(m, b, -1, s) for b, s in ((4, False), (8, True), (3, True)) for m in few]  # per-channel
    out += [wq(m, b, 16 if quick else 32, False) for b in (4, 3) for m in few]  # group smaller than the tile
    out += [wq(m, b, 128, s, act_order=True) for b, s in ((4, False), (3, True)) for m in few]
    out += [wq(m, 4, 128, False, bias=True) for m in few]
    gemv = lambda b, g, s, dt=half, **kw: Case("gemv2", 1, n, k, dt, b, g, s, **kw)  # noqa: E731
    out += [gemv(b, 128, False) for b in (2, 4, 8)] + [gemv(4, 128, True), gemv(8, -1, True), gemv(4, 128, False,
                                                                                                  bias=True)]
    deq = lambda b, g, s, dt=half, **kw: Case("dequant", few[-1], n, k, dt, b, g, s, **kw)  # noqa: E731
    out += [deq(b, 128, False) for b in (2, 3, 4, 8)] + [deq(4, -1, True), deq(3, 32, False),
                                                          deq(4, 128, False, act_order=True, bias=True)]
    small = lambda m, b, g, s, xp, dt=half, **kw: Case("small", m, n, k, dt, b, g, s, xperm=xp, **kw)  # noqa: E731
    out += [small(16, 4, 128, False, 1), small(16, 4, 128, False, 2, bias=True), small(3, 8, 128, False, 2),
            small(16, 4, 128, True, 2), small(16, 2, -1, False, 2), small(3, 8, -1, True, 1)]
    perm = lambda m, b, dt=half: Case("act_perm", m, n, k, dt, b, 128, False, act_order=True, bias=True)  # noqa
    out += [perm(m, 4) for m in few] + [perm(16, 4), perm(1, 3)]
    if quick:  # the interpreter emulates 16-bit dots poorly: fp16 on every path, bf16 on the GEMV only
        out += [wq(m, 4, 128, False, torch.float16) for m in ms] + [wq(1, 4, 128, False, torch.bfloat16)]
        out += [Case("w8a8", m, n, k, dt, bias=True) for m, dt in ((1, torch.float32), (19, torch.float32),
                                                                    (19, torch.float16))]
        out += [Case("w8a8", 4, n, k, torch.float32, static=True), Case("act_quant", 6, n, 300, torch.float32)]
        return out
    bf = torch.bfloat16
    out += [wq(m, 4, 128, False, bf) for m in ms] + [wq(m, 8, -1, True, bf) for m in ms]
    out += [wq(m, 4, 128, False, bf, act_order=True) for m in (1, 300)] + [gemv(4, 128, False, bf)]
    out += [deq(4, 128, False, bf)] + [small(16, 4, 128, False, 2, bf)]
    out += [Case("w8a8", m, n, k, dt, bias=dt == half) for dt in (half, bf) for m in ms]
    out += [Case("w8a8", m, n, k, half, static=True) for m in (3, 300)]
    out += [Case("act_quant", 300, n, 4096 + 5, dt) for dt in (half, bf)]
    return out


def _inputs(case: Case, device: torch.device, seed: int):
    """(meta, buffers, x, bias, static scale) for a case, all on `device`."""
    g = torch.Generator().manual_seed(seed)
    scale_dtype = torch.bfloat16 if case.dtype == torch.bfloat16 else torch.float16
    meta, bufs = lib.pack_random_layer(case.n, case.k, case.bits, case.group, case.sym, case.act_order,
                                       scale_dtype, g)
    bufs = {k: (v.to(device) if v is not None else None) for k, v in bufs.items()}
    x = torch.randn(case.m, case.k, generator=g).to(case.dtype).to(device)
    if case.m > 2:
        x[1] = 0.0  # an all-zero token (act quant scale 1.0)
    bias = torch.randn(case.n, generator=g).to(case.dtype).to(device) if case.bias else None
    static = torch.tensor([0.02]).to(device) if case.static else None
    return meta, bufs, x, bias, static


def launch(case: Case, tile: dict | None, meta, bufs, x, bias, static):
    """The Triton kernel's output for a case (the code under test)."""
    if case.family == "wq":
        return lib.wq_kernel(x, meta, bufs, bias, tile)
    if case.family == "gemv2":
        return lib.gemv_kernel(x, meta, bufs, bias, tile)
    if case.family == "dequant":
        return lib.dequant_kernel(x, meta, bufs, bias)
    if case.family == "small":
        return lib.small_kernel(x, meta, bufs, bias, tile)
    if case.family == "act_perm":
        return lib.act_order_kernel(x, meta, bufs, bias, tile)
    if case.family == "w8a8":
        return lib.w8a8_kernel(x, meta, bufs, bias, static, tile)
    return lib.act_quant_kernel(x)


def run_case(case: Case, device: torch.device, tiles: dict, seed: int = 0, kernel=launch) -> dict:
    """One PASS/FAIL/ERROR row; `kernel` is replaceable so tests can feed a deliberately wrong output."""
    path, tile = case.tile(tiles)
    row = {"case": case.name, "family": case.family, "bits": case.bits, "group": case.group, "sym": case.sym,
           "act_order": case.act_order, "dtype": str(case.dtype).removeprefix("torch."), "M": case.m, "N": case.n,
           "K": case.k, "path": path, "tol": TOL[case.dtype],
           "tile": tile if case.family != "act_perm" else "the fixed tile of the kernel its M takes"}
    try:
        meta, bufs, x, bias, static = _inputs(case, device, seed)
        if case.family == "act_quant":
            got = kernel(case, tile, meta, bufs, x, bias, static)
            return {**row, **_act_quant_row(got, lib.act_quant_reference(x))}
        if case.family in ("wq", "gemv2", "dequant", "small", "act_perm"):
            truth = x.double() @ lib.dequant_weight64(meta, bufs).t() + (0 if bias is None else bias.double())
            ref_y = lib.wa16_reference(x, meta, bufs, bias)
        else:
            truth = lib.w8a8_truth64(x, meta, bufs, bias, static)
            ref_y = lib.w8a8_reference(x, meta, bufs, bias, static)
        poison_allocator(device, case.m * case.n, (case.dtype, torch.float32))
        y = kernel(case, tile, meta, bufs, x, bias, static)
        # a second call of the same key takes the cached launch path (kernels/launcher.py; the autotuner's pick
        # launched directly): the same kernel and config on the same inputs, so the same bits
        again = bool(torch.equal(kernel(case, tile, meta, bufs, x, bias, static), y))
        sync(device)
        e, e_ref = errors(y, truth), errors(ref_y, truth)
        ok = tuple(y.shape) == (case.m, case.n) and y.dtype == case.dtype and e["finite"] and e["rel"] <= row["tol"]
        note = "" if ok else ("non-finite output" if not e["finite"] else
                              f"shape/dtype {tuple(y.shape)} {y.dtype}" if e["finite"] and e["rel"] <= row["tol"]
                              else "error above tolerance")
        if ok and not again:
            ok, note = False, "second call (cached launch) differs from the first"
        return {**row, "max_abs": e["max_abs"], "rel": e["rel"], "ref_rel": e_ref["rel"],
                "status": "PASS" if ok else "FAIL", "note": note}
    except Exception as exc:  # noqa: BLE001 - a crashing kernel is a failed case, recorded with its message
        return {**row, "status": "ERROR", "note": f"{type(exc).__name__}: {exc}"[:300],
                "traceback": traceback.format_exc()[-1500:]}


def _act_quant_row(got, want) -> dict:
    (q, s), (q_ref, s_ref) = got, want
    q_equal, s_equal = bool(torch.equal(q, q_ref)), bool(torch.equal(s, s_ref))
    ok = q_equal and s_equal
    return {"max_abs": float((q.float() - q_ref.float()).abs().max()), "rel": 0.0 if ok else float("nan"),
            "ref_rel": 0.0, "tol": 0.0, "status": "PASS" if ok else "FAIL",
            "note": "int8 codes and fp32 scales bit-identical" if ok else
            f"codes equal: {q_equal}, scales equal: {s_equal}"}


def run(ctx: Ctx, state: dict) -> None:
    """Fill state['rows'] case by case (saved after each group of cases)."""
    tiles = QUICK_TILES if not ctx.gpu else GPU_TILES
    all_cases = cases(quick=not ctx.gpu)
    state.update(tolerances={str(k).removeprefix("torch."): v for k, v in TOL.items()}, tiles=tiles,
                 executor="Triton interpreter on CPU (TRITON_INTERPRET=1)" if not ctx.gpu else f"{ctx.device}",
                 n_cases=len(all_cases) + 2, rows=[])
    for i, case in enumerate(all_cases):
        state["rows"].append(run_case(case, ctx.device, tiles, seed=i))
        if i % 10 == 9:
            ctx.save()
    # GPTQ's column loop (the Triton kernel on CUDA) against the format path's torch ops; RTN on the device vs CPU
    for fn, name, family in ((lib.gptq_loop_row, "gptq column loop", "gptq_loop"),
                             (lib.device_rtn_row, "RTN on the device vs CPU", "rtn_device")):
        try:
            state["rows"].append(fn(ctx.device))
        except Exception as exc:  # noqa: BLE001 - recorded as a failed case
            state["rows"].append({"case": name, "family": family, "path": "-", "tol": 0.0,
                                  "status": "ERROR", "note": f"{type(exc).__name__}: {exc}"[:300]})
    rows = state["rows"]
    state["passed"] = sum(r["status"] == "PASS" for r in rows)
    state["failed"] = [r["case"] for r in rows if r["status"] != "PASS"]
