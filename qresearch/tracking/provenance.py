"""Provenance: code version, library versions, device, so every number can be traced."""
from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "hydra-core", "lm_eval", "triton", "wandb", "gguf")
REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def provenance(device: torch.device, seed: int) -> dict:
    """Commit, dirty flag (tracked changes outside results/: tables a script is writing are outputs, not code),
    library versions, device, seed."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
    return {"git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions(),
            **device_info(device), "seed": seed}


def commit_label(prov: dict) -> str | None:
    """'<commit>' or '<commit>+dirty' from a provenance dict (None outside a git checkout)."""
    if not prov.get("git_commit"):
        return None
    return prov["git_commit"] + ("+dirty" if prov.get("git_dirty") else "")
