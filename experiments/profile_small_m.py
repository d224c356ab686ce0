"""Where the time of a small-M packed call goes on a GPU: the kernels each path launches (torch.profiler, L2 flushed
before every call) and the read floor (how fast one plain Triton kernel can stream the packed weight bytes).

Device command (after the GPU suite; needs only torch, triton, transformers):

    PYTHONUNBUFFERED=1 QRESEARCH_COMMIT=<12-char clean HEAD> python3 experiments/profile_small_m.py --out $OUT

Writes profile_small_m_<device>.md / .json under --out after every section. Sections:
  1 floor    a streaming-read Triton kernel over the W4 g128 qweight bytes and over the fp16 weight bytes of each
             shape, best of a few tiles (CUDA-graph replays, L2 flushed): the fastest a W4 call could be, and the
             ratio that bounds W4 / fp16 at this size, launch latency included
  2 profile  per path (fp16 matmul; gemv / small / splitk at M = 1; small / splitk at M = 16): every CUDA kernel
             of one call, its mean duration and count per call, and the main kernel's bandwidth against the floor
Without CUDA it exits with status 2.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import bench_kernels as bk  # noqa: E402
from experiments.gpusuite import devrun, lib  # noqa: E402
from experiments.gpusuite.floor import floor_row  # noqa: E402

PATHS = {1: ("gemv", "small", "splitk"), 16: ("small", "splitk")}
CALLS = 20


def _device_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return float("nan")


def kernels_of(fn, device, flush, skip=frozenset()) -> list[dict]:
    """Every CUDA kernel of CALLS calls of fn (warm), kernels named in `skip` (the flush's) excluded: name, count
    and mean us per call."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        flush()
        fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(CALLS):
            flush()
            fn()
        torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        us = _device_us(e)
        if not us or us != us or e.key in skip or getattr(e, "device_type", None) is None:
            continue
        if str(e.device_type) not in ("DeviceType.CUDA", "cuda", "CUDA"):
            continue
        rows.append({"kernel": e.key.replace("void at::native::", "")[:90], "key": e.key,
                     "per_call": e.count / CALLS, "us_per_call": us / CALLS})
    return sorted(rows, key=lambda r: -r["us_per_call"])


def profile_rows(shape: str, device, dtype, flush, floor: dict | None) -> list[dict]:
    out_f, in_f = map(int, shape.split("x"))
    skip = frozenset(k["key"] for k in kernels_of(lambda: None, device, flush))  # the flush's own kernels
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    mod = bk.build("w4a16_g128", out_f, in_f, device, dtype)
    rows = []
    for m, paths in PATHS.items():
        x = torch.randn(m, in_f, device=device, dtype=dtype)
        cands = [("fp16", lambda: torch.matmul(x, w.t()), None)] + [(p, lambda: mod(x), p) for p in paths]
        for name, fn, path in cands:
            if path is None:
                ks = kernels_of(fn, device, flush, skip)
                graph = bk.time_call(fn, device, 30, 3, flush, True)
            else:
                with lib.small_m_path(path):
                    ks = kernels_of(fn, device, flush, skip)
                    graph = bk.time_call(fn, device, 30, 3, flush, True)
            total = sum(k["us_per_call"] for k in ks)
            main = ks[0] if ks else {"us_per_call": float("nan")}
            nbytes = w.numel() * w.element_size() if path is None else mod.weight_bytes()
            row = {"shape": shape, "M": m, "path": name, "kernels": ks, "gpu_us": total,
                   "graph_us": (graph["graph_s"] or graph["eager_s"]) * 1e6, "eager_us": graph["eager_s"] * 1e6,
                   "main_us": main["us_per_call"], "main_gbs": nbytes / (main["us_per_call"] * 1e-6) / 1e9}
            if floor:
                row["floor_us"] = floor["fp16_us"] if path is None else floor["w4_us"]
            rows.append(row)
            print(f"{shape} M={m} {name}: graph {row['graph_us']:.1f} us, kernels {total:.1f} us "
                  f"({len(ks)}: {', '.join(k['kernel'][:40] for k in ks)})", flush=True)
    return rows


def markdown(state: dict) -> str:
    lines = devrun.header("Where a small-M packed call's time goes", state)
    if state.get("floor"):
        lines += ["## Read floor (one streaming-read Triton kernel, CUDA-graph replay, L2 flushed, median of 30)", "",
                  "| shape | W4 g128 qweight us | GB/s | fp16 weight us | GB/s | fp16 / W4 (bound on the speedup) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['w4_us']:.1f} | {r['w4_gbs']:.0f} | {r['fp16_us']:.1f} | {r['fp16_gbs']:.0f} | "
                  f"{r['ratio']:.2f}x |" for r in state["floor"]] + [""]
    if state.get("profile"):
        lines += ["## Kernels per call (torch.profiler, L2 flushed before each of 20 calls; graph = CUDA-graph replay "
                  "time of the whole call)", "",
                  "| shape | M | path | graph us | kernels us | main kernel us | main GB/s | floor us "
                  "| kernels (us per call) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in state["profile"]:
            ks = "; ".join(f"{k['kernel'][:48]} {k['us_per_call']:.1f}" + (f" x{k['per_call']:.0f}"
                                                                            if k["per_call"] != 1 else "")
                           for k in r["kernels"])
            lines.append(f"| {r['shape']} | {r['M']} | {r['path']} | {r['graph_us']:.1f} | {r['gpu_us']:.1f} | "
                         f"{r['main_us']:.1f} | {r['main_gbs']:.0f} | {r.get('floor_us', float('nan')):.1f} | {ks} |")
        lines.append("")
    if state.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in state["errors"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096", "4096x4096"])
    ap.add_argument("--sections", nargs="+", default=["floor", "profile"], choices=["floor", "profile"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_small_m needs CUDA")
        return 2
    t0 = time.perf_counter()
    device, dtype = torch.device("cuda"), torch.float16
    tools = {t: bool(shutil.which(t)) for t in ("ncu", "nsys", "nvidia-smi")}
    state = {"budget_s": args.budget_s, "errors": [], "floor": [], "profile": [],
             "info": devrun.run_info(device, "profile_small_m.py", argv, tools=tools)}
    copy_bw = state["info"]["copy_bw_gbs"] * 1e9
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20)
    buf = torch.empty(max(2 * l2, 256 * 2**20) // 4, dtype=torch.int32, device=device)
    flush = lambda: torch.bitwise_not(buf, out=buf)  # noqa: E731 - a kernel the calls never launch

    save = devrun.saver(args.out, "profile_small_m", device, state, markdown, t0)

    for shape in args.shapes:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 45:
            state["errors"].append(f"{shape}: skipped, {left:.0f} s of budget left")
            continue
        t = time.perf_counter()
        floor = None
        try:
            if "floor" in args.sections:
                floor = floor_row(shape, device, flush, copy_bw)
                state["floor"].append(floor)
                save()
            if "profile" in args.sections:
                state["profile"] += profile_rows(shape, device, dtype, flush, floor)
        except Exception as exc:  # noqa: BLE001 - recorded; the next shape still runs
            state["errors"].append(f"{shape}: {type(exc).__name__}: {exc}"[:600])
        print(f"{shape}: {time.perf_counter() - t:.1f} s", flush=True)
        save()
    print(markdown(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
