"""Section 1: the environment (device, driver, CUDA, versions, commit) and the two measured ceilings."""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from experiments import bench_kernels as bk  # copy_bandwidth, cpu_name
from qresearch.eval.latency import timed  # LIBRARY: event timing

from .common import Ctx

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_commit() -> dict:
    """Commit and dirty flag: $QRESEARCH_COMMIT when set (a device copy's .git can be a stale snapshot: it once
    reported an older commit +dirty), else git."""
    env = os.environ.get("QRESEARCH_COMMIT")
    if env:
        return {"commit": env, "dirty": env.endswith("+dirty"), "commit_source": "QRESEARCH_COMMIT"}
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if sha:
        dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
        return {"commit": sha + ("+dirty" if dirty else ""), "dirty": dirty, "commit_source": "git"}
    return {"commit": "unknown", "dirty": None, "commit_source": "no .git here and QRESEARCH_COMMIT unset"}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {bk.cpu_name()}"


def slug(device: torch.device, quick: bool) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")
    return ("quick_" if quick else "") + s


SMI_FIELDS = ("driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit",
              "temperature.gpu")


def nvidia_smi() -> dict:
    """Driver, clocks, power limit from nvidia-smi (field by field if one is unknown to this driver)."""
    both = _run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"])
    if both:
        return dict(zip(SMI_FIELDS, (v.strip() for v in both.splitlines()[0].split(","))))
    out = {}
    for f in SMI_FIELDS:
        v = _run(["nvidia-smi", f"--query-gpu={f}", "--format=csv,noheader"])
        if v:
            out[f] = v.splitlines()[0].strip()
    return out or {"nvidia_smi": "not available"}


def versions() -> dict:
    import transformers
    import triton

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
            # the kernel paths packed layers take per call (defaults: the library's auto choices)
            **{name.lower(): os.environ.get(name, default) for name, default in PATH_ENV.items()}}


PATH_ENV = {"QRESEARCH_SMALL_M": "auto", "QRESEARCH_PREFILL": "auto", "QRESEARCH_GEMV_MAGIC": "1",
            "QRESEARCH_ACT_ORDER": "permute"}  # LIBRARY: per-call kernel path switches and their defaults


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    t = statistics.median(timed(lambda: a @ b, device, repeats, 2))
    return 2 * n**3 / t / 1e12


def run(ctx: Ctx, state: dict) -> None:
    d = ctx.device
    state.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device_name(d),
                 **git_commit(), **versions(), cpu=bk.cpu_name(), cpu_count=os.cpu_count(),
                 load_avg=[round(x, 2) for x in os.getloadavg()])
    if ctx.gpu:
        p = torch.cuda.get_device_properties(d)
        state.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                     memory_gib=round(p.total_memory / 2**30, 1),
                     l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), **nvidia_smi())
    ctx.copy_bw = bk.copy_bandwidth(d, 1024 if ctx.gpu else 64, 20 if ctx.gpu else 3)
    state["copy_bw_gbs"] = ctx.copy_bw / 1e9
    n, dt = (8192, torch.float16) if ctx.gpu else (256, torch.float32)
    state["matmul_tflops"] = matmul_tflops(d, n, dt, 10 if ctx.gpu else 2)
    state["matmul_desc"] = f"{n}^3 {str(dt).removeprefix('torch.')} torch.matmul, random data, median of repeats"
