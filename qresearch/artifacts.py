"""Searched artifacts (AWQ scales and clips, SmoothQuant maxima, ...) as flat safetensors files.
Nothing is unpickled on load."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ConfigError


def save_artifacts(path: str | Path, artifacts: dict[str, torch.Tensor]) -> None:
    """Write {name: tensor} atomically (temp file + rename)."""
    from safetensors.torch import save_file

    bad = [k for k, v in artifacts.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"artifacts must be a flat dict of tensors; not tensors: {bad[:5]}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(artifacts.items())}, str(tmp))
    os.replace(tmp, path)


def load_artifacts(path: str | Path) -> dict[str, torch.Tensor]:
    """Artifacts saved by an earlier run (its run dir's artifacts.safetensors)."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ConfigError(f"artifacts file {path} does not exist; point to a run dir's artifacts.safetensors")
    return load_file(str(path))
