"""Dashboards as code (issue 16): the report spec of a finished sweep, checked offline against what the runs logged."""
import json
import random
from copy import deepcopy

import pytest

from qresearch.dashboard import COLUMNS, build_spec, main, pale, pareto_front, referenced_keys
from qresearch.tracking.runs import finished_runs
from qresearch.tracking.store import append_index, atomic_write_json

from .conftest import DATA, require_shared
from .helpers import run_cli
from .wandb_reader import read_run

LATENCY = ["eval.latency.enabled=true", "eval.latency.prompt_lengths=[16]", "eval.latency.decode_tokens=2",
           "eval.latency.batch_sizes=[1]", "eval.latency.repeats=1", "eval.latency.warmup=0"]
SWEEP = ["model=stories260k", f"data.root={DATA}", "eval.max_chunks=2", "data.n_samples=4", "data.seqlen=32",
         "logger=wandb", "logger.mode=offline", "logger.project=dash", *LATENCY]


def _dominated(p, others, maximize):
    s = -1 if maximize else 1
    return any(o[0] <= p[0] and s * o[1] <= s * p[1] and (o[0] < p[0] or s * o[1] < s * p[1]) for o in others)


@pytest.mark.parametrize("maximize", [False, True])
def test_pareto_front_matches_dominance_definition(maximize):
    rng = random.Random(3)
    for _ in range(50):
        pts = [(rng.randint(0, 30) + rng.random(), rng.random() * 10) for _ in range(rng.randint(1, 12))]
        want = {i for i, p in enumerate(pts) if not _dominated(p, pts, maximize)}
        got = pareto_front(pts, maximize)
        assert set(got) == want
        assert [pts[i][0] for i in got] == sorted(pts[i][0] for i in got)


def test_pale_mixes_with_white():
    assert pale("#000000", 0.25) == "#bfbfbf" and pale("#ff7f0e", 1.0) == "#ff7f0e"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """rtn and gptq at w3 / w4 logged to an offline wandb project, plus a copy of one run as if wandb had been off
    (its metrics without a wandb run, added to the index)."""
    require_shared()
    results = tmp_path_factory.mktemp("dash") / "results"
    r = run_cli("-m", *SWEEP, "method=rtn,gptq", "bits=3,4", env={"QRESEARCH_RESULTS": str(results)})
    assert r.returncode == 0, r.stderr[-3000:]
    src = finished_runs(results)[0]
    m = deepcopy(src.metrics)
    m.wandb_run, m.wandb, m.run.config_hash = None, "off", "nowandb"
    off = results / "runs" / "stories260k" / "no-wandb"
    atomic_write_json(off / "metrics.json", m.to_dict())
    append_index(results / "runs" / "index.jsonl", m.row(off))
    return results


def test_spec_panels_colours_and_frontier(sweep):
    spec = build_spec(sweep, "dash")
    (s,) = spec.sections  # one model, one protocol
    assert s.model == "stories260k" and s.protocol.startswith("wikitext2/test gptq_chunks L256")
    assert {f["key"]: f["value"] for f in s.filters} == {"summary:run.model": "stories260k",
                                                          "summary:run.eval_signature": s.protocol}
    assert set(s.methods) == {"rtn", "gptq"} and len(set(s.methods.values())) == 2
    assert len(s.runs) == 4 and len(spec.skipped) == 1 and "not logged to wandb" in spec.skipped[0]
    grids = {g.title: g for g in s.grids}
    assert set(grids) == {"wikitext2 perplexity vs bits per weight",
                          "wikitext2 perplexity vs decode latency (batch 1)"}
    runs = {r.metrics.wandb_run.id: r.metrics for r in finished_runs(sweep) if r.metrics.wandb_run}
    for g in grids.values():
        xs = {i: (m.footprint.bits_per_weight if "bits" in g.title else m.latency["decode"]["1"]["ms_per_step"],
                  m.ppl["wikitext2"].ppl) for i, m in runs.items()}
        want = {i for i, p in xs.items() if not _dominated(p, list(xs.values()), False)}
        assert set(g.frontier) == want and want
        for i, m in runs.items():
            base = s.methods[m.run.method]
            assert g.colors[i] == (base if i in want else pale(base))
    tables = {t["type"]: t for t in s.tables}
    assert tables["summary_table"]["table"] == "layers"
    for label in ("method", "bits", "group", "format", "act bits", "calibration size", "seed", "commit"):
        assert f"summary:{COLUMNS[label]}" in tables["runs_table"]["columns"]


def test_every_key_the_dashboard_reads_is_logged(sweep):
    spec = build_spec(sweep, "dash")
    files = list((sweep / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 4
    for f in files:
        summary = read_run(f)["summary"]
        missing = sorted(k for k in referenced_keys(spec) if k not in summary)
        assert not missing, f"{f.parent.name} lacks {missing}"
        assert json.loads(summary["run.commit"]) and "layers.nrows" in summary
    calib = [json.loads(read_run(f)["summary"]["run.calib_samples"]) for f in files]
    assert sorted(calib, key=str) == [4, 4, None, None]  # gptq calibrated on 4 windows; rtn on none


def test_cli_offline_writes_spec_and_says_not_uploaded(sweep, tmp_path, capsys):
    out = tmp_path / "d.json"
    main(["--project", "dash", "--group", "stories260k", "--results", str(sweep), "--mode", "offline",
          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "not uploaded" in printed
    spec = json.loads(out.read_text())
    assert spec["uploaded"] is False and spec["group"] == "stories260k"
    assert {"key": "run:group", "op": "==", "value": "stories260k"} in spec["sections"][0]["filters"]
    with pytest.raises(SystemExit, match="no finished run of wandb project 'other'"):
        build_spec(sweep, "other")


def test_wandb_report_objects(sweep):
    pytest.importorskip("wandb_workspaces")
    from qresearch.dashboard_wandb import to_report

    spec = build_spec(sweep, "dash")
    report = to_report(spec, "someone")
    grids = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    assert len(grids) == 3  # two scatter grids + the runs/layers grid
    scatter = grids[0]
    assert [rs.name for rs in scatter.runsets] == list(spec.sections[0].methods)
    assert scatter.panels[0].x.name == "footprint.bits_per_weight" and scatter.panels[0].y.name == "ppl.wikitext2.ppl"
    colors = {i: st.color for rs in scatter.runsets for i, st in rs.run_settings.items()}
    assert colors == spec.sections[0].grids[0].colors
    assert "run.method" in scatter.runsets[0].filters and "stories260k" in scatter.runsets[0].filters
    assert "summary:run.commit" in grids[-1].runsets[0].pinned_columns


def test_lm_eval_accuracy_grid_maximizes(sweep):
    from qresearch.dashboard import _grids

    base = [r.metrics for r in finished_runs(sweep) if r.metrics.wandb_run]
    runs = []
    for m, acc in zip(base, (0.52, 0.61, 0.55, 0.58)):
        m = deepcopy(m)
        m.lm_eval = {"tasks": {"piqa_local": {"acc": acc, "n_samples": 10}}, "protocol": {"num_fewshot": 0}}
        runs.append(m)
    methods = {"rtn": "#1f77b4", "gptq": "#ff7f0e"}
    (g,) = [g for g in _grids(runs, methods) if g.y == "lm_eval.tasks.piqa_local.acc"]
    assert g.maximize_y and g.panels[0]["log_y"] is False
    pts = {m.wandb_run.id: (m.footprint.bits_per_weight, m.lm_eval["tasks"]["piqa_local"]["acc"]) for m in runs}
    assert set(g.frontier) == {i for i, p in pts.items() if not _dominated(p, list(pts.values()), True)}
