"""Reproduction checks (issue 16): presets with a paper block, PASS / FAIL / REFUSED / NOT RUN on stories260K
against made-up reference entries defined here; the committed presets compose and agree with their own protocol."""
import hashlib
import math

import pytest
import torch
from omegaconf import OmegaConf

from qresearch.config import plan
from qresearch.data import text
from qresearch.errors import ConfigError
from qresearch.repro import PaperRef, load_presets, main
from qresearch.runner import run
from qresearch.tracking.runs import finished_runs
from qresearch.tracking.store import append_index

from .conftest import DATA, STORIES, require_shared
from .helpers import CONF, compose_cfg

SEQLEN = 256
PRESET = """# @package _global_
defaults:
  - override /model: stories260k
  - override /method: fp16
logger:
  name: none
paper:
  source: "{source}"
  metric: ppl
  dataset: wikitext2
  value: {value}
  tolerance: {tol}
  protocol: {{split: test, seqlen: {seqlen}, eval: gptq_chunks, bits: 16, group_size: null, calibration: null,
             deviations: ["{source} is made up for this test"]}}
"""


def _reference_ppl(root) -> float:
    """GPTQ-protocol perplexity of stories260K on the test's small wikitext2 split, float64 NLL, plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qresearch.data.tokens import eval_tokens

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ids, _ = eval_tokens("wikitext2", "test", str(root), tok, "local")
    n = ids.shape[1] // SEQLEN
    chunks = ids[0, : n * SEQLEN].reshape(n, SEQLEN)  # [n_chunks, seqlen]
    with torch.no_grad():
        logp = torch.log_softmax(model(chunks).logits.double(), -1)  # [n, L, vocab]
    nll = -logp[:, :-1].gather(-1, chunks[:, 1:, None]).squeeze(-1)  # [n, L - 1]
    return math.exp(float(nll.mean()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_shared()
    base = tmp_path_factory.mktemp("repro")
    data = base / "data" / "wikitext2"
    data.mkdir(parents=True)
    lines = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    small = "".join(lines[:40]).encode()  # a small whole "split"
    (data / "wiki.test.raw").write_bytes(small)
    with pytest.MonkeyPatch.context() as mp:  # the built-in name's integrity check accepts this small split
        mp.setitem(text.KNOWN_FILES, "wikitext2/wiki.test.raw", (len(small), hashlib.sha256(small).hexdigest()))
        return _runs(base, data.parent)


def _runs(base, data_root):
    ref = _reference_ppl(data_root)
    presets = base / "conf" / "experiment"
    presets.mkdir(parents=True)
    for name, value, tol in (("tiny_pass", ref, 1e-3), ("tiny_fail", ref * 1.2, 0.01 * ref),
                             ("tiny_refused", ref, 1.0), ("tiny_notrun", ref, 1.0)):
        (presets / f"{name}.yaml").write_text(PRESET.format(source=f"made-up {name}", value=value, tol=tol,
                                                            seqlen=SEQLEN))
    results = base / "results"
    common = [f"hydra.searchpath=[file://{base / 'conf'}]", f"data.root={data_root}"]
    for i, args in enumerate((["+experiment=tiny_pass"], ["+experiment=tiny_fail"],
                              ["+experiment=tiny_refused", "eval.seqlen=128"],
                              ["+experiment=tiny_pass", "eval.max_chunks=2"])):
        cfg = compose_cfg(common + args)  # in-process runs, as `python run.py <args>` would compose them
        cfg.paths.results, cfg.out_dir = str(results), str(results / "runs" / f"run{i}")
        run(cfg)
    return presets, results, ref


def test_pass_fail_refused_not_run(setup, capsys):
    presets, results, ref = setup
    rows = {w.preset.name: w for w in main(["--presets", str(presets), "--results", str(results)])}
    printed = capsys.readouterr().out
    assert rows["tiny_pass"].status == "PASS" and abs(rows["tiny_pass"].ours - ref) < 1e-3
    assert rows["tiny_pass"].n_runs == 2  # the max_chunks=2 run belongs to it too, but is not the one compared
    assert rows["tiny_fail"].status == "FAIL"
    assert rows["tiny_refused"].status == "REFUSED" and rows["tiny_refused"].ours is None
    assert "seqlen 128 != 256" in "; ".join(rows["tiny_refused"].notes)
    assert rows["tiny_notrun"].status == "NOT RUN"
    assert "1 PASS, 1 FAIL, 1 REFUSED, 1 NOT RUN" in printed
    md = (results / "repro.md").read_text()
    assert "| tiny_pass |" in md and "made-up tiny_pass is made up for this test" in md
    assert str(results) not in md  # run dirs relative to the results root


def test_partial_eval_is_refused(setup, tmp_path):
    presets, results, _ = setup
    only = tmp_path / "experiment"
    only.mkdir()
    (only / "tiny_pass.yaml").write_text((presets / "tiny_pass.yaml").read_text())
    # an index holding only the max_chunks=2 run of tiny_pass
    partial = [r for r in finished_runs(results) if r.config["eval"]["max_chunks"] == 2]
    assert len(partial) == 1
    append_index(tmp_path / "res" / "runs" / "index.jsonl", partial[0].metrics.row(partial[0].run_dir))
    (row,) = main(["--presets", str(only), "--results", str(tmp_path / "res")])
    assert row.status == "REFUSED" and "first 2 chunks" in "; ".join(row.notes)


@pytest.mark.parametrize("bad, match", [
    ({"metric": "bleu"}, "paper.metric='bleu' is unknown"),
    ({"tolerance": -1}, "paper.tolerance=-1 is not a non-negative number"),
    ({"protocol": {"seqln": 2}}, r"paper.protocol keys \['seqln'\] unknown"),
    ({"extra": 1}, "paper block must have the keys"),
])
def test_bad_paper_block_is_one_line_error(bad, match):
    good = {"source": "s", "metric": "ppl", "dataset": "wikitext2", "value": 1.0, "tolerance": 0.1,
            "protocol": {"split": "test"}}
    with pytest.raises(ConfigError, match=match):
        PaperRef.from_dict({**good, **bad}, "x.yaml")


def test_committed_presets_plan_and_match_their_protocol(monkeypatch):
    """Every conf/experiment preset composes, passes config.plan, and its run would satisfy its own protocol (the
    Hub models' availability, a fact of the machine, is not what this checks)."""
    monkeypatch.setattr("qresearch.config.check_hub_model", lambda spec: None)
    presets = load_presets(CONF / "experiment")
    assert {p.name for p in presets} >= {"gptq_opt125m_w4", "gptq_llama7b_w4", "awq_llama2_7b_w4g128"}
    for p in presets:
        if p.paper.metric not in ("ppl", "acc") or p.model == "opt_175b":
            continue  # image-classification papers; OPT-175B needs a local weights folder to plan
        cfg = compose_cfg([f"+experiment={p.name}"])
        pl = plan(cfg)
        proto = p.paper.protocol
        assert pl.facts["bits"] == proto["bits"] and pl.facts["group_size"] == proto["group_size"], p.name
        assert pl.eval.seqlen == proto["seqlen"] and pl.eval.max_chunks is None, p.name
        assert [(s.name, s.split) for s in pl.eval.datasets] == [(p.paper.dataset, proto["split"])], p.name
        calib = {k: pl.calib[k] for k in ("name", "n_samples", "seqlen")} if pl.needs_calibration else None
        want = proto["calibration"] and {"name": proto["calibration"]["dataset"],
                                         "n_samples": proto["calibration"]["n_samples"],
                                         "seqlen": proto["calibration"]["seqlen"]}
        assert calib == (want or None), p.name
        assert OmegaConf.select(cfg, "paper.value") == p.paper.value


@pytest.mark.parametrize("args,needle", [
    (["--presets", "{tmp}/missing"], "missing is not a folder"),
    (["--presets", "{tmp}"], "holds no preset with a paper: block"),
    (["--results", "{tmp}/missing"], "missing is not a folder"),
])
def test_bad_folders_are_refused_before_any_table(tmp_path, capsys, args, needle):
    """A mistyped --presets / --results is a usage error, not an empty (or all NOT RUN) table written as if real."""
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "repro.md")])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "repro.md").exists()
