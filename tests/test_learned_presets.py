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


def test_every_preset_is_listed_here():
    assert sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")) == sorted(PRESETS)


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
