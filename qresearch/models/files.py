"""Cheap checks of a local model folder before anything loads: config.json parses, weights are whole safetensors.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor -> dtype, shape, data
offsets) and the data; a file cut short is detected from the header alone (its size is less than the header
says), without reading the tensors.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import ConfigError

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def read_config(folder: str | Path, what: str) -> dict:
    """config.json of a model folder as a dict with a model_type (one-line ConfigError otherwise)."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise ConfigError(f"{what}: {folder} has no config.json; it is not a Hugging Face model folder")
    try:
        cfg = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        why = "empty" if f.stat().st_size == 0 else f"not valid JSON ({str(e).splitlines()[0]})"
        raise ConfigError(f"{what}: {f} is {why}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise ConfigError(f"{what}: {f} has no model_type; it is not a Hugging Face model config")
    return cfg


def safetensors_header(path: str | Path, what: str) -> dict:
    """The JSON header of a safetensors file after checking the file holds all the bytes it declares."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise ConfigError(f"{what}: {path} is not a safetensors file or is truncated ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ConfigError(f"{what}: {path} has a damaged safetensors header") from None
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ConfigError(f"{what}: {path} is truncated ({size} bytes, its header declares {need})")
    return header


def check_weights(folder: str | Path, what: str) -> list[Path]:
    """The safetensors weight files of a model folder (single file or sharded index), each checked whole."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{what}: {index} is damaged (no weight_map)") from None
        files = [folder / s for s in shards]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ConfigError(f"{what}: shard(s) listed in {index.name} are missing: {', '.join(missing[:3])}")
    else:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(other[:3])}: pickled weights are not loaded; convert them to safetensors)" \
            if other else ""
        raise ConfigError(f"{what}: {folder} has no model.safetensors (or model.safetensors.index.json){hint}")
    for p in files:
        safetensors_header(p, what)
    return files


def check_gguf(path: str | Path, what: str) -> None:
    """A GGUF file starts with the magic b'GGUF'."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{what}: {path} is not a GGUF file (bad magic bytes)")
