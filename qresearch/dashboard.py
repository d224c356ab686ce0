"""Dashboards as code: a wandb report for the finished runs of one project (and group), built from the results index.

    python -m qresearch.dashboard --project qresearch [--group stories260k] [--mode online|offline] [--out F.json]

Per model and evaluation protocol (a section, its run sets filtered on both): perplexity vs bits per weight and vs
decode latency, lm-eval accuracy vs bits (one colour per method; runs on the Pareto frontier in full colour, the
others pale; the frontier is also listed in the section text), a runs table with the key config columns, and the
per-layer error tables. The spec (JSON) is written in every mode; `--mode online` (default: $WANDB_MODE) saves the
report with the `wandb-workspaces` package (`pip install "qresearch[dashboard]"`) and needs wandb credentials.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ROOT
from .tracking.metrics import Metrics
from .tracking.runs import FinishedRun, finished_runs
from .tracking.wandb_logger import flatten

# wandb keys the panels read: the runner logs metrics.json flattened with dots as the run summary
K_MODEL, K_METHOD, K_TAG, K_SIG = "run.model", "run.method", "run.tag", "run.eval_signature"
K_BPW = "footprint.bits_per_weight"
K_LATENCY = "latency.decode.1.ms_per_step"  # batch-1 decode ms per token (eval.latency)
COLUMNS = {  # runs table: label -> summary key
    "method": K_METHOD, "tag": K_TAG, "bits": "run.bits", "group": "run.group_size", "format": "run.qformat",
    "act bits": "run.act_bits", "calibration size": "run.calib_samples", "seed": "run.seed",
    "commit": "run.commit", "bits/weight": K_BPW, "MiB": "footprint.weight_bytes",
}
LAYER_TABLE = "layers"  # the per-layer error table the runner logs (wandb.Table)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def ppl_key(dataset: str) -> str:
    return f"ppl.{dataset}.ppl"


def acc_key(task: str) -> str:
    return f"lm_eval.tasks.{task}.acc"


def pale(color: str, keep: float = 0.35) -> str:
    """`color` mixed with white (keep = share of the colour): off-frontier runs."""
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - (255 - c) * keep):02x}" for c in rgb)


def pareto_front(points: list[tuple[float, float]], maximize_y: bool = False) -> list[int]:
    """Indices of the points no other point beats: lower x and lower y (higher y with maximize_y), sorted by x.
    A point equal to another in both is kept once (the first)."""
    sign = -1.0 if maximize_y else 1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], sign * points[i][1], i))
    front, best = [], float("inf")
    for i in order:
        y = sign * points[i][1]
        if y < best:
            front.append(i)
            best = y
    return front


@dataclass
class Grid:
    """Panels over the section's runs with one colouring: the frontier of (x, y) in full colour."""

    title: str
    question: str  # what the grid answers (the README lists the same)
    x: str
    y: str
    maximize_y: bool
    frontier: list[str]  # run ids on the frontier, by x
    colors: dict[str, str]  # run id -> colour
    panels: list[dict] = field(default_factory=list)


@dataclass
class Section:
    model: str
    protocol: str  # the runs' eval signature
    filters: list[dict]  # {key, op, value}: the section's run sets select these runs (plus their method)
    methods: dict[str, str]  # method -> colour
    runs: list[dict]  # id, name, method, tag, run_dir (relative to the results root)
    grids: list[Grid]
    tables: list[dict]  # runs table + per-layer tables


@dataclass
class DashboardSpec:
    title: str
    project: str
    entity: str | None
    group: str | None
    columns: dict[str, str]
    sections: list[Section]
    skipped: list[str]  # finished runs left out, with why
    uploaded: bool = False
    url: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _xy(m: Metrics, key: str) -> float | None:
    """The number under summary key `key` for this run: the record flattened exactly as the logger sends it."""
    v = flatten(m.to_dict()).get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _grid(runs: list[Metrics], methods: dict[str, str], title: str, question: str, x: str, y: str,
          maximize_y: bool = False, log_y: bool = True) -> Grid | None:
    """One scatter grid; None when no run has both numbers."""
    pts = [(m, _xy(m, x), _xy(m, y)) for m in runs]
    pts = [(m, a, b) for m, a, b in pts if a is not None and b is not None]
    if not pts:
        return None
    front = [pts[i][0].wandb_run.id for i in pareto_front([(a, b) for _, a, b in pts], maximize_y)]
    colors = {m.wandb_run.id: methods[m.run.method] if m.wandb_run.id in front else pale(methods[m.run.method])
              for m, _, _ in pts}
    panel = {"type": "scatter", "title": title, "x": f"summary:{x}", "y": f"summary:{y}", "log_y": log_y}
    return Grid(title, question, x, y, maximize_y, front, colors, [panel])


