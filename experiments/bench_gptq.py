"""Time gptq_quantize per layer on Llama-7B-shaped layers (weight [out, in]): q/k/v/o 4096x4096, gate/up
11008x4096 (inputs 4096), down 4096x11008 (inputs 11008). Hessians come from random correlated inputs; only the
GPTQ solve is timed (Hessian accumulation is reported separately). No assertions: this is a measurement.

    python experiments/bench_gptq.py                      # all shapes, w4 g128, blocksize 128
    python experiments/bench_gptq.py --shapes 4096x4096 --act-order --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from methods.gptq import gptq_quantize  # noqa: E402
from qresearch.calib.stats import accumulate_hessian  # noqa: E402
from qresearch.quant import weight_spec  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "4096x11008": (4096, 11008)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(out_f: int, in_f: int, args, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(out_f, in_f, generator=g) * 0.02).to(device)  # [out, in]
    mix = torch.randn(256, in_f, generator=g).to(device) / 16  # low-rank correlation between input channels
    t0 = time.perf_counter()
    H, n = None, 0
    for _ in range(args.tokens // 512):
        z = torch.randn(512, 256, device=device)
        H, n = accumulate_hessian(H, n, z @ mix + torch.randn(512, in_f, device=device))  # [512, in]
    _sync(device)
    t_h = time.perf_counter() - t0
    spec = weight_spec(args.bits, args.group_size, args.sym)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        gptq_quantize(W, H, spec, args.blocksize, 0.01, args.act_order, args.static_groups)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"shape": [out_f, in_f], "hessian_seconds": t_h, "hessian_tokens": n, "gptq_seconds": min(times),
            "all_seconds": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens accumulated into each Hessian")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--md", default=None, help="write a markdown table here (device, load and settings named)")
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.shapes:
        r = bench(*SHAPES[name], args, device)
        rows.append(r)
        print(f"{name:>11}: gptq {r['gptq_seconds']:.2f} s   (hessian from {r['hessian_tokens']} tokens "
              f"{r['hessian_seconds']:.2f} s)", flush=True)
    meta = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "settings": vars(args), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(meta, indent=1))
    if args.md:
        Path(args.md).write_text(markdown(meta))


def markdown(meta: dict) -> str:
    """The measurement as a table, with what it ran on (load average included: CPU timings are shared-machine)."""
    s = meta["settings"]
    dev = torch.cuda.get_device_name(0) if meta["device"].startswith("cuda") else \
        f"CPU ({meta['cpu']}, {meta['threads']} torch threads)"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["# GPTQ solve time per layer, Llama-7B layer shapes", "",
             f"Device: {dev}; torch {meta['torch']}; load average at the end {load}. w{s['bits']} "
             f"g{s['group_size']} {'sym' if s['sym'] else 'asym'}, blocksize {s['blocksize']}, act_order "
             f"{s['act_order']}, static_groups {s['static_groups']}; Hessian from {s['tokens']} random correlated "
             f"tokens (its accumulation is timed apart). Best of {s['repeat']}.", "",
             "Regenerate: `python " + " ".join(["experiments/bench_gptq.py", *sys.argv[1:]]) + "`", "",
             "| weight [out, in] | GPTQ solve s | Hessian accumulation s |", "|---|---|---|"]
    lines += [f"| {r['shape'][0]} x {r['shape'][1]} | {r['gptq_seconds']:.2f} | {r['hessian_seconds']:.2f} |"
              for r in meta["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
