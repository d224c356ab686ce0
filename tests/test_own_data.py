"""A researcher's own text and tasks: eval.datasets entries (file, name:path, dict, HF dataset folder) through the
same protocol and caches, labelled by name and hash; lm-eval tasks from an include folder, names checked
before the model loads; BOS for lm-eval as the tokenizer (and the model's training) does it, recorded."""
import hashlib
import json

import pytest
import torch

from qresearch.config import plan
from qresearch.data.sets import parse_eval_sets, set_text
from qresearch.quant.spec import ConfigError

from .conftest import DATA, STORIES, require_shared
from .helpers import compose_cfg

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside with her dog. "
         "One day, they found a big red ball in the park. ") * 60


@pytest.fixture
def files(tmp_path):
    (tmp_path / "tiny.txt").write_text(STORY)
    docs = [STORY[i:i + 500] for i in range(0, 3000, 500)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    (tmp_path / "hfds").mkdir()
    (tmp_path / "hfds" / "validation.jsonl").write_text((tmp_path / "docs.jsonl").read_text())
    return tmp_path, docs


def test_entry_forms_parse_and_label(files):
    d, docs = files
    sets = parse_eval_sets([f"{d}/tiny.txt", f"mine:{d}/docs.jsonl", {"name": "pq", "path": f"{d}/docs.parquet",
                                                                       "field": "body"},
                            {"name": "hfval", "hf": str(d / "hfds"), "split": "validation"}], {}, str(DATA), "auto")
    assert [(s.name, s.kind) for s in sets] == [("tiny", "file"), ("mine", "file"), ("pq", "file"), ("hfval", "hf")]
    joined = "\n\n".join(docs)
    for s, want in zip(sets, [STORY, joined, joined, joined]):
        txt, src = set_text(s)
        assert txt == want and src.sha256 == hashlib.sha256(want.encode()).hexdigest() and src.dataset == s.name
    assert set_text(sets[3])[1].origin == f"local:{d / 'hfds'}"


@pytest.mark.parametrize("entry,needle", [
    ("wikitext3", "eval dataset='wikitext3' is unknown"),
    ({"name": "wikitext2", "path": "/x.txt"}, "is a built-in benchmark"),
    ({"name": "a b", "path": "/x.txt"}, "name='a b' is invalid"),
    ({"name": "x", "path": "/x.txt", "hf": "y"}, "exactly one of path"),
    ({"name": "x", "hf": "some/dataset"}, "split is required"),
    ({"name": "x", "path": "/x.txt", "colour": 1}, "unknown key(s) ['colour']"),
    ("hf:roneneldan/TinyStories", "needs its split"),
    ("mine:/nonexistent/valid.txt", "file /nonexistent/valid.txt does not exist"),
])
def test_bad_entries_are_one_line_errors(entry, needle):
    with pytest.raises(ConfigError) as e:
        parse_eval_sets([entry], {}, str(DATA), "auto")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("name,content,needle", [
    ("empty.txt", b"", "is empty"),
    ("blank.txt", b"  \n\n ", "only whitespace"),
    ("bin.txt", b"ok \xc3", "not UTF-8 text (bad byte at offset 3"),
    ("cut.jsonl", b'{"text": "a"}\n{"text": "b', "line 2 is not JSON"),
    ("nofield.jsonl", b'{"body": "a"}\n', "no string field 'text'"),
    ("bad.parquet", b"PAR1 nope", "not a readable parquet"),
    ("folder", None, "is a folder; allowed: a text, .jsonl or .parquet file"),
])
def test_bad_own_files(tmp_path, name, content, needle):
    if content is None:
        (tmp_path / name).mkdir()
    else:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError) as e:
        parse_eval_sets([f"t:{tmp_path / name}"], {}, str(DATA), "auto")
    assert needle in str(e.value) and str(tmp_path / name) in str(e.value), str(e.value)


def test_duplicate_names_refused(files):
    d, _ = files
    with pytest.raises(ConfigError, match=r"names \['tiny'\] more than once"):
        parse_eval_sets([f"{d}/tiny.txt", f"tiny:{d}/docs.jsonl"], {}, str(DATA), "auto")


def test_plan_accepts_dict_entries_from_the_command_line(files):
    d, _ = files
    p = plan(compose_cfg(["model=stories260k", f"data.root={DATA}",
                         f"eval.datasets=[wikitext2,{{name: tinystories, path: {d}/tiny.txt}},short:{d}/docs.jsonl]"]))
    assert [(s.name, s.split) for s in p.eval.datasets] == [("wikitext2", "test"), ("tinystories", "file"),
                                                            ("short", "file")]


