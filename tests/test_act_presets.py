"""Reproduction presets (conf/experiment/): each composes, names a published number of docs/PAPERS.md with its
protocol and tolerance, and runs end to end on a tiny random model (the real ones need the Hub and a GPU)."""
import pytest

from qresearch.runner import run

from .conftest import DATA, SHARED, require_shared
from .helpers import CONF, compose_cfg, run_cli

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                 if p.stem.startswith(("sq_", "llm_int8_")))
PAPER_KEYS = {"source", "metric", "dataset", "value", "tolerance", "protocol"}


def test_presets_exist():
    assert {"sq_opt175b_o1", "sq_opt175b_o2", "sq_opt175b_o3", "sq_llama2_7b", "llm_int8_opt125m"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_names_a_published_number(name):
    require_shared()
    cfg = compose_cfg([f"+experiment={name}"])
    paper = cfg.paper
    assert PAPER_KEYS <= set(paper) and paper.metric == "ppl" and paper.tolerance > 0
    assert paper.dataset in cfg.eval.datasets
    text = (SHARED / "docs" / "PAPERS.md").read_text()
    assert str(paper.value) in text and str(paper.fp_value) in text  # the numbers come from the papers' table
    step = cfg.method[cfg.method.order[0]]
    if name.startswith("sq_"):  # the protocol string states the scheme and alpha the preset sets
        assert cfg.method.name == "smoothquant" and f"alpha {step.alpha}" in paper.protocol
        assert name == "sq_llama2_7b" or f"{step.scheme} activations" in paper.protocol
    else:
        assert cfg.method.name == "llm_int8" and step.threshold == 6.0


def test_preset_composes_on_the_command_line():
    r = run_cli("+experiment=sq_opt175b_o3", "--cfg", "job")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "scheme: O3" in r.stdout and "value: 11.17" in r.stdout and "preset: opt_175b" in r.stdout


@pytest.mark.parametrize("name", ["sq_opt175b_o3", "sq_llama2_7b", "llm_int8_opt125m"])  # one per family / arch
def test_preset_runs_end_to_end_on_a_tiny_model(name, tmp_path):
    require_shared()
    model = "tiny_random_llama" if "llama" in name else "tiny_random_opt"
    cfg = compose_cfg([f"+experiment={name}", f"model={model}", f"data.root={DATA}", "logger=none",
                       "eval.max_chunks=2", "data.n_samples=4", "data.seqlen=64", "skip_done=false"])
    cfg.paths.results, cfg.out_dir = str(tmp_path / "results"), str(tmp_path / "run")
    m = run(cfg)
    ds = cfg.paper.dataset
    assert m["run"]["method"] == cfg.method.name and m["ppl"][ds]["ppl"] > 1 and m["run"]["act_bits"] == 8
    assert m["activations"]["before"]["inputs"] > 0 and (tmp_path / "run" / "outliers.png").is_file()
