"""Finished runs of a results root, as typed records: the index names the run dirs, metrics.json holds the numbers.
Dashboards and reproduction checks read runs through here (never metrics.json by loose keys)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .metrics import Metrics
from .store import read_index

log = logging.getLogger(__name__)


@dataclass
class FinishedRun:
    run_dir: Path
    metrics: Metrics
    config: dict | None = None  # the run's config.yaml (resolved), when present


def _config(run_dir: Path) -> dict | None:
    f = run_dir / "config.yaml"
    if not f.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(f), resolve=False)


def finished_runs(results: Path | str) -> list[FinishedRun]:
    """One run per config hash (the newest complete one) from <results>/runs/index.jsonl, in index order.
    A run dir whose metrics.json is gone or unreadable is skipped and logged."""
    best: dict[str, FinishedRun] = {}
    for row in read_index(Path(results) / "runs" / "index.jsonl"):
        run_dir = Path(row["run_dir"])
        f = run_dir / "metrics.json"
        if not f.is_file():
            continue
        try:
            m = Metrics.from_dict(json.loads(f.read_text()), str(f))
        except ValueError as e:
            log.warning("skipping %s: %s", run_dir, e)
            continue
        old = best.get(m.run.config_hash)
        if old is None or m.run.time >= old.metrics.run.time:
            best[m.run.config_hash] = FinishedRun(run_dir, m, _config(run_dir))
    return list(best.values())
