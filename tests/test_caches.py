"""One damaged file never blocks everything: the results index, metrics.json, the token cache and the FP-baseline
cache are read defensively; a damaged or mismatched entry is skipped or rebuilt with a warning naming the file."""
import json
import logging
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qresearch.data.sets import EvalSet
from qresearch.data.tokens import set_tokens
from qresearch.eval import baseline_cache as bc
from qresearch.eval.ppl import perplexity
from qresearch.tracking.store import append_index, read_index, read_metrics

from .conftest import STORIES, require_shared


def test_index_skips_damaged_lines_and_appends_on_a_fresh_line(tmp_path, caplog):
    idx = tmp_path / "index.jsonl"
    append_index(idx, {"run_dir": "/a", "config_hash": "x"})
    with open(idx, "a") as f:
        f.write('[1, 2]\n{"run_dir": "/b", "conf')  # a JSON non-row, then a row cut mid-write (no newline)
    with caplog.at_level(logging.WARNING):
        assert [r["run_dir"] for r in read_index(idx)] == ["/a"]
    assert f"{idx} line 2 is damaged" in caplog.text and f"{idx} line 3 is damaged" in caplog.text
    append_index(idx, {"run_dir": "/c", "config_hash": "y"})  # must not glue itself onto the cut line
    assert [r["run_dir"] for r in read_index(idx)] == ["/a", "/c"]


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe garbage", b'{"run": {}}', b"[1, 2]"])
def test_damaged_metrics_counts_as_not_complete(tmp_path, caplog, content):
    (tmp_path / "metrics.json").write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert read_metrics(tmp_path) is None
    assert str(tmp_path / "metrics.json") in caplog.text
    assert read_metrics(tmp_path / "absent") is None


@pytest.fixture(scope="module")
def tok():
    require_shared()
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture
def text_set(tmp_path, monkeypatch):
    monkeypatch.setenv("QRESEARCH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "story.txt"
    g = torch.Generator().manual_seed(0)
    words = ["Once", "upon", "a", "time", "Lily", "saw", "a", "big", "dog", "."]
    f.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (3000,), generator=g)))
    return EvalSet("story", "file", "file", path=str(f))


def _cache_file(tmp_path):
    (f,) = (tmp_path / "cache" / "tokens").glob("*.safetensors")
    return f


def _damage_truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _damage_shorter_tensor(f):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(f), "pt") as h:
        meta, ids = h.metadata(), h.get_tensor("ids")
    save_file({"ids": ids[:, : ids.shape[1] // 2].contiguous()}, str(f), metadata=meta)  # claims the old count


def _damage_other_tokenizer(f):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(f), "pt") as h:
        meta, ids = h.metadata(), h.get_tensor("ids")
    save_file({"ids": ids}, str(f), metadata={**meta, "tokenizer": "0" * 16})


@pytest.mark.parametrize("damage,needle", [(_damage_truncate, "is damaged"),
                                           (_damage_shorter_tensor, "do not match the recorded"),
                                           (_damage_other_tokenizer, "tokenizer")])
def test_token_cache_is_checked_and_rebuilt(tok, text_set, tmp_path, caplog, damage, needle):
    ids, src = set_tokens(text_set, tok)
    fresh = torch.tensor([tok(open(text_set.path).read()).input_ids])
    assert torch.equal(ids, fresh) and src.sha256 and src.origin.startswith("local:")
    f = _cache_file(tmp_path)
    damage(f)
    with caplog.at_level(logging.WARNING):
        again, _ = set_tokens(text_set, tok)
    assert torch.equal(again, fresh)
    assert f"token cache {f}" in caplog.text and needle in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        set_tokens(text_set, tok)  # rebuilt entry: read without a warning
    assert "token cache" not in caplog.text


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


PROTOCOL = {"dtype": "torch.float32", "device": "cpu", "protocol": "gptq", "seqlen": 32, "stride": None,
            "max_chunks": 4, "batch_size": 2}


def _baseline(model, tok, streams, calls):
    def compute(sub):
        calls.append(sorted(sub))
        return {ds: perplexity(model, ids, 32, "cpu", 4, 2) for ds, (ids, _) in sub.items()}

    return bc.cached_baseline(model, tok, streams, PROTOCOL, compute)


def _edit_number(f):
    e = json.loads(f.read_text())
    e["result"]["ppl"] *= 0.5
    f.write_text(json.dumps(e))


def _edit_number_and_checksum(f):  # consistent-looking but computed on fewer tokens
    e = json.loads(f.read_text())
    e["result"]["n_tokens"] -= 32
    e["checksum"] = bc._checksum(e["result"])
    f.write_text(json.dumps(e))


def _swap_key(f):  # an entry copied from another protocol
    e = json.loads(f.read_text())
    e["key"]["max_chunks"] = 2
    f.write_text(json.dumps(e))


@pytest.mark.parametrize("damage,needle", [(lambda f: f.write_text(f.read_text()[:40]), "unreadable"),
                                           (lambda f: f.write_text(""), "unreadable"),
                                           (_edit_number, "checksum"),
                                           (_edit_number_and_checksum, "n_tokens="),
                                           (_swap_key, "other inputs: max_chunks")])
def test_baseline_cache_is_checked_and_rebuilt(tok, tiny, text_set, tmp_path, caplog, damage, needle):
    streams = {"story": set_tokens(text_set, tok)}
    calls = []
    first = _baseline(tiny, tok, streams, calls)
    again = _baseline(tiny, tok, streams, calls)
    assert calls == [["story"]] and again["story"]["cached"] and again["story"]["ppl"] == first["story"]["ppl"]
    (f,) = (tmp_path / "cache" / "baselines").glob("*.json")
    damage(f)
    with caplog.at_level(logging.WARNING):
        third = _baseline(tiny, tok, streams, calls)
    assert calls == [["story"], ["story"]] and "cached" not in third["story"]
    assert third["story"]["ppl"] == first["story"]["ppl"] and math.isfinite(third["story"]["ppl"])
    assert f"baseline cache {f}" in caplog.text and needle in caplog.text


def test_baseline_cache_keys_on_weights_and_tokens(tok, tiny, text_set):
    streams = {"story": set_tokens(text_set, tok)}
    calls = []
    _baseline(tiny, tok, streams, calls)
    ids, src = streams["story"]
    _baseline(tiny, tok, {"story": (ids[:, :-40], src)}, calls)  # other token ids: not the same entry
    with torch.no_grad():
        tiny.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # other weights: not the same entry
    try:
        _baseline(tiny, tok, streams, calls)
    finally:
        with torch.no_grad():
            tiny.model.layers[0].mlp.up_proj.weight[0, 0] -= 1.0
    assert len(calls) == 3
