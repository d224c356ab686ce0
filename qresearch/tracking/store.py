"""Local results store: atomic files in a run dir, plus one index row per run."""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(obj: Any) -> Any:
    """JSON-safe copy: tensors/numpy scalars to Python numbers; non-finite floats are refused."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"refusing to write a non-finite number ({obj}) into results")
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temp file + rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, sort_keys=False))
    os.replace(tmp, path)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Per-layer table; columns are the union of keys in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows])
    os.replace(tmp, path)


def config_hash(cfg: dict) -> str:
    """Hash of the settings that define a run (not where it writes)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def append_index(index: Path, row: dict) -> None:
    """Append one JSON line to the results index under a file lock (parallel sweeps share it)."""
    index = Path(index)
    index.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_clean(row), sort_keys=True) + "\n"
    with open(index, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)
        fcntl.flock(f, fcntl.LOCK_UN)


def read_index(index: Path) -> list[dict]:
    index = Path(index)
    if not index.is_file():
        return []
    return [json.loads(ln) for ln in index.read_text().splitlines() if ln.strip()]


def completed_run(index: Path, chash: str) -> Path | None:
    """Run dir of an earlier complete run (metrics.json present) with the same config hash, if any."""
    for row in reversed(read_index(index)):
        d = Path(row["run_dir"])
        if row.get("config_hash") == chash and (d / "metrics.json").is_file():
            return d
    return None
