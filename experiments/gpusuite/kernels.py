"""Section 3: kernel benchmark at Llama-2-7B layer shapes, through experiments/bench_kernels.py's functions.

Cold-L2 timing: a buffer of 2x the L2 (at least 256 MiB) is zeroed before every timed call, outside the CUDA-event
region, so neither the fp16 weight (33.5 MB at 4096x4096 fits a 50 MB L2) nor the packed one is read from L2,
as in a real decode step where the other layers' weights evict it. The first calls (warm-up) compile and autotune
the Triton kernels; they are not timed. Each call is then timed twice: eagerly (host launch overhead included:
a Triton launch costs tens of microseconds of Python, more than a 7.5 us W4 GEMV at 4096x11008) and as replays
of a captured CUDA graph (kernel time); speedups use the graph times when both captures worked (column timing).
Each row's quantized output is compared with the torch reference on the same module (ref_rel_err), which checks
the autotuned launch configurations the correctness section does not use.
"""
from __future__ import annotations

import torch

from experiments import bench_kernels as bk  # builds QuantLinear modules (its own library calls)

from . import launch, lib, peer
from .common import Ctx, free_device_memory, warm_clocks
from .floor import floor_row
from .w8a8_parts import parts_row

GPU_SHAPES, GPU_MS = bk.SHAPES, [1, 16, 256, 2048]  # SHAPES: 4096x4096, 11008x4096, 4096x11008 (out x in)
QUICK_SHAPES, QUICK_MS = ["48x256", "64x384"], [1, 16]
GPU_SHAPE_S, QUICK_SHAPE_S = 55.0, 3.0  # rough cost of one shape incl. compile + autotune (skip threshold)
REF_TOL = {torch.float16: 3e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}  # kernel vs torch reference


def l2_flush(device: torch.device):
    """A callable that evicts the L2 (zeroes a buffer twice its size), or None on CPU."""
    if device.type != "cuda":
        return None
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20)
    buf = torch.empty(max(2 * l2, 256 * 2**20), dtype=torch.uint8, device=device)
    return buf.zero_


def reference(mod, x):
    """The same packed module run by the torch reference kernel."""
    with lib.forced_kernels("torch"):
        return mod(x)


ALT_VARIANTS = ("w4a16_g128",)  # the goals' variant (each costs a compile and tune of every small-M config)
# the kernels the auto path did not pick, per M: small-M paths; gemv-i2f: the M = 1 GEMV at its tuned tile with
# codes converted int-to-float (an A/B of its default conversion-free unpacking); fused: the GEMM that dequantizes
# in its main loop (auto dequantizes to a dense weight then runs the dense GEMM from 128 tokens on); at 64 and 128
# tokens both, for the crossover (triton_dequant.DEQUANT_MIN_M)
ALT_PATHS = {1: ("small", "splitk", "gemv-i2f"), 16: ("splitk",), 64: ("dequant", "fused"),
             128: ("dequant", "fused"), 256: ("fused",), 2048: ("fused",)}
W8A8_PARTS_MS = (256, 2048)  # the W8A8 call split into its kernels (w8a8_parts.py), beside cuBLAS int8


# the goal shape only; gather (triton_wq's own autotune over its decode tiles: ~20 compiles per M bucket) at M = 1
ACT_ORDER_SHAPE, ACT_ORDER_RUNS, ACT_ORDER_S = "4096x11008", ((1, "permute"), (1, "gather"), (16, "permute")), 40.0


def _path_row(shape: str, variant: str, label: str, mod, x, w, t_fp: dict, ctx: Ctx, flush, repeats: int,
              warmup: int) -> dict:
    """One A/B row: `mod` (of bench_kernels variant `variant`) timed on x under the caller's path setting, beside
    the fp16 times t_fp of the same shape and M, with its output checked against the torch reference."""
    out_f, in_f = w.shape
    bits, group, sym, _ = bk.VARIANTS[variant]
    t = bk._row_times(t_fp, bk.time_call(lambda: mod(x), ctx.device, repeats, warmup, flush, ctx.gpu))
    err = bk.rel_err(mod(x), reference(mod, x))
    io = (in_f + out_f) * x.shape[0] * x.element_size()
    return {"shape": shape, "M": x.shape[0], "variant": label, "kernel": mod.kernel_name, **t, "repeats": repeats,
            "bw_frac": (mod.weight_bytes() + io) / (t["q_ms"] / 1e3) / ctx.copy_bw,
            "fp16_bw_frac": (w.numel() * w.element_size() + io) / (t["fp16_ms"] / 1e3) / ctx.copy_bw,
            "limit": bk.memory_bound_limit(bits, group, in_f, sym), "ref_rel_err": err}