def test_own_text_run_matches_a_direct_perplexity(results_dir, files):
    """The run's number for an own file equals perplexity() on the file's tokens (same protocol), and the
    metrics and index say where the text came from and its hash."""
    require_shared()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qresearch.eval.ppl import perplexity
    from qresearch.runner import run

    d, _ = files
    cfg = compose_cfg(["model=stories260k", "method=fp16", "logger=none", f"data.root={DATA}", "eval.max_chunks=4",
                       f"eval.datasets=[tinystories:{d}/tiny.txt]", "eval.baseline=false"])
    cfg.out_dir = str(results_dir / "runs" / "one")
    got = run(cfg)["ppl"]["tinystories"]
    assert got["origin"] == f"local:{d / 'tiny.txt'}" and got["split"] == "file"
    assert got["text_sha256"] == hashlib.sha256(STORY.encode()).hexdigest()
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ref = perplexity(model, torch.tensor([tok(STORY).input_ids]), 256, "cpu", max_chunks=4)
    assert got["n_tokens"] == ref["n_tokens"] == 4 * 256
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-6)
    row = json.loads((results_dir / "runs" / "index.jsonl").read_text().splitlines()[0])
    assert row["eval"].startswith(f"tinystories/file#{got['text_sha256'][:8]} gptq_chunks L256 1024 tok")
    assert row["ppl_tinystories"] == got["ppl"]


TASK = """task: mini_piqa
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def task_dir(tmp_path):
    require_shared()
    d = tmp_path / "tasks"
    d.mkdir()
    rows = (DATA / "piqa" / "piqa_validation.jsonl").read_text().splitlines()[:12]
    (d / "mini.jsonl").write_text("\n".join(rows) + "\n")
    (d / "mini_piqa.yaml").write_text(TASK.format(path=d / "mini.jsonl"))
    return d


@pytest.mark.parametrize("lm,needle", [
    ({"tasks": ["mini_piqaa"]}, "did you mean mini_piqa"),
    ({"tasks": ["mini_piqa"], "include_path": "/nonexistent/tasks"}, "include_path=/nonexistent/tasks is not a folder"),
    ({"tasks": ["mini_piqa"], "add_bos_token": "maybe"}, "add_bos_token='maybe' is invalid"),
])
def test_lm_eval_settings_checked_before_loading(task_dir, lm, needle):
    from qresearch.eval.lm_eval_bridge import check_lm_eval

    with pytest.raises(ConfigError) as e:
        check_lm_eval({"include_path": str(task_dir), **lm}, str(DATA))
    assert needle in str(e.value) and "\n" not in str(e.value)
    check_lm_eval({"tasks": ["mini_piqa"], "include_path": str(task_dir)}, str(DATA))


def test_own_lm_eval_task_and_bos(task_dir):
    """stories260K (llama2.c) was trained with BOS first: auto scores with it; false scores without; recorded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qresearch.eval.lm_eval_bridge import run_lm_eval

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    res = {bos: run_lm_eval(model, tok, ["mini_piqa"], str(DATA), batch_size=8, include_path=str(task_dir),
                            add_bos_token=bos) for bos in ("auto", False)}
    auto, off = res["auto"]["protocol"], res[False]["protocol"]
    assert auto["add_bos_token"] is True and auto["bos_in_requests"] is True and "prepends" in auto["bos_rule"]
    assert off["add_bos_token"] is False and off["bos_in_requests"] is False
    assert auto["include_path"] == str(task_dir)
    for r in res.values():
        t = r["tasks"]["mini_piqa"]
        assert t["n_samples"] == 12 and 0.0 <= t["acc"] <= 1.0


def test_text_shorter_than_a_chunk_is_one_line(results_dir, tmp_path):
    require_shared()
    from qresearch.runner import run

    (tmp_path / "short.txt").write_text("Once upon a time.")
    cfg = compose_cfg(["model=stories260k", "logger=none", f"data.root={DATA}",
                       f"eval.datasets=[short:{tmp_path}/short.txt]"])
    cfg.out_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert "eval dataset 'short' has 6 tokens, fewer than one chunk of eval.seqlen=256" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "metrics.json").exists()
