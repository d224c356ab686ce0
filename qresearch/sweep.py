"""Sweeps that say how they went, and SIGTERM handled like Ctrl-C.

SweepSummary (a Hydra callback, registered in conf/config.yaml) opens a record file when a multirun starts and
passes its path to the jobs (environment variable; launchers that start processes inherit it). Each job
appends its outcome (run.py: record()): started, then done / skipped / failed, with its run dir. When the
multirun ends the callback prints one line per job and a count, and exits non-zero if any job failed or never
finished (a job killed hard leaves only 'started').

SIGTERM (kill, a SLURM time limit) raises Terminated in the running job, so the runner writes failure.json as
it does for KeyboardInterrupt.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from .tracking.store import append_index, read_index, read_metrics

ENV = "QRESEARCH_SWEEP_RECORD"
FINAL = ("done", "skipped", "failed")


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so `except Exception` does not swallow it)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated("terminated by SIGTERM")


def install_sigterm() -> None:
    """Turn SIGTERM into Terminated in this process (main thread only, where Python runs signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def record(status: str, job: str, run_dir: str, detail: str = "") -> None:
    """Append a job's outcome to the sweep record, when this process runs inside a recorded multirun."""
    path = os.environ.get(ENV)
    if path:
        append_index(Path(path), {"status": status, "job": job, "run_dir": str(run_dir), "detail": detail,
                                  "pid": os.getpid(), "time": time.time()})


def earlier_complete(results: Path, chash: str) -> str:
    """Run dir of the complete run a skipped job found (newest with this config hash)."""
    for row in reversed(read_index(results / "runs" / "index.jsonl")):
        if row.get("config_hash") == chash and read_metrics(Path(row["run_dir"])) is not None:
            return row["run_dir"]
    return "?"


def outcomes(path: Path) -> dict[str, dict]:
    """Last record per job, in first-seen order; a job whose last record is 'started' is 'lost'."""
    last: dict[str, dict] = {}
    for r in read_index(path):
        last[r["job"]] = r
    return {j: (r if r["status"] in FINAL else {**r, "status": "lost", "detail": "started, never finished "
                                                 "(killed or crashed hard); no metrics.json"})
            for j, r in last.items()}


def summary_lines(path: Path) -> tuple[list[str], bool]:
    """Printable summary of a sweep record and whether every job ended done or skipped."""
    jobs = outcomes(path)
    counts = {s: sum(1 for r in jobs.values() if r["status"] == s) for s in FINAL + ("lost",)}
    head = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in FINAL)
    lines = [f"== sweep: {len(jobs)} jobs: {head}"]
    for job, r in jobs.items():
        lines.append(f"   {r['status']:<8} {job}  {r['run_dir']}" + (f"  ({r['detail']})" if r["detail"] else ""))
    return lines, counts["failed"] == counts["lost"] == 0


def print_summary(path: str | Path | None = None) -> bool:
    """Print the summary of the current (or given) sweep record; returns True when nothing failed."""
    path = path or os.environ.get(ENV)
    if not path or not Path(path).is_file():
        return True
    lines, ok = summary_lines(Path(path))
    print("\n".join(lines), flush=True)
    return ok


try:
    from hydra.experimental.callback import Callback
except ImportError:  # hydra is a dependency of run.py only
    Callback = object


class SweepSummary(Callback):
    """Hydra callback: a record file per multirun, a summary at its end, exit status 1 when a job failed."""

    def on_multirun_start(self, config, **kwargs) -> None:
        folder = Path(config.paths.results) / "runs" / ".sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
        path.touch()
        os.environ[ENV] = str(path)

    def on_multirun_end(self, config, **kwargs) -> None:
        ok = print_summary()
        os.environ.pop(ENV, None)
        if not ok:
            print("error: some runs of the sweep failed (summary above)", file=sys.stderr, flush=True)
            raise SystemExit(1)  # not an Exception: Hydra's callback wrapper lets it through
