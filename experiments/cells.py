"""A table cell is one `python run.py ... out_dir=<cell folder>` run: resumable (a folder that holds metrics.json is
read, not rerun) and run with skip_done=false, so an identical finished run elsewhere in the results index cannot
stand in for the cell and leave its folder empty."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cell(out: Path, cmd: list[str], label: str, collect_only: bool = False, one_thread: bool = False,
             record_load: bool = False) -> dict | None:
    """metrics.json of the cell in `out`, running `cmd` first when it is missing (None: failed or collect_only).
    one_thread: OMP_NUM_THREADS=1 (tables that state one torch thread per run); record_load: the 1-minute load
    average before / after the run into out/load.json."""
    if not (out / "metrics.json").is_file():
        if collect_only:
            return None
        cmd = [*cmd, "skip_done=false"]
        print("$", shlex.join(cmd), flush=True)
        env = {**os.environ, "WANDB_MODE": "disabled", **({"OMP_NUM_THREADS": "1"} if one_thread else {})}
        load = os.getloadavg()[0]
        r = subprocess.run(cmd, cwd=REPO, env=env)
        if record_load and out.is_dir():
            (out / "load.json").write_text(json.dumps({"before": load, "after": os.getloadavg()[0]}))
        if r.returncode != 0:
            print(f"FAILED ({r.returncode}): {label}", flush=True)
            return None
    return json.loads((out / "metrics.json").read_text())


def table_parser(models, axis: str, choices, notes: bool = True) -> argparse.ArgumentParser:
    """--models, --<axis> (rows / sections), --collect-only and optionally --notes: the options every table shares."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(models), choices=list(models))
    ap.add_argument(f"--{axis}", nargs="+", default=list(choices), choices=list(choices))
    ap.add_argument("--collect-only", action="store_true", help="only tabulate runs that already finished")
    if notes:
        ap.add_argument("--notes", type=Path, help="markdown file with findings / scope notes, put under the header")
    return ap
