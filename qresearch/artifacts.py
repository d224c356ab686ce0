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


BITS_PREFIX = "bits."  # a per-layer bit-width map stored as artifacts: bits.<layer> = int tensor [1]


def bits_map_artifacts(bits: dict[str, int]) -> dict[str, torch.Tensor]:
    """{layer: bits} as artifact tensors (saved with the run, reloadable as a bits map)."""
    return {f"{BITS_PREFIX}{k}": torch.tensor([int(v)], dtype=torch.int32) for k, v in bits.items()}


def bits_map_from_artifacts(artifacts: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k[len(BITS_PREFIX):]: int(v.reshape(-1)[0]) for k, v in artifacts.items() if k.startswith(BITS_PREFIX)}


def load_bits_map(path: str | Path) -> dict[str, int]:
    """A per-layer bits map from a run's artifacts.safetensors (bits.<layer>) or a JSON file {layer: bits} (or
    {"bits": {layer: bits}, ...})."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"bits_map={path} does not exist; allowed: a .json {{layer: bits}}, a run's "
                          f"artifacts.safetensors, or 'prior'")
    if p.suffix == ".json":
        raw = json.loads(p.read_text())
        raw = raw.get("bits", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
            raise ConfigError(f"bits_map={path}: expected {{layer: int bits}}")
        return {str(k): int(v) for k, v in raw.items()}
    found = bits_map_from_artifacts(load_artifacts(p))
    if not found:
        raise ConfigError(f"bits_map={path} holds no {BITS_PREFIX}<layer> artifacts (was it written by a "
                          f"method=mixed_* run?)")
    return found
