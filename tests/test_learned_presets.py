"""The paper presets under conf/experiment/ (AdaRound, PACT, DFQ, R2) compose as plain Hydra experiment configs with
a complete `paper:` block and run end to end on a tiny random model (their own models need the Hub and a GPU)."""
import pytest

from qresearch.config import plan
from qresearch.runner import run
from tests.conftest import DATA, require_shared
from tests.helpers import CONF, compose_cfg

PRESETS = {  # preset -> (method, overrides that make the tiny run quick)
    "adaround_resnet18_w4": ("adaround", ["method.adaround.iters=2"]),
    "pact_resnet_w4a4": ("qat", ["method.qat.steps=2", "method.qat.batch_size=2"]),
    "dfq_mobilenetv2_int8": ("dfq", []),
    "r2_mobilenetv2_w2a8": ("r2_rtn", ["method.regularize.steps=2", "method.regularize.batch_size=2"]),
}
PAPER_KEYS = {"source", "metric", "dataset", "value", "tolerance", "protocol"}


def test_every_preset_of_these_papers_is_listed_here():
    mine = ("adaround_", "pact_", "dfq_", "r2_")
    assert sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem.startswith(mine)) == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes_with_a_paper_block(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = compose_cfg([f"+experiment={name}", "model=tiny_random_llama", "logger=none"])
    assert set(cfg.paper) == PAPER_KEYS and isinstance(cfg.paper.value, float) and cfg.paper.tolerance > 0
    p = plan(cfg)
    assert p.recipe == PRESETS[name][0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_runs_end_to_end_on_a_tiny_model(name, tmp_path):
    require_shared()
    cfg = compose_cfg([f"+experiment={name}", "model=tiny_random_llama", "logger=none", f"data.root={DATA}",
                       "eval.max_chunks=2", "data.n_samples=4", "data.seqlen=32", "skip_done=false",
                       *PRESETS[name][1]])
    cfg.paths.results, cfg.out_dir = str(tmp_path / "results"), str(tmp_path / "run")
    m = run(cfg)
    assert m["ppl"]["wikitext2"]["ppl"] > 1 and m["run"]["method"] == PRESETS[name][0]
    assert (tmp_path / "run" / "config.yaml").read_text().count("paper:") == 1


def test_learned_table_cells_commands_and_rendering(tmp_path):
    from experiments.learned_report import render
    from experiments.learned_table import MODELS, SECTIONS, cells, command

    all_cells = list(cells(list(MODELS), list(SECTIONS)))
    assert len(all_cells) == len(set(all_cells))
    cmd = command("smollm2_135m", "w4a8", "QAT + PACT (learned clips -> static scales)", "W4 g128 A8")
    assert "method=qat" in cmd and "act_bits=8" in cmd and "method.qat.steps=200" in cmd
    assert not any(o.startswith("method.awq") for o in cmd)
    m = {"ppl": {"wikitext2": {"ppl": 30.0, "fp_ppl": 20.0, "n_tokens": 1024, "seqlen": 512}},
         "run": {"tag": "qat-w4g128-a8t", "steps": [{"name": "qat", "seconds": 60.0, "train": {
             "steps": 10, "resumed_from": 0, "seconds": 50.0, "s_per_step": 5.0, "first_loss": 1.0,
             "last_loss": 0.5}}]},
         "timing": {"quantize_seconds": 61.0}, "calibration": {"n_samples": 4, "seqlen": 32, "hash": "h"},
         "model": {"weights_note": "note"}}
    results = [{"model": "smollm2_135m", "section": "w4a8", "row": "QAT + PACT (learned clips -> static scales)",
                "col": "W4 g128 A8", "command": "python run.py x", "metrics": m, "run_dir": str(tmp_path)},
               {"model": "smollm2_135m", "section": "w4a8", "row": "RTN, A8 per-token dynamic",
                "col": "W4 g128 A8", "command": "python run.py y", "metrics": None, "run_dir": str(tmp_path)}]
    md, data = render(results, SECTIONS, MODELS, "findings here")
    assert "| QAT + PACT (learned clips -> static scales) | 30.00 | 61 |" in md and "| FP | 20.00 | - |" in md
    assert "| RTN, A8 per-token dynamic | n/a | n/a |" in md and "qat: 10 steps, 50 s" in md
    assert "findings here" in md and "python run.py y" in md
    assert data["smollm2_135m"]["w4a8"][0]["result"]["ppl"] == 30.0
