"""A deterministic safetensors writer: the same tensors and metadata give the same bytes in every process.

safetensors' own writer keeps `__metadata__` in a hash map, so with two or more metadata keys the header order
changes from process to process and a checksum cannot prove a reproduction. Here the header is written with
sorted keys; the data are laid out the way safetensors lays them out (larger element size first, then by name,
so every tensor is aligned), and the file is an ordinary safetensors file (read back with safetensors' own
reader in the tests).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared tensor (tied weights; the first name in sorted order); returns the kept tensors
    and {dropped name: kept name} (stored in the metadata, as safetensors.torch.save_model does)."""
    kept, alias, seen = {}, {}, {}
    for name in sorted(state):
        t = state[name]
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            alias[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t
    return kept, alias


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (CPU copies are taken) with string `metadata` to `path` atomically."""
    bad = [k for k, v in tensors.items() if v.dtype not in DTYPES]
    if bad:
        raise TypeError(f"dtype not supported by the writer: {bad[:3]}")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}} if metadata else {}
    blobs, offset = [], 0
    for name in order:
        t = tensors[name].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # raw little-endian bytes
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # pad so the data start 8-byte aligned
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)
