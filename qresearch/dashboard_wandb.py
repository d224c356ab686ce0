"""The dashboard spec (qresearch.dashboard) as wandb-workspaces report objects, and saving them.

One run set per method in every panel grid (its runs coloured by the grid's frontier colouring), each run set
filtered on the section's model and protocol (and group) plus its method; scatter panels read summary keys.
"""
from __future__ import annotations

from .dashboard import DashboardSpec, Grid, Section
from .errors import ConfigError

INSTALL = 'pip install "qresearch[dashboard]" (the wandb-workspaces package)'


def _api():
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError:
        return None, None
    return wr, expr


def _filter(expr, f: dict):
    section, name = f["key"].split(":", 1)
    metric = {"summary": expr.Summary, "config": expr.Config}.get(section)
    if section == "run" and name == "group":
        key = expr.Metric("Group")
    elif metric is not None:
        key = metric(name)
    else:
        raise ValueError(f"dashboard filter key {f['key']!r}: allowed sections summary:, config:, run:group")
    if f["op"] != "==":
        raise ValueError(f"dashboard filter op {f['op']!r}: allowed ==")
    return key == f["value"]


def _runsets(wr, expr, spec: DashboardSpec, entity: str, s: Section, colors: dict[str, str], columns: list[str] | None = None):
    """One run set per method of the section; its runs coloured by `colors` (run id -> colour)."""
    out = []
    for method in s.methods:
        ids = [r["id"] for r in s.runs if r["method"] == method]
        filters = [_filter(expr, f) for f in s.filters] + [expr.Summary("run.method") == method]
        settings = {i: wr.RunSettings(color=colors.get(i, s.methods[method])) for i in ids}
        out.append(wr.Runset(entity=entity, project=spec.project, name=method, filters=expr.And(*filters),
                             run_settings=settings, pinned_columns=columns or []))
    return out


def _frontier_text(s: Section, g: Grid) -> str:
    tags = {r["id"]: f"{r['tag']} ({r['id']})" for r in s.runs}
    better = "higher" if g.maximize_y else "lower"
    return (f"{g.title}: {g.question} Pareto frontier (lower {g.x}, {better} {g.y}; full colour in the plot, "
            f"other runs pale): " + ", ".join(tags.get(i, i) for i in g.frontier) + ".")


def _section_blocks(wr, expr, spec: DashboardSpec, entity: str, s: Section) -> list:
    blocks = [wr.H2(text=f"{s.model}: {s.protocol}"),
              wr.P(text="Runs: " + ", ".join(f"{m} ({c})" for m, c in s.methods.items()) + ". Filters: " +
                   "; ".join(f"{f['key']} {f['op']} {f['value']}" for f in s.filters) + ".")]
    for g in s.grids:
        panels = [wr.ScatterPlot(title=p["title"], x=wr.SummaryMetric(p["x"].split(":", 1)[1]),
                                 y=wr.SummaryMetric(p["y"].split(":", 1)[1]), log_y=p["log_y"] or None)
                  for p in g.panels]
        blocks += [wr.P(text=_frontier_text(s, g)), wr.PanelGrid(runsets=_runsets(wr, expr, spec, entity, s, g.colors),
                                                                  panels=panels)]
    runs_table = next(t for t in s.tables if t["type"] == "runs_table")
    layer_tables = [wr.WeavePanelSummaryTable(table_name=t["table"]) for t in s.tables if t["type"] == "summary_table"]
    cols = ["run:displayName"] + runs_table["columns"]
    blocks.append(wr.PanelGrid(runsets=_runsets(wr, expr, spec, entity, s, {}, cols),
                               panels=layer_tables + [wr.RunComparer(diff_only="split")]))
    return blocks


def to_report(spec: DashboardSpec, entity: str, validate_only: bool = False):
    """wandb-workspaces Report for `spec` under `entity` (validated by its pydantic models); None when
    validate_only and the package is missing (said on stdout)."""
    wr, expr = _api()
    if wr is None:
        if validate_only:
            print(f"wandb-workspaces is not installed: report objects not built; {INSTALL}")
            return None
        raise ConfigError(f"saving a dashboard needs wandb-workspaces; {INSTALL}")
    blocks = [wr.MarkdownBlock(text="Built by `python -m qresearch.dashboard` from the qresearch results index. "
                                    "Each section is one model and one evaluation protocol.")]
    for s in spec.sections:
        blocks += _section_blocks(wr, expr, spec, entity, s)
    return wr.Report(project=spec.project, entity=entity, title=spec.title[:128],
                     description="perplexity / accuracy vs bits and latency, per method, Pareto frontiers",
                     blocks=blocks)


def default_entity() -> str:
    """The wandb API key's default entity (online only: needs credentials)."""
    import wandb

    return wandb.Api().default_entity


def save_report(report) -> str:
    """Save to wandb (needs credentials and network); returns the report URL."""
    report.save()
    return report.url
