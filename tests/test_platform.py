"""The method platform: a new format is one table entry, a new method is one class + one step config (both defined
in tests only and run end to end), the import graph only points down, functions stay small, every step option
is reachable from the CLI, and the run records what its steps used."""
import ast
import csv
import inspect
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from qresearch.config import build_steps, plan
from qresearch.quant import FORMATS, QuantSpec, choose_qparams, dequantize, quantize
from qresearch.runner import run

from .conftest import DATA, require_shared
from .helpers import CONF, REPO, compose_cfg, group_options
from .toy_platform import HalfwayRTN, Log2Format

# the import graph, bottom to top (docs/ARCHITECTURE.md): a module may import its own layer or lower ones
LAYERS = [
    ("qresearch.errors",),
    ("qresearch.quant",),
    ("qresearch.records", "qresearch.artifacts"),
    ("qresearch.kernels",),
    ("qresearch.nn",),
    ("qresearch.data",),
    ("qresearch.models",),
    ("qresearch.tracking",),
    ("qresearch.calib",),
    ("qresearch.eval",),
    ("qresearch.export",),
    ("qresearch.method",),
    ("methods",),
    ("qresearch.config",),
    ("qresearch.runner",),
    ("qresearch.report", "qresearch", "run"),
]
ALGORITHM_KERNELS = {"gptq_quantize"}  # math kept in one piece on purpose (the paper's loop)


def _layer(module: str) -> int:
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def _sources():
    files = sorted((REPO / "qresearch").rglob("*.py")) + sorted((REPO / "methods").glob("*.py")) + [REPO / "run.py"]
    for f in files:
        rel = f.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield f, module, ast.parse(f.read_text())


def _imports(module: str, tree: ast.AST, is_pkg: bool):
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[:len(base) - node.level + 1]
                yield ".".join(pkg + ([node.module] if node.module else []))
            elif node.module:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_no_module_imports_a_layer_above_it():
    bad = []
    for f, module, tree in _sources():
        own = _layer(module)
        for target in _imports(module, tree, f.name == "__init__.py"):
            if target.split(".")[0] not in ("qresearch", "methods"):
                continue
            if _layer(target) > own:
                bad.append(f"{module} -> {target}")
    assert not bad, bad


def test_functions_stay_small():
    long = [(module, n.name, n.end_lineno - n.lineno + 1) for _f, module, tree in _sources() for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60
            and n.name not in ALGORITHM_KERNELS]
    assert not long, long


def test_no_reference_to_documents_outside_the_repo():
    hits = [str(f) for f, _m, _t in _sources() if "DESIGN rule" in f.read_text()]
    assert not hits, hits


@pytest.mark.parametrize("method", group_options("method"))
def test_every_step_option_is_reachable_and_documented(method):
    """Each recipe's steps are step configs listing every constructor option (method.<step>.<option>)."""
    cfg = compose_cfg([f"method={method}"])
    for name in cfg.method.order:
        node = cfg.method[name]
        cls = type(build_steps(compose_cfg([f"method={method}"]).method)[list(cfg.method.order).index(name)])
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        missing = [p for p in params if p not in node]
        assert not missing, f"method.{name} cannot set {missing}"
        step_file = CONF / "step" / f"{cls.__module__.split('.')[-1]}.yaml"
        text = step_file.read_text()
        assert all(f"{p}:" in text for p in params), step_file


def test_run_records_steps_facts_and_tag_from_steps():
    p = plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=w8a8", "bits=4"]))
    assert p.tag == "w8a8-w8g-1-sym-a8tok" and p.facts["bits"] == 8 and p.facts["act_bits"] == 8
    p = plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=rtn", "act_bits=8"]))
    assert p.tag == "rtn-w4g128-a8tok" and p.facts["act_bits"] == 8
    p = plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=fp16", "bits=3"]))
    assert p.tag == "fp16" and p.facts["bits"] == 16
    p = plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=rtn", "modules=packed"]))
    assert p.tag == "rtn-w4g128-packed"


def test_local_model_through_a_preset_is_named_by_its_folder():
    cfg = compose_cfg(["model=llama", "model.source=local", f"model.path={REPO.parent / 'shared/models/stories260K'}"])
    assert cfg.model.name == "stories260K" and "/runs/stories260K/" in cfg.out_dir
    assert compose_cfg(["model=llama"]).model.name == "llama"