@torch.no_grad()
def act_order_rows(shape: str, ctx: Ctx, flush, repeats: int, warmup: int) -> list[dict]:
    """An act-order W4 g128 layer (random clean g_idx) for the (M, path) of ACT_ORDER_RUNS: QRESEARCH_ACT_ORDER=
    permute (codes permuted once, the contiguous-group kernels) or gather (triton_wq's per-element scale / zero
    gathers), beside the same fp16 matmul: rows labelled 'w4a16_g128 act-order <path>'."""
    out_f, in_f = map(int, shape.split("x"))
    w = (torch.randn(out_f, in_f, device=ctx.device) * 0.02).to(ctx.dtype)
    mod = bk.build("w4a16_g128", out_f, in_f, ctx.device, ctx.dtype, act_order=True)
    rows = []
    for m in sorted({m for m, _ in ACT_ORDER_RUNS}):
        x = torch.randn(m, in_f, device=ctx.device, dtype=ctx.dtype)
        t_fp = bk.time_call(lambda: torch.matmul(x, w.t()), ctx.device, repeats, warmup, flush, ctx.gpu)
        for path in (p for mm, p in ACT_ORDER_RUNS if mm == m):
            with lib.act_order_path(path):
                rows.append(_path_row(shape, "w4a16_g128", f"w4a16_g128 act-order {path}", mod, x, w, t_fp, ctx,
                                      flush, repeats, warmup))
    return rows


@torch.no_grad()
def alt_path_rows(shape: str, ctx: Ctx, flush, repeats: int, warmup: int) -> list[dict]:
    """Each M of ALT_PATHS through the kernels the default path (auto: kernels/dispatch.py) did not pick
    (QRESEARCH_SMALL_M for M <= 16, QRESEARCH_PREFILL above), beside the same fp16 matmul: rows labelled
    '<variant> <path>'."""
    out_f, in_f = map(int, shape.split("x"))
    w = (torch.randn(out_f, in_f, device=ctx.device) * 0.02).to(ctx.dtype)
    rows = []
    for m, paths in ALT_PATHS.items():
        x = torch.randn(m, in_f, device=ctx.device, dtype=ctx.dtype)
        t_fp = bk.time_call(lambda: torch.matmul(x, w.t()), ctx.device, repeats, warmup, flush, ctx.gpu)
        for v in ALT_VARIANTS:
            mod = bk.build(v, out_f, in_f, ctx.device, ctx.dtype)
            for path in paths:
                with lib.prefill_path(path) if m > 16 else lib.small_m_path(path):
                    rows.append(_path_row(shape, v, f"{v} {path}", mod, x, w, t_fp, ctx, flush, repeats, warmup))
            del mod
    return rows


def tuned_tiles() -> list[dict]:
    """The tile each tuned Triton kernel of this process chose, per layer key: so a GPU run says which configs
    its numbers came from (their SASS can then be read offline: experiments/compile_kernels.py)."""
    import sys

    def mod(name):
        return sys.modules.get(f"qresearch.kernels.{name}")

    out = []
    if (g := mod("triton_gemv")) is not None:
        out += [{"kernel": "triton_gemv", "key": str(k), "tile": {**cfg, "num_warps": warps}}
                for k, (cfg, warps) in g._BEST.items()]
    if (s := mod("triton_small")) is not None:
        out += [{"kernel": "triton_small", "key": str(k), "tile": str(v["best"])} for k, v in s.TUNED.items()]
    for name in ("triton_wq", "triton_w8a8"):
        if (m := mod(name)) is not None:
            out += [{"kernel": name, "key": str(k), "tile": {**c.kwargs, "num_warps": c.num_warps,
                                                             "num_stages": c.num_stages}}
                    for k, c in m._BEST.items()]
    return out


PEER_OURS_SHAPE, PEER_OURS_S = "4096x11008", 30.0  # our bf16 W4 beside the peer: the goal shape (a compile + tune)


