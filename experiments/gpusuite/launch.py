"""Host time per call: where an eager packed layer's time goes when the GPU work is small.

Eager decode of the 7B-shaped model ran at 0.42x fp16 on an H100 (results/gpu_nvidia_h100_80gb_hbm3_e2e.md) while
the CUDA-graph step ran at 1.47x: ~170 us more per packed linear than cuBLAS's call, all host time. This probe
splits that time at M = 1 on a 1024 x 1024 layer (GPU work of a few us, so a loop of calls is bound by the host):
wall time of `calls` back-to-back calls, one synchronize at the end, per call:

  fp16 F.linear                       the baseline (cuBLAS through torch)
  QuantLinear W4 / W8A8 forward       the whole eager path (dispatch, checks, allocations, launches)
  triton_gemv._launch                 the GEMV's own launch with its tile fixed (torch.empty + the Triton JIT call)
  JIT launch, buffers reused          the Triton JITFunction call alone (argument binding, cache lookup, launch)
  compiled-kernel launch              the same kernel through the CompiledKernel the JIT call returned (no binding
                                      or cache lookup: what a launch path that caches it per layer would pay)
  act_quant / int8_gemm               W8A8's two kernels called alone (int8_gemm as called: the autotuner's choice
                                      through kernels/launcher.py; and through the autotuner on every call)
  wq_gemv / _launch (tuned tile)      the GEMV as QuantLinear calls it, and its launch with the tuned tile
  ... M=64 / M=128                    prefill-sized calls against fp16 F.linear at the same M (on CUDA: the fused
                                      GEMM below 128 tokens, dequantize-then-GEMM from 128, with its two halves
                                      alone): eager prefill of the 7B-shaped model ran at 0.38x fp16 at 128 tokens
                                      (69.0 vs 26.4 ms, results/gpu_nvidia_h100_80gb_hbm3.md at 2803757) while its
                                      GPU work is about 20 ms

`profile(...)` adds cProfile's top functions (own time) of the W4 and W8A8 forwards: where the host time goes.

Every launch path's output is compared with the JIT launch's (same kernel, same inputs: bit-identical or the row says
so). A path whose API differs on this Triton version is recorded with its error, not skipped silently.
CPU (quick mode): fp16 and the QuantLinear rows (the torch reference kernels the quick suite runs); the Triton
rows need CUDA.
"""
from __future__ import annotations

import inspect
import time

import torch
import torch.nn.functional as F

from experiments import bench_kernels as bk

from .common import sync

SHAPE, QUICK_SHAPE = (1024, 1024), (64, 128)  # (out, in)
PREFILL_M = (64, 128)  # prefill-sized calls: the fused GEMM (M < 128) and dequantize-then-GEMM (M >= 128) on CUDA
TILE = {"BLOCK_N": 64, "BLOCK_K_CODES": 128, "SPLIT_K": 1}  # no split: no workspace or counters in the timed call


def per_call_us(fn, device, calls: int) -> float:
    """Wall microseconds per call of `calls` back-to-back calls after 3 warm ones (one synchronize at the end)."""
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls * 1e6


