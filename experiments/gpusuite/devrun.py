"""Scaffolding shared by the GPU-only experiment scripts (tune_small_m.py, profile_small_m.py): a run's provenance,
its report header, and a writer of <stem>_<device>.json / .md called after every step."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from experiments import bench_kernels as bk

from . import env


def run_info(device: torch.device, script: str, argv: list[str] | None, **extra) -> dict:
    """Device, versions, date, commit, the command line and the measured copy bandwidth (GB/s) of this run."""
    import transformers
    import triton

    return {"device": env.device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "commit": env.git_commit()["commit"],
            "command": f"python experiments/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "copy_bw_gbs": bk.copy_bandwidth(device, 1024, 10) / 1e9, **extra}


def header(title: str, state: dict) -> list[str]:
    """Markdown title and the provenance lines of `state` (its info, budget and seconds used)."""
    info = state["info"]
    tools = f"; profilers on the machine: {info['tools']}" if "tools" in info else ""
    return [f"# {title} on {info.get('device')}", "",
            f"- commit {info.get('commit')}, torch {info.get('torch')}, triton {info.get('triton')}, "
            f"transformers {info.get('transformers')}, {info.get('date')}",
            f"- measured copy bandwidth {info.get('copy_bw_gbs', float('nan')):.0f} GB/s (read + write){tools}",
            f"- command: `{info.get('command')}`; budget {state['budget_s']:.0f} s, "
            f"used {state.get('used_s', 0):.0f} s", ""]


def saver(out: str | Path, stem: str, device: torch.device, state: dict, markdown, t0: float):
    """A function that writes state as <out>/<stem>_<device slug>.json and its markdown(state) beside it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{stem}_{env.slug(device, False)}"

    def save() -> None:
        state["used_s"] = time.perf_counter() - t0
        base.with_suffix(".json").write_text(json.dumps(state, indent=1, default=str))
        base.with_suffix(".md").write_text(markdown(state))

    return save