def peer_section(shape: str, ctx: Ctx, state: dict, flush, repeats: int, warmup: int) -> None:
    """torch's int4 GEMM (peer.py) at this shape and, at the goal shape on a GPU, our W4 in bf16 beside it; an
    error is recorded per shape and the benchmark goes on."""
    try:
        state.setdefault("peer", []).extend(peer.peer_rows(shape, ctx.device, flush, repeats, warmup, ctx.gpu))
        if ctx.gpu and shape == PEER_OURS_SHAPE:
            why = ctx.skip_reason(PEER_OURS_S, "our bf16 W4 beside the peer")
            if why:
                state["skipped"].append(why)
            else:
                state.setdefault("peer_ours_bf16", []).extend(
                    peer.ours_bf16_rows(shape, ctx.device, flush, repeats, warmup, ctx.gpu))
    except Exception as exc:  # noqa: BLE001 - recorded; the benchmark goes on
        state.setdefault("peer_errors", []).append(f"{shape}: {type(exc).__name__}: {exc}"[:300])


def run(ctx: Ctx, state: dict) -> None:
    shapes, ms = (GPU_SHAPES, GPU_MS) if ctx.full else (QUICK_SHAPES, QUICK_MS)
    repeats, warmup = (30, 5) if ctx.full else (2, 1)
    need = GPU_SHAPE_S if ctx.full else QUICK_SHAPE_S
    flush = l2_flush(ctx.device)
    state["warm_clocks"] = warm_clocks(ctx.device)  # before the first autotune and timing
    try:  # host time per eager call at M = 1 (launch.py): a few seconds, first, so a cut budget still has it
        state["host_overhead"] = launch.rows(ctx.device, ctx.dtype, quick=not ctx.full)
    except Exception as exc:  # noqa: BLE001 - recorded; the benchmark goes on
        state["host_overhead_error"] = f"{type(exc).__name__}: {exc}"[:300]
    ctx.save()
    state.update(shapes=shapes, ms=ms, repeats=repeats, warmup=warmup, dtype=str(ctx.dtype), copy_bw=ctx.copy_bw,
                 variants={v: dict(zip(("bits", "group", "sym", "int8_act"), p)) for v, p in bk.VARIANTS.items()},
                 timing=("CUDA events, median of repeats, L2 flushed before every call; CUDA-graph replays and "
                         "eager calls" if ctx.gpu else
                         "perf_counter, median of repeats (CPU: torch reference path)"),
                 ref_tol=REF_TOL[ctx.dtype], rows=[], skipped=[])
    for shape in shapes:
        why = ctx.skip_reason(need, f"shape {shape}")
        if why:
            state["skipped"].append(why)
            continue
        state["rows"] += bk.bench_shape(shape, ms, ctx.device, ctx.dtype, repeats, warmup, ctx.copy_bw,
                                        before=flush, reference=reference, graphs=ctx.gpu)
        if ctx.gpu:  # the alternative Triton paths and the read floor exist only on CUDA
            state["rows"] += alt_path_rows(shape, ctx, flush, max(5, repeats // 3), warmup)  # A/B rows: fewer
            if shape == ACT_ORDER_SHAPE:
                why = ctx.skip_reason(ACT_ORDER_S, "act-order rows")
                if why:
                    state["skipped"].append(why)
                else:
                    state["rows"] += act_order_rows(shape, ctx, flush, max(5, repeats // 3), warmup)
            state.setdefault("floor", []).append(floor_row(shape, ctx.device, flush, ctx.copy_bw))
            state.setdefault("w8a8_parts", []).extend(
                parts_row(shape, m, ctx.device, ctx.dtype, flush, max(5, repeats // 3), warmup, True)
                for m in W8A8_PARTS_MS)
        peer_section(shape, ctx, state, flush, max(5, repeats // 3) if ctx.full else repeats, warmup)
        free_device_memory(ctx.device)
        ctx.save()
    state["tuned"] = tuned_tiles()
    bad = [r for r in state["rows"] if not r.get("ref_rel_err", 0.0) <= REF_TOL[ctx.dtype]]
    state["ref_check"] = "PASS" if not bad else f"FAIL: {len(bad)} rows above {REF_TOL[ctx.dtype]:g}"