# --- a format defined in this test file only ------------------------------------------------------------------

@pytest.fixture
def toy_format():
    FORMATS["toy_log2"] = Log2Format()
    yield FORMATS["toy_log2"]
    del FORMATS["toy_log2"]


def test_toy_format_round_trips_its_levels(toy_format):
    spec = QuantSpec(bits=4, group_size=16, qformat="toy_log2")
    levels = toy_format.levels(spec)  # every code decoded at scale 1
    x = levels.reshape(1, 16)
    s, z = choose_qparams(x, spec)
    assert torch.equal(dequantize(quantize(x, s, z, spec), s, z, spec), x)


def _run_toy(tmp_path, results, overrides):
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", "logger=none", "eval.max_chunks=3",
                       "data.n_samples=4", "data.seqlen=64", "skip_done=false", *overrides])
    cfg.paths.results = str(results)
    cfg.out_dir = str(tmp_path / "run")
    return run(cfg)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_toy_format_runs_rtn_and_gptq_end_to_end(toy_format, tmp_path, method):
    require_shared()
    m = _run_toy(tmp_path, tmp_path / "results", [f"method={method}", "qformat=toy_log2", "group_size=32"])
    assert m["run"]["qformat"] == "toy_log2" and m["run"]["tag"].startswith(f"{method}-w4g32-toy_log2")
    assert m["footprint"]["bits_per_weight"] == pytest.approx(4 + 16 / 32, rel=0.05)
    assert 1 < m["ppl"]["wikitext2"]["ppl"] < 10 * m["ppl"]["wikitext2"]["fp_ppl"]
    with open(tmp_path / "run" / "layers.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 35 and {r["method"] for r in rows} == {method}


def test_toy_format_codes_decode_to_its_grid(toy_format):
    """GPTQ rounds through the format: every dequantized weight is scale * a level of the grid."""
    from methods.gptq import gptq_quantize

    spec = QuantSpec(bits=4, group_size=32, qformat="toy_log2")
    w, x = torch.randn(8, 64), torch.randn(256, 64)
    q, loss = gptq_quantize(w, 2 * x.T @ x / 256, spec)
    grid = toy_format.levels(spec)
    deq = q.dequantize() / q.scale.repeat_interleave(32, dim=1)
    assert torch.isin(deq, grid).all() and loss > 0


# --- a method defined in tests only, with its own step config -----------------------------------------------

def test_toy_method_is_one_class_and_one_step_config(tmp_path):
    require_shared()
    conf = tmp_path / "conf"
    (conf / "step").mkdir(parents=True)
    (conf / "method").mkdir()
    (conf / "step" / "halfway_rtn.yaml").write_text(
        "_target_: tests.toy_platform.HalfwayRTN\nbits: ${bits}\ngroup_size: ${group_size}\nsym: ${sym}\n"
        "qformat: ${qformat}\nnote: ''\nbatch_size: 2\n")
    (conf / "method" / "halfway.yaml").write_text(
        "defaults:\n  - /step@halfway_rtn: halfway_rtn\n  - _self_\nname: halfway\norder: [halfway_rtn]\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"hydra.searchpath=[file://{conf}]", "method=halfway", "method.halfway_rtn.note=x", "model=stories260k",
            f"data.root={DATA}", "logger=none", "eval.max_chunks=3", "data.n_samples=4", "data.seqlen=64",
            "skip_done=false"])
    cfg.paths.results = str(tmp_path / "results")
    cfg.out_dir = str(tmp_path / "run")
    m = run(cfg)
    assert m["run"]["tag"] == "halfway-w4g128-x" and m["run"]["steps"][0]["name"] == "halfway_rtn"
    assert m["run"]["steps"][0]["engine"]["seconds"] > 0
    rows = (tmp_path / "run" / "layers.csv").read_text().splitlines()
    assert len(rows) == 36 and "out_rel_err" in rows[0]
    index = [json.loads(ln) for ln in (tmp_path / "results" / "runs" / "index.jsonl").read_text().splitlines()]
    assert index[-1]["tag"] == "halfway-w4g128-x"
    assert isinstance(build_steps(cfg.method)[0], HalfwayRTN)
    assert Path(m["model"]["path"]).name == "stories260K"
