"""Bad data and model files: one line naming the file and what is wrong, raised by plan() before any model
loads; through run.py: exit status 2 and no run dir left behind."""
import json
import shutil
import time

import pytest

from qresearch.config import plan
from qresearch.data import text
from qresearch.quant.spec import ConfigError

from .conftest import DATA, STORIES, require_shared
from .helpers import compose_cfg, run_cli


def _plan_error(*overrides) -> str:
    with pytest.raises(ConfigError) as e:
        plan(compose_cfg(["model=stories260k", "logger=none", *overrides]))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def model_copy(tmp_path):
    require_shared()
    d = tmp_path / "model"
    shutil.copytree(STORIES, d)
    return d


@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "config.json").write_text(""), "config.json is empty"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama", '), "config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json has no model_type"),
    (lambda d: (d / "config.json").unlink(), "has no config.json"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:9000]),
     "model.safetensors is truncated (9000 bytes"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "not a safetensors file or is truncated"),
    (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "pickled weights are not loaded"),
])
def test_damaged_model_folder(model_copy, damage, needle):
    damage(model_copy)
    msg = _plan_error(f"model.path={model_copy}", f"data.root={DATA}")
    assert needle in msg and str(model_copy) in msg, msg


@pytest.fixture
def data_copy(tmp_path):
    require_shared()
    d = tmp_path / "data"
    shutil.copytree(DATA, d)
    for f in d.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return d


@pytest.mark.parametrize("rel,damage,needle", [
    ("wikitext2/wiki.test.raw", lambda f: f.write_text(""), "is empty"),
    ("wikitext2/wiki.test.raw", lambda f: f.write_bytes(f.read_bytes()[:500000]),
     "500000 bytes, the published file has 1290590"),
    ("wikitext2/wiki.test.raw", lambda f: f.write_bytes(f.read_bytes().replace(b"the", b"teh", 1)),
     "edited content"),
    ("c4/c4_validation_2k.parquet", lambda f: f.write_bytes(b"not parquet at all" * 100),
     "not a readable parquet file"),
    ("c4/c4_validation_2k.parquet", lambda f: f.write_bytes(f.read_bytes()[:100000]), "not a readable parquet"),
    ("c4/c4_validation_2k.parquet", lambda f: f.write_bytes(b""), "is empty"),
])
def test_damaged_builtin_data(data_copy, rel, damage, needle):
    damage(data_copy / rel)
    ds = rel.split("/")[0]
    msg = _plan_error(f"data.root={data_copy}", f"eval.datasets=[{ds}]")
    assert needle in msg and str(data_copy / rel) in msg, msg


def test_c4_with_too_few_rows_and_as_calibration(data_copy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = data_copy / "c4" / "c4_validation_2k.parquet"
    pq.write_table(pa.table({"text": ["a doc"] * 10}), f)
    msg = _plan_error(f"data.root={data_copy}", "method=gptq", "eval.datasets=[]")  # calibration reads C4 too
    assert f"{f} has 10 rows; at least 2000 are needed" in msg


def test_missing_data_offline_names_the_file_without_hub_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    try:
        msg = _plan_error(f"data.root={tmp_path}", "data.source=auto")
    finally:
        text.hub_reachable.cache_clear()
    assert f"data file {tmp_path / 'wikitext2' / 'wiki.test.raw'} is missing and the HF Hub is unreachable" in msg
    assert "data.root" in msg and time.perf_counter() - t0 < 5


def test_unreachable_hub_is_probed_once_without_offline_flags(monkeypatch):
    """No offline flag set, a Hub endpoint that refuses connections: one quick probe, the answer is False."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    text.hub_reachable.cache_clear()
    t0 = time.perf_counter()
    try:
        assert text.hub_reachable() is False
    finally:
        text.hub_reachable.cache_clear()
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("kind", ["truncated_weights", "offline_root", "edited_export"])
def test_cli_one_line_exit_2_no_run_dir(results_dir, model_copy, tmp_path, kind):
    if kind == "truncated_weights":
        (model_copy / "model.safetensors").write_bytes((model_copy / "model.safetensors").read_bytes()[:9000])
        args, env = [f"model.path={model_copy}", f"data.root={DATA}"], {}
    elif kind == "offline_root":
        args, env = [f"data.root={tmp_path / 'nowhere'}"], {"HF_HUB_OFFLINE": "1"}
    else:  # a qresearch export whose config was edited after writing
        from tests.test_export import _packed_stories
        from qresearch.export import save_quantized

        save_quantized(_packed_stories(4, 128, False), tmp_path / "q")
        cfg = json.loads((tmp_path / "q" / "config.json").read_text())
        cfg["quantization_config"]["layers"]["model.layers.2.mlp.down_proj"]["group"] = 150
        (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
        args, env = ["model.source=qresearch", f"model.path={tmp_path / 'q'}", "method=fp16", "modules=packed",
                     f"data.root={DATA}"], {}
    r = run_cli("model=stories260k", "logger=none", *args, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert {"truncated_weights": "is truncated", "offline_root": "HF Hub is unreachable",
            "edited_export": "model.layers.2.mlp.down_proj: quantization_config group=150"}[kind] in last
    assert not (results_dir / "runs").exists() or not any((results_dir / "runs").rglob("*"))


def test_wikitext2_calibration_offline_is_refused_early(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text.hub_reachable.cache_clear()
    try:
        msg = _plan_error(f"data.root={DATA}", "method=gptq", "data=wikitext2")  # eval: the local test file
    finally:
        text.hub_reachable.cache_clear()
    assert "calibration on wikitext2 needs its train split from the HF Hub, which is unreachable" in msg
