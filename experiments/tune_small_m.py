"""Small-M Triton kernels on a GPU: correctness of every config, every config's time, and the three paths side by
side (triton_small 'small', triton_gemv 'gemv', triton_wq split-K 'splitk') at Llama-2-7B shapes, M = 1 and 16.

Device command (after the GPU suite, on the same lent machine; needs only torch, triton, transformers):

    PYTHONUNBUFFERED=1 QRESEARCH_COMMIT=<12-char clean HEAD> python3 experiments/tune_small_m.py --out $OUT

Writes tune_small_m_<device>.md / .json under --out after every section. Sections:
  1 correctness  every small-M config at ragged shapes (odd N, K tails, groups 64 / 128 / 256 / per channel,
                 2 / 4 / 8 bits, sym / asym, fp16 / bf16, M = 1, 3, 16) vs float64 truth of the packed buffers
  2 configs      every config's time per shape (triton.testing.do_bench, L2 cleared per call) and its error
  3 paths        QuantLinear through each path vs fp16 torch.matmul (CUDA-graph replays, L2 flushed), and the goals
  4 decode       (budget left) 7B-shaped random model, static-cache CUDA-graph decode at batch 1: fp16 vs W4 g128
                 on each path
Without CUDA it exits with status 2 (the kernels' math is tested under the Triton interpreter: tests/interp_small.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import bench_kernels as bk  # noqa: E402
from experiments.gpusuite import devrun, lib  # noqa: E402
from experiments.gpusuite.common import build_causal_lm, free_device_memory  # noqa: E402
from experiments.gpusuite.e2e import MODELS  # noqa: E402
from experiments.gpusuite.graph_decode import graph_decode  # noqa: E402
from experiments.gpusuite.kernels import l2_flush  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (bits, sym, group, N, K): ragged correctness cases
CASES = [(4, False, 128, 200, 576), (4, True, 128, 333, 640), (4, False, 64, 200, 320), (8, True, -1, 200, 600),
         (8, False, 128, 200, 576), (2, False, 128, 200, 576), (2, False, 256, 120, 512), (4, False, -1, 96, 4100)]
GOALS = {1: 3.5, 16: 2.5}
PATHS = {1: ("small", "gemv", "splitk"), 16: ("small", "splitk")}


def truth(x, meta, bufs, bias=None) -> torch.Tensor:
    y = x.double() @ lib.dequant_weight64(meta, bufs).t()
    return y if bias is None else y + bias.double()


def to(bufs: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in bufs.items()}


def correctness(device) -> list[dict]:
    from qresearch.kernels import triton_small as S

    rows, gen = [], torch.Generator().manual_seed(0)
    for bits, sym, group, n, k in CASES:
        meta, bufs = lib.pack_random_layer(n, k, bits, group, sym, False, torch.float16, gen)
        bufs = to(bufs, device)
        bias = torch.randn(n, generator=gen).half().to(device)
        for m in (1, 3, 16):
            why = S.supports(meta, False, m)
            if why:
                rows.append({"case": f"w{bits} {'sym' if sym else 'asym'} g{group} {n}x{k} M={m}", "skip": why})
                continue
            for dt in (torch.float16, torch.bfloat16):
                x = torch.randn(m, k, generator=gen).to(device, dt)
                t = truth(x, meta, bufs, bias)
                kern = "wide" if m == 1 else "dot"
                worst, cfgs = (0.0, None), S.configs(kern, meta)
                if (bits, sym, group) != (4, False, 128):  # every config on the main case; 4 elsewhere (compiles)
                    cfgs = [cfgs[0], cfgs[1], cfgs[-2], cfgs[-1]]
                for cfg in cfgs:
                    y = S.small_m_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bias, cfg)
                    e = bk.rel_err(y, t) if torch.isfinite(y).all() else float("inf")
                    worst = max(worst, (e, S.label(cfg, kern)), key=lambda p: p[0])
                ref_err = bk.rel_err(lib.wa16_reference(x, meta, bufs, bias), t)
                rows.append({"case": f"w{bits} {'sym' if sym else 'asym'} g{group} {n}x{k} M={m}",
                             "dtype": str(dt).removeprefix("torch."), "configs": len(cfgs),
                             "worst_rel": worst[0], "worst_cfg": worst[1], "ref_rel": ref_err, "tol": TOL[dt],
                             "status": "PASS" if worst[0] <= TOL[dt] else "FAIL"})
    return rows


def config_table(shape: str, device, dtype) -> list[dict]:
    """Every config's do_bench time (the tuner's own numbers) and error at this shape, W4 g128 asym and W8 sym."""
    from qresearch.kernels import triton_small as S

    out_f, in_f = map(int, shape.split("x"))
    rows, gen = [], torch.Generator().manual_seed(1)
    for bits, group, sym in ((4, 128, False),):
        meta, bufs = lib.pack_random_layer(out_f, in_f, bits, group, sym, False, torch.float16, gen)
        bufs = to(bufs, device)
        for m in (1, 16):
            x = torch.randn(m, in_f, generator=gen).to(device, dtype)
            S.small_m_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], None)  # tunes
            key = S.tune_key("wide" if m == 1 else "dot", meta, x)
            t = truth(x, meta, bufs)
            errs = {}
            for cfg in S.configs(key[0], meta):
                errs[S.label(cfg, key[0])] = bk.rel_err(
                    S.small_m_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], None, cfg), t)
            rows.append({"shape": shape, "M": m, "weights": f"w{bits} g{group} {'sym' if sym else 'asym'}",
                         "best": S.label(S.TUNED[key]["best"], key[0]), "ms": S.TUNED[key]["ms"], "rel_err": errs})
    return rows


def path_rows(shape: str, device, dtype, flush, copy_bw: float) -> list[dict]:
    out_f, in_f = map(int, shape.split("x"))
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    rows = []
    for m, paths in PATHS.items():
        x = torch.randn(m, in_f, device=device, dtype=dtype)
        t_fp = bk.time_call(lambda: torch.matmul(x, w.t()), device, 30, 5, flush, True)
        for v in ("w4a16_g128",):  # the goals' variant (each variant costs a compile of every config)
            mod = bk.build(v, out_f, in_f, device, dtype)
            bits, group, sym, _ = bk.VARIANTS[v]
            with lib.forced_kernels("torch"):
                y_ref = mod(x)
            for path in paths:
                with lib.small_m_path(path):
                    t = bk._row_times(t_fp, bk.time_call(lambda m=mod: m(x), device, 30, 5, flush, True))
                    err = bk.rel_err(mod(x), y_ref)
                io = (in_f + out_f) * m * x.element_size()
                rows.append({"shape": shape, "M": m, "variant": v, "path": path, **t, "ref_rel_err": err,
                             "bw_frac": (mod.weight_bytes() + io) / (t["q_ms"] / 1e3) / copy_bw,
                             "limit": bk.memory_bound_limit(bits, group, in_f, sym)})
            del mod
    return rows


def decode_rows(device, dtype) -> list[dict]:
    """7B-shaped random model, static-cache decode with one CUDA graph per step, batch 1 and 16."""
    model = build_causal_lm(MODELS["llama2_7b"], dtype, device)
    rows = []
    for b in (1, 16):
        rows.append({"variant": "fp16", "batch": b, **graph_decode(model, device, b, 16, 32, 32000)})
    lib.rtn_packed(model, "w4_g128", device)
    free_device_memory(device)
    for path in ("small", "gemv", "splitk"):
        with lib.small_m_path(path):
            for b in (1, 16):
                if path == "gemv" and b == 16:
                    continue  # the GEMV takes one token; batch 16 runs split-K, as the splitk row
                rows.append({"variant": f"w4_g128 {path}", "batch": b,
                             **graph_decode(model, device, b, 16, 32, 32000)})
    del model
    free_device_memory(device)
    return rows


def markdown(state: dict) -> str:
    lines = devrun.header("Small-M Triton kernels", state)
    if state.get("goals"):
        lines += ["## Goals (W4A16 g128 at 4096x11008, best path vs fp16 torch.matmul, CUDA-graph kernel time)", "",
                  "| M | target | path | reached | status |", "|---|---|---|---|---|"]
        lines += [f"| {g['M']} | >= {g['target']}x | {g['path']} | {g['speedup']:.2f}x | "
                  f"{'MET' if g['speedup'] >= g['target'] else 'MISSED'} |" for g in state["goals"]] + [""]
    if state.get("paths"):
        lines += ["## Paths side by side", "",
                  "QuantLinear through each path (QRESEARCH_SMALL_M); times are CUDA-graph replays with the L2 "
                  "flushed before every call, median of 30; bw = weight + qparam + activation bytes / time / copy "
                  "bandwidth; ref err = rel. error vs the torch reference on the same module.", "",
                  "| shape | M | variant | path | fp16 ms | quant ms | speedup | bw / copy | limit | ref err |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['M']} | {r['variant']} | {r['path']} | {r['fp16_ms']:.4f} | {r['q_ms']:.4f} | "
                  f"{r['speedup']:.2f}x | {r['bw_frac']:.2f} | {r['limit']:.2f}x | {r['ref_rel_err']:.1e} |"
                  for r in state["paths"]] + [""]
    if state.get("decode"):
        fp = {r["batch"]: r for r in state["decode"] if r["variant"] == "fp16"}
        lines += ["## Decode, 7B-shaped random model, static cache, one CUDA graph per step", "",
                  "| variant | batch | tok/s | ms / step | vs fp16 |", "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.3f} | "
                  f"{fp[r['batch']]['ms_per_step'] / r['ms_per_step']:.2f}x |" for r in state["decode"]] + [""]
    if state.get("configs"):
        lines += ["## Every config (do_bench ms, L2 cleared per call; * = the tuner's pick)", ""]
        for r in state["configs"]:
            ranked = sorted(r["ms"].items(), key=lambda kv: kv[1])
            lines.append(f"- {r['shape']} M={r['M']} {r['weights']}: " + "; ".join(
                f"{'*' if c == r['best'] else ''}{c} {ms * 1e3:.1f} us (err {r['rel_err'][c]:.1e})" for c, ms in ranked))
        lines.append("")
    if state.get("correctness"):
        rows = state["correctness"]
        bad = [r for r in rows if r.get("status") == "FAIL"]
        lines += ["## Correctness of every config vs float64 truth", "",
                  f"{sum(r.get('status') == 'PASS' for r in rows)} PASS, {len(bad)} FAIL, "
                  f"{sum('skip' in r for r in rows)} not taken by the kernels (reason given)", "",
                  "| case | dtype | configs | worst rel | worst config | ref rel | tol | status |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | - | - | - | - | - | - | not taken: {r['skip']} |" if "skip" in r else
                  f"| {r['case']} | {r['dtype']} | {r['configs']} | {r['worst_rel']:.2e} | {r['worst_cfg']} | "
                  f"{r['ref_rel']:.2e} | {r['tol']:g} | {r['status']} |" for r in rows]
    if state.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in state["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--budget-s", type=float, default=360.0)
    ap.add_argument("--shapes", nargs="+", default=bk.SHAPES)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_small_m needs CUDA (the kernels' math is tested under the interpreter: tests/interp_small.py)")
        return 2
    t0 = time.perf_counter()
    device, dtype = torch.device("cuda"), torch.float16
    state = {"budget_s": args.budget_s, "errors": [], "info": devrun.run_info(device, "tune_small_m.py", argv)}
    copy_bw = state["info"]["copy_bw_gbs"] * 1e9
    save = devrun.saver(args.out, "tune_small_m", device, state, markdown, t0)

    def section(key, fn, need_s):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < need_s:
            state["errors"].append(f"{key}: skipped, {left:.0f} s of budget left (needs ~{need_s:.0f})")
            return
        t = time.perf_counter()
        try:
            state[key] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the later sections still run
            state["errors"].append(f"{key}: {type(exc).__name__}: {exc}"[:600])
        print(f"{key}: {time.perf_counter() - t:.1f} s", flush=True)
        save()

    flush = l2_flush(device)
    section("paths", lambda: [r for s in args.shapes for r in path_rows(s, device, dtype, flush, copy_bw)], 60)
    paths = state.get("paths", [])
    state["goals"] = []
    for m, target in GOALS.items():
        cand = [r for r in paths if r["shape"] == "4096x11008" and r["M"] == m and r["variant"] == "w4a16_g128"]
        if cand:
            best = max(cand, key=lambda r: r["speedup"])
            state["goals"].append({"M": m, "target": target, "path": best["path"], "speedup": best["speedup"]})
    save()
    section("correctness", lambda: correctness(device), 30)
    section("configs", lambda: [r for s in args.shapes for r in config_table(s, device, dtype)], 20)
    section("decode", lambda: decode_rows(device, dtype), 70)
    print(markdown(state))
    return 1 if any(r.get("status") == "FAIL" for r in state.get("correctness", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
