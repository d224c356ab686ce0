"""Outlier report: statistics against their definitions, and the runner writes it for runs that quantize
activations only (before / after smoothing)."""
import csv

import pytest
import torch

from qresearch.eval.outliers import THRESHOLD, InputStats, draw
from qresearch.runner import run

from .conftest import DATA, require_shared
from .helpers import compose_cfg


def test_input_stats_match_definitions(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 16, generator=g)
    x[0, 7, 4] = 11.0  # one outlier value: channel 4, one token of 150
    x[2, 1, 9] = -6.0  # exactly at the threshold counts
    st = InputStats()
    st.update(x[:2])
    st.update(x[2:])
    r = st.row()
    flat = x.reshape(-1, 16).double()
    c = flat - flat.mean(1, keepdim=True)
    kurt = (c.pow(4).mean(1) / c.pow(2).mean(1).pow(2)).mean()
    assert r["max_abs"] == pytest.approx(11.0) and r["top_channel"] == 4
    assert r["channels_over"] == int((flat.abs().amax(0) >= THRESHOLD).sum()) and r["channels_over"] >= 2
    assert r["rows_over_frac"] == pytest.approx(float((flat.abs() >= THRESHOLD).any(1).double().mean()))
    assert r["kurtosis"] == pytest.approx(float(kurt), rel=1e-9)
    assert draw({"before": {"a": st, "b": st}}, tmp_path / "o.png") and (tmp_path / "o.png").stat().st_size > 0


def _run(tmp_path, method_args):
    cfg = compose_cfg(["model=tiny_random_llama", f"data.root={DATA}", "logger=none", "eval.max_chunks=2",
                       "data.n_samples=4", "data.seqlen=64", "skip_done=false", *method_args])
    cfg.paths.results, cfg.out_dir = str(tmp_path / "results"), str(tmp_path / "run")
    return run(cfg)


def test_runner_writes_the_report_for_activation_runs_only(tmp_path):
    require_shared()
    m = _run(tmp_path / "a", ["method=smoothquant", "method.smoothquant.scheme=O3"])
    acts = m["activations"]
    assert acts["before"]["inputs"] == acts["after"]["inputs"] == 8 and acts["picture"] == "outliers.png"
    assert acts["calibration"]["origin"] == "local:c4/c4_validation_2k.parquet"  # relative to the data root
    with open(tmp_path / "a" / "run" / "outliers.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["phase"] for r in rows} == {"before", "after"} and len(rows) == 16
    # smoothing divides the norm-fed inputs by s: their max |x| changes, o_proj / down_proj inputs do not
    by = {(r["phase"], r["input"]): float(r["max_abs"]) for r in rows}
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert by[("before", q)] != by[("after", q)] and by[("before", o)] == pytest.approx(by[("after", o)], rel=1e-5)
    m = _run(tmp_path / "w", ["method=rtn", "bits=4"])
    assert m["activations"] is None and not (tmp_path / "w" / "run" / "outliers.csv").exists()
