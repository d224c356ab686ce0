"""W8A8 packed layers on CPU: our VNNI kernel on the stored codes (c_vnni) vs torch._int_mm on a kept int8 copy
(torch_int_mm), side by side in one run, with the dense fp32 matmul for scale. Writes results/bench_int8_cpu.md.

    python experiments/bench_int8_cpu.py [--shapes 4096x4096 ...] [--m 1 4 16 ...] [--repeats 7] [--out PATH]

Per (shape, M): ms per call of one QuantLinear (RTN w8 per-channel sym, dynamic per-token int8 activations, fp32
activations) through
  torch_int_mm   the previous CPU kernel: torch._int_mm on an int8 copy of the weight made at the first call and kept
  c_vnni C       ours: AVX512-VNNI vpdpbusd on the stored unsigned codes (csrc/int8_cpu.c), nothing kept
  c_vnni panels  ours from cpu_int8.VNNI_MAX_M rows: 4 MiB of weight rows at a time made signed (one xor pass into
                 a reused buffer), each through torch._int_mm
and F.linear on the dense fp32 weight. The same module instance serves all three paths (outputs checked equal bit
for bit); timings alternate between paths within each repeat (median of --repeats), so load drifts hit all alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.bench_kernels import build, commit_label, cpu_detail  # noqa: E402
from qresearch.kernels import cpu_int8  # noqa: E402

SHAPES = ("4096x4096", "11008x4096", "4096x11008")
MS = (1, 4, 16, 32, 64, 128, 256)
DEFAULT_MAX_M = cpu_int8.VNNI_MAX_M


def paths(mod, w):
    """name -> callable(x): the kernels' own run functions on one module's buffers (what its forward calls after
    the registry's cached choice), and the dense matmul."""
    from qresearch.kernels import dispatch
    from qresearch.nn.packed import KERNEL_BUFFERS

    bufs = {k: mod._buffers[k] for k in KERNEL_BUFFERS}

    def vnni(cap):
        def run(x):
            cpu_int8.VNNI_MAX_M = cap  # a module attribute read per call: C path below it, panels from it
            try:
                return dispatch._run_vnni(x, mod.meta, bufs, mod.mode)
            finally:
                cpu_int8.VNNI_MAX_M = DEFAULT_MAX_M
        return run
    return {"torch_int_mm": lambda x: dispatch._run_int_mm(x, mod.meta, bufs, mod.mode), "c_vnni C": vnni(1 << 30),
            "c_vnni panels": vnni(0), "dense fp32": lambda x: F.linear(x, w)}


def bench(shape: str, ms, repeats: int) -> list[dict]:
    out_f, in_f = map(int, shape.split("x"))
    mod = build("w8a8", out_f, in_f, torch.device("cpu"), torch.float32)
    w = torch.randn(out_f, in_f) * 0.02
    fns, rows = paths(mod, w), []
    for m in ms:
        x = torch.randn(m, in_f)
        outs = {k: fn(x) for k, fn in fns.items()}  # warm: builds, the int8 copy, caches
        same = torch.equal(outs["torch_int_mm"], outs["c_vnni C"]) and torch.equal(outs["c_vnni C"],
                                                                                   outs["c_vnni panels"])
        times = {k: [] for k in fns}
        with torch.no_grad():
            for _ in range(repeats):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn(x)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append({"shape": shape, "M": m, **{f"{k} ms": v for k, v in med.items()}, "identical": same,
                     "default": "c_vnni C" if m < cpu_int8.VNNI_MAX_M else "c_vnni panels"})
    return rows


def markdown(rows, meta) -> str:
    keys = ("torch_int_mm", "c_vnni C", "c_vnni panels", "dense fp32")
    lines = [f"# W8A8 packed layers on CPU: VNNI on the stored codes vs torch._int_mm ({meta['machine']})", "",
             "Per (shape, M): ms per call of one W8A8 QuantLinear (RTN w8 per-channel sym, dynamic per-token int8 "
             "activations, fp32 activations) through each kernel path, beside the dense fp32 matmul:", "",
             "- torch_int_mm: torch._int_mm on an int8 copy of the weight made at the first call and kept",
             "- c_vnni C: ours, AVX512-VNNI vpdpbusd on the stored unsigned codes (csrc/int8_cpu.c), nothing kept",
             "- c_vnni panels: ours for long calls, 4 MiB of weight rows at a time made signed in a reused buffer, "
             "each through torch._int_mm", "",
             "One module serves every path (outputs compared bit for bit: identical); the paths alternate within "
             "each repeat, so load drifts hit all alike.", "",
             f"- machine: {meta['machine']}, {meta['threads']} torch threads; load average at start "
             f"{meta['load_start']:.2f}, at end {meta['load_end']:.2f}; {meta['repeats']} repeats, median",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}, commit {meta['commit']}, "
             f"torch {torch.__version__}",
             f"- held beside the stored codes: torch_int_mm keeps out x in bytes (the int8 copy); c_vnni nothing "
             f"(its panels path reuses one 4 MiB buffer per thread for every layer); default: c_vnni C below "
             f"VNNI_MAX_M = {cpu_int8.VNNI_MAX_M} rows, its panels from there", "",
             "| shape (out x in) | M | " + " | ".join(f"{k} ms" for k in keys) +
             " | torch_int_mm / default | identical |", "|---|---|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = [f"{r[f'{k} ms']:.3f}" + (" *" if k == r["default"] else "") for k in keys]
        lines.append(f"| {r['shape']} | {r['M']} | " + " | ".join(cells) +
                     f" | {r['torch_int_mm ms'] / r[r['default'] + ' ms']:.2f}x | {'yes' if r['identical'] else 'NO'} |")
    lines += ["", "`*` = the path a W8A8 layer takes at that M (c_vnni_w8a8 on CPUs with AVX512-VNNI)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--m", nargs="+", type=int, default=list(MS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_int8_cpu.md"))
    args = ap.parse_args(argv)
    if cpu_int8.load()[0] is None:
        raise SystemExit(f"c_vnni cannot run here: {cpu_int8.load()[1]}")
    meta = {"machine": cpu_detail(), "threads": torch.get_num_threads(), "load_start": os.getloadavg()[0],
            "repeats": args.repeats, "command": "python experiments/bench_int8_cpu.py " + " ".join(argv or sys.argv[1:]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit_label()}
    rows = [r for s in args.shapes for r in bench(s, args.m, args.repeats)]
    meta["load_end"] = os.getloadavg()[0]
    out = Path(args.out)
    out.write_text(markdown(rows, meta))
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
