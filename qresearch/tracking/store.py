"""Local results store: atomic files in a run dir, plus one index row per run."""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from .metrics import Metrics

log = logging.getLogger(__name__)


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


# where/how a run is written, not what it computes; the top-level quantization knobs act only through the method
# steps they interpolate into (so fp16 at bits=3 and bits=4 is one config)
HASH_EXCLUDE = ("out_dir", "paths", "logger", "skip_done", "bits", "group_size", "sym", "qformat", "act_bits",
                "scale_bits", "scale_level2", "bits_map")


HASH_DEFAULTS = {"fuse": False}  # keys added later: left out of the hash at their default (earlier runs keep theirs)


def hashed(cfg: dict, exclude: tuple[str, ...] = HASH_EXCLUDE) -> dict:
    """The settings a run's config hash covers."""
    return {k: v for k, v in cfg.items() if k not in exclude and not (k in HASH_DEFAULTS and v == HASH_DEFAULTS[k])}


def config_hash(cfg: dict) -> str:
    """Hash of the settings that define a run (not where it writes)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def append_index(index: Path, row: dict) -> None:
    """Append one JSON line to the results index under a file lock (parallel sweeps share it)."""
    index = Path(index)
    index.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_clean(row), sort_keys=True) + "\n"
    with open(index, "ab+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # a writer killed mid-line left no newline: end that line so this row stays whole
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode())
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def read_index(index: Path) -> list[dict]:
    """Rows of the results index; a damaged line (truncated, not a JSON object with a run_dir) is skipped with a
    warning naming the file and line, so one bad line never blocks resume or reports."""
    index = Path(index)
    if not index.is_file():
        return []
    rows = []
    for i, ln in enumerate(index.read_text(errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            row = e
        if not isinstance(row, dict) or not isinstance(row.get("run_dir"), str):
            log.warning("%s line %d is damaged (%s); skipped", index, i,
                        row.msg if isinstance(row, json.JSONDecodeError) else "not a run row")
            continue
        rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> dict | None:
    """metrics.json of a run dir, or None when absent; a damaged file (not JSON, not a run record) counts as absent
    and is reported with its path, so its config can be rerun."""
    f = Path(run_dir) / "metrics.json"
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
        Metrics.from_dict(m, str(f))  # a complete, typed run record
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("%s is damaged (%s); the run counts as not complete", f, str(e).splitlines()[0][:200])
        return None
    return m


def completed_run(index: Path, chash: str) -> Path | None:
    """Run dir of an earlier complete run (a readable metrics.json) with the same config hash, if any."""
    for row in reversed(read_index(index)):
        d = Path(row["run_dir"])
        if row.get("config_hash") == chash and read_metrics(d) is not None:
            return d
    return None
