"""Ahead-of-time compile of the Triton kernels for NVIDIA targets, on a machine without a GPU.

Triton's NVIDIA backend (bundled with the triton wheel, ptxas included) lowers every kernel config to PTX and a
cubin for sm_80 (A100) and sm_90 (H100) without a driver. This proves the kernels compile for the GPU (the
interpreter tests run the same source, not the compiler), and shows per config what decides speed before any GPU
run: registers per thread, stack (register spills), shared memory per CTA, and whether the dot became tensor-core
instructions (mma.sync on sm_80, wgmma on sm_90), the main loop's SASS size and the split-K atomics.
Writes results/triton_compile.{md,json}.

    python experiments/compile_kernels.py                 # every autotune config, sm_80 and sm_90
    python experiments/compile_kernels.py --archs 90 --kernels wq_prefill
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qresearch.kernels.aot import (  # noqa: E402
    SMEM_LIMIT,
    WQ_VARIANTS,
    compile_job,
    dequant_jobs,
    gemv_jobs,
    gptq_jobs,
    small_jobs,
    tool,
    w8a8_jobs,
    wq_jobs,
)

REPO = Path(__file__).resolve().parents[1]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Triton kernels compiled ahead of time for {', '.join(meta['archs'])}", "",
             ("**Compiled, not run**: Triton's NVIDIA backend (bundled ptxas "
              f"{meta['ptxas']}) lowered every autotune config to a cubin on a CPU-only machine; this proves the "
              "kernels compile for these GPUs and shows what the compiler made of each config. Speed is measured "
              "only on a lent GPU (results/gpu_*.md)."),
             "", f"- date: {meta['date']}, commit {meta['commit']}, triton {meta['triton']}",
             ("- regs = registers per thread (255 is the hardware cap); stack = bytes of local memory per thread, "
              "i.e. register spills (0 is the goal); shared = shared memory per CTA (limit 163 KiB sm_80, 227 KiB "
              "sm_90); tensor cores = the MMA instruction family in the PTX (mma.sync sm_80, wgmma sm_90; GEMV "
              "configs with BM=1 use none by design); loop = SASS instructions in the main loop (static; the issue "
              "cost of one step where a kernel is instruction-bound); split-K = the atomics of the one-kernel split-K "
              "reduction (acq_rel arrival count + counter reset), - without"),
             f"- reproduce: `python experiments/compile_kernels.py {meta['args']}`".rstrip(), "",
             "| kernel | weights | config | arch | regs | stack B | shared KiB | fits | tensor cores | loop "
             "| split-K |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sync = "+".join(a.split(".")[-2] for a in r.get("atomics", [])) or "-"
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['arch']} | {r['regs']} | "
                     f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | {'yes' if r['fits_smem'] else 'NO'} | "
                     f"{r['tensor_cores']} | {r.get('loop_instrs', '-')} | {sync} |")
    spill = sum(r["stack_bytes"] > 0 for r in rows)
    lines += ["", (f"{len(rows)} compiles; {spill} with spills; "
                   f"{sum(not r['fits_smem'] for r in rows)} over the shared-memory limit.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", type=int, default=[80, 90], choices=sorted(SMEM_LIMIT))
    kinds = ["wq_prefill", "wq_decode", "gemv", "small", "dequant", "w8a8", "gptq"]
    ap.add_argument("--kernels", nargs="+", default=kinds, choices=kinds)
    ap.add_argument("--variants", nargs="+", default=["w4 asym", "w3 asym", "w8 asym", "w4 asym act-order"],
                    choices=list(WQ_VARIANTS), help="weight variants for the prefill GEMM (decode: w4 asym)")
    ap.add_argument("--out", default=str(REPO / "results" / "triton_compile"))
    args = ap.parse_args()
    import triton

    jobs = []
    if "wq_prefill" in args.kernels:
        jobs += wq_jobs("wq_prefill", args.variants)
    if "wq_decode" in args.kernels:
        jobs += wq_jobs("wq_decode", ["w4 asym"])
    if "gemv" in args.kernels:
        jobs += gemv_jobs(["w4 asym"])
    if "small" in args.kernels:
        jobs += small_jobs(["w4 asym"])
    if "dequant" in args.kernels:
        jobs += dequant_jobs(args.variants)
    if "w8a8" in args.kernels:
        jobs += w8a8_jobs()
    if "gptq" in args.kernels:
        jobs += gptq_jobs()
    rows = []
    for arch in args.archs:
        for job in jobs:
            rows.append(compile_job(job, arch))
            r = rows[-1]
            print(f"{r['arch']} {r['kernel']:10s} {r['variant']:18s} {r['config']:34s} regs {r['regs']:3d} "
                  f"stack {r['stack_bytes']:5d} shared {r['shared_bytes']:6d} {r['tensor_cores']}", flush=True)
    ptxas = subprocess.run([str(tool("ptxas-blackwell")), "--version"], check=True, capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--", "qresearch/kernels"], check=False, cwd=REPO,
                      capture_output=True, text=True).stdout.strip():
        commit += " + uncommitted kernel changes"
    given = " ".join(a for a in sys.argv[1:] if not a.startswith("--out"))
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "triton": triton.__version__, "archs": [f"sm_{a}" for a in args.archs], "args": given,
            "ptxas": (re.findall(r"release ([\d.]+)", ptxas) or ["?"])[0]}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