def _row(name: str, fn, device, calls: int, base: float | None, out=None, want=None) -> dict:
    try:
        us = per_call_us(fn, device, calls)
    except Exception as exc:  # noqa: BLE001 - a launch API this Triton version lacks is a result, recorded
        return {"path": name, "us": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
    row = {"path": name, "us": us, "vs_fp16": None if base is None else us / base}
    if out is not None and want is not None:
        row["identical"] = bool(torch.equal(out(), want))
    return row


@torch.no_grad()
def rows(device: torch.device, dtype: torch.dtype, quick: bool, calls: int = 300) -> list[dict]:
    out_f, in_f = QUICK_SHAPE if quick else SHAPE
    x = torch.randn(1, in_f, device=device, dtype=dtype)
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    w4, w8a8 = bk.build("w4a16_g128", out_f, in_f, device, dtype), bk.build("w8a8", out_f, in_f, device, dtype)
    base = per_call_us(lambda: F.linear(x, w), device, calls)
    out = [{"path": "fp16 F.linear", "us": base, "vs_fp16": 1.0},
           _row(f"QuantLinear W4 g128 forward ({w4.kernel_name})", lambda: w4(x), device, calls, base),
           _row(f"QuantLinear W8A8 forward ({w8a8.kernel_name})", lambda: w8a8(x), device, calls, base)]
    out += prefill_rows(w, w4, device, dtype, calls)
    if device.type != "cuda":
        return out
    out += triton_rows(w4, w8a8, x, device, calls, base)
    return out


def prefill_rows(w, w4, device, dtype, calls: int) -> list[dict]:
    """Prefill-sized calls (M = PREFILL_M, 64: the fused GEMM; 128: dequantize-then-GEMM on CUDA), each against
    fp16 F.linear at the same M: host time per call where the GPU work is a few us. On CUDA also the dequantize
    kernel alone and the dense matmul alone (the two halves of the dequant call)."""
    out = []
    for m in PREFILL_M:
        x = torch.randn(m, w.shape[1], device=device, dtype=dtype)
        base = per_call_us(lambda: F.linear(x, w), device, calls)
        out += [{"path": f"fp16 F.linear M={m}", "us": base, "vs_fp16": 1.0},
                _row(f"QuantLinear W4 g128 forward M={m} ({w4.kernel_name})", lambda: w4(x), device, calls, base)]
        if device.type == "cuda" and m >= 128:
            from qresearch.kernels import triton_dequant as td  # LIBRARY: the halves of the dequant call

            b = w4._buffers
            deq = lambda: td.dequantize(w4.meta, b["qweight"], b["scales"], b["qzeros"], None, dtype)  # noqa: E731
            wt = deq()
            out += [_row(f"  triton_dequant.dequantize alone M={m}", deq, device, calls, base),
                    _row(f"  x @ w (dequantized [K, N]) alone M={m}", lambda: x @ wt, device, calls, base)]
    return out


def triton_rows(w4, w8a8, x, device, calls: int, base: float) -> list[dict]:
    """The GEMV's launch three ways (its own _launch, the bare JIT call, the CompiledKernel runner) and W8A8's two
    kernels alone."""
    from qresearch.kernels import triton_gemv as tg  # LIBRARY: the M = 1 GEMV (launch internals)
    from qresearch.kernels.triton_w8a8 import act_quant, int8_gemm  # LIBRARY: the W8A8 kernels

    b, meta = w4._buffers, w4.meta
    args = (x, meta, b["qweight"], b["scales"], b["qzeros"], None, TILE)
    want = tg._launch(*args)
    out = [_row("triton_gemv._launch (tile fixed)", lambda: tg._launch(*args), device, calls, base,
                lambda: tg._launch(*args), want)]
    n = meta.out_features
    y = torch.empty(1, n, device=device, dtype=x.dtype)
    grid = (-(-n // TILE["BLOCK_N"]), 1)
    pos = (x, b["qweight"], b["scales"], b["qzeros"], b["scales"], y, y, y, n, meta.in_features,
           b["qweight"].stride(0), b["scales"].stride(0), b["qzeros"].stride(0))
    kw = dict(GROUP=meta.group, BITS=meta.bits, SYM=meta.sym, HAS_BIAS=False, BLOCK_N=TILE["BLOCK_N"],
              BLOCK_KW=tg._block_kw(TILE["BLOCK_K_CODES"], meta.bits, meta.group, meta.in_features), SPLIT_K=1,
              EVEN_K=meta.in_features % TILE["BLOCK_K_CODES"] == 0, MAGIC=tg._magic())
    jit = lambda: tg.wq_gemv_kernel[grid](*pos, **kw, num_warps=4)  # noqa: E731
    compiled = jit()
    out.append(_row("JIT launch, buffers reused", jit, device, calls, base, lambda: (jit(), y.clone())[1], want))
    try:
        bound = inspect.signature(tg.wq_gemv_kernel.fn).bind(*pos, **kw)
        bound.apply_defaults()
        vals = tuple(bound.arguments.values())
        runner = compiled[grid + (1,) * (3 - len(grid))]  # the CompiledKernel runner indexes grid[2]
        out.append(_row("compiled-kernel launch", lambda: runner(*vals), device, calls, base,
                        lambda: (runner(*vals), y.clone())[1], want))
    except Exception as exc:  # noqa: BLE001 - recorded: the API differs on this Triton version
        out.append({"path": "compiled-kernel launch", "us": None, "error": f"{type(exc).__name__}: {exc}"[:200]})
    if device.type == "cuda":  # the tuned tile QuantLinear runs (tuning times tiles: needs a GPU)
        cfg, warps = tg._tune(x, meta, b["qweight"], b["scales"], b["qzeros"], None)
        tuned = f"BLOCK_N={cfg['BLOCK_N']} K_CODES={cfg['BLOCK_K_CODES']} SPLIT_K={cfg['SPLIT_K']} warps={warps}"
        out.append(_row("triton_gemv.wq_gemv (tuned)", lambda: tg.wq_gemv(x, meta, b["qweight"], b["scales"],
                        b["qzeros"], None), device, calls, base))
        out.append(_row(f"triton_gemv._launch ({tuned})", lambda: tg._launch(*args[:-1], cfg, warps), device, calls,
                        base))
    xq, sx = act_quant(x)
    out.append(_row("act_quant (W8A8)", lambda: act_quant(x), device, calls, base))
    gemm = lambda: int8_gemm(xq, sx, w8a8.qweight, w8a8.scales, None, x.dtype)  # noqa: E731
    want = gemm()
    out.append(_row("int8_gemm (W8A8)", gemm, device, calls, base, gemm, want))
    if device.type == "cuda":  # the autotuner's own launch each call (how int8_gemm launched before launcher.py)
        from qresearch.kernels import triton_w8a8 as tw  # LIBRARY: its chosen-config cache

        out.append(_row("int8_gemm through the autotuner each call", lambda: (tw._BEST.clear(), gemm())[1], device,
                        calls, base, lambda: (tw._BEST.clear(), gemm())[1], want))
    return out


def profile(device: torch.device, dtype: torch.dtype, quick: bool, calls: int = 500, top: int = 12) -> dict:
    """{variant: [(function, own us per call, calls per call), ...]}: cProfile of `calls` eager M = 1 forwards (and
    M = 128 for W4: the prefill path)."""
    import cProfile
    import pstats

    out_f, in_f = QUICK_SHAPE if quick else SHAPE
    res = {}
    for variant, m in (("w4a16_g128", 1), ("w8a8", 1), ("w4a16_g128", 128)):
        layer = bk.build(variant, out_f, in_f, device, dtype)
        x = torch.randn(m, in_f, device=device, dtype=dtype)
        with torch.no_grad():
            per_call_us(lambda: layer(x), device, 3)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                layer(x)
            sync(device)
            prof.disable()
        stats = pstats.Stats(prof).stats  # {(file, line, fn): (cc, nc, tottime, cumtime, callers)}
        rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
        res[variant if m == 1 else f"{variant} M={m}"] = [
            (f"{k[0].rsplit('/', 2)[-1]}:{k[1]}({k[2]})", v[2] / calls * 1e6, v[1] / calls) for k, v in rows]
    return res