def _grids(runs: list[Metrics], methods: dict[str, str]) -> list[Grid]:
    datasets = sorted({ds for m in runs for ds in m.ppl}, key=lambda d: (d != "wikitext2", d))
    tasks = sorted({t for m in runs for t in (m.lm_eval or {}).get("tasks", {})})
    grids = [_grid(runs, methods, f"{ds} perplexity vs bits per weight",
                   "Which method gives the lowest perplexity at a given storage cost?", K_BPW, ppl_key(ds))
             for ds in datasets]
    if datasets:
        grids.append(_grid(runs, methods, f"{datasets[0]} perplexity vs decode latency (batch 1)",
                           "Which method gives the lowest perplexity at a given decode speed?", K_LATENCY,
                           ppl_key(datasets[0])))
    grids += [_grid(runs, methods, f"lm-eval {t} accuracy vs bits per weight",
                    "Which method keeps the most task accuracy at a given storage cost?", K_BPW, acc_key(t), True, False)
              for t in tasks]
    return [g for g in grids if g is not None]


def _section(model: str, protocol: str, runs: list[FinishedRun], results: Path, group: str | None) -> Section:
    ms = [r.metrics for r in runs]
    methods = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted({m.run.method for m in ms}))}
    filters = [{"key": f"summary:{K_MODEL}", "op": "==", "value": model},
               {"key": f"summary:{K_SIG}", "op": "==", "value": protocol}]
    if group is not None:
        filters.append({"key": "run:group", "op": "==", "value": group})
    rows = [{"id": r.metrics.wandb_run.id, "name": r.metrics.wandb_run.name, "method": r.metrics.run.method,
             "tag": r.metrics.run.tag, "run_dir": _rel(r.run_dir, results)} for r in runs]
    tables = [{"type": "runs_table", "title": "runs", "columns": [f"summary:{k}" for k in COLUMNS.values()],
               "question": "What exactly ran: method, bits, group, format, activation bits, calibration size, "
                           "seed and commit of every run?"},
              {"type": "summary_table", "title": "per-layer errors", "table": LAYER_TABLE,
               "question": "Which layers lose the most (output and weight error per linear)?"}]
    return Section(model, protocol, filters, methods, rows, _grids(ms, methods), tables)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return Path(path).name


def build_spec(results: Path, project: str, group: str | None = None, entity: str | None = None) -> DashboardSpec:
    """The report spec for the finished runs of wandb project `project` (and group) in the results index."""
    chosen, skipped = defaultdict(list), []
    for r in finished_runs(results):
        w = r.metrics.wandb_run
        if w is None:
            skipped.append(f"{_rel(r.run_dir, results)}: not logged to wandb (wandb: {r.metrics.wandb})")
        elif w.project != project or (group is not None and w.group != group):
            continue
        else:
            chosen[(r.metrics.run.model, r.metrics.run.eval_signature or r.metrics.eval_signature())].append(r)
    if not chosen:
        raise SystemExit(f"no finished run of wandb project {project!r}" + (f", group {group!r}" if group else "") +
                         f" in {Path(results) / 'runs' / 'index.jsonl'}")
    sections = [_section(m, sig, chosen[(m, sig)], results, group) for m, sig in sorted(chosen)]
    title = f"qresearch: {project}" + (f" / {group}" if group else "")
    return DashboardSpec(title, project, entity, group, dict(COLUMNS), sections, skipped)


def referenced_keys(spec: DashboardSpec) -> set[str]:
    """Every summary key the dashboard reads (tests check them against what a run logs)."""
    keys = {f["key"].split(":", 1)[1] for s in spec.sections for f in s.filters if f["key"].startswith("summary:")}
    keys |= set(spec.columns.values()) | {K_METHOD}
    for s in spec.sections:
        for g in s.grids:
            keys |= {g.x, g.y}
    return keys


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", required=True, help="wandb project the runs were logged to (logger.project)")
    ap.add_argument("--group", help="only runs of this wandb group (logger.group; default: the model name)")
    ap.add_argument("--entity", help="wandb entity (online; default: the API key's default entity)")
    ap.add_argument("--results", type=Path, default=Path(os.environ.get("QRESEARCH_RESULTS", ROOT / "results")))
    ap.add_argument("--mode", choices=["online", "offline"],
                    default="online" if os.environ.get("WANDB_MODE") == "online" else "offline")
    ap.add_argument("--out", type=Path, help="spec JSON (default: <results>/dashboards/<project>[-<group>].json)")
    a = ap.parse_args(argv)
    spec = build_spec(a.results, a.project, a.group, a.entity)
    from .dashboard_wandb import default_entity, save_report, to_report

    if a.mode == "online":
        spec.url, spec.uploaded = save_report(to_report(spec, spec.entity or default_entity())), True
    out = a.out or a.results / "dashboards" / f"{a.project}{'-' + a.group if a.group else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    n = sum(len(s.runs) for s in spec.sections)
    print(f"dashboard spec: {out} ({len(spec.sections)} sections, {n} runs, {len(spec.skipped)} runs skipped)")
    if spec.uploaded:
        print(f"saved to wandb: {spec.url}")
    else:
        to_report(spec, spec.entity or "ENTITY", validate_only=True)
        print("not uploaded (mode offline): run with --mode online (or WANDB_MODE=online) and wandb credentials "
              "to save it")


if __name__ == "__main__":
    main()
