"""KV-cache quantization: per-token / per-head groups, quantizing at attention time equals a cache of quantized
entries (generation with a cache matches the full forward), the cache's bytes are the arithmetic, bad settings are
one-line errors, and a run records what it did."""
import copy

import pytest
import torch

from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.eval.kvcache import KVCacheQuant, cache_bytes, fake_quant_kv, kv_spec
from qresearch.runner import run

from .conftest import DATA, require_shared
from .helpers import compose_cfg
from .pipeline_helpers import stories260k


def test_groups_are_one_token_of_one_head():
    k = torch.randn(2, 4, 10, 8)  # [batch, kv heads, tokens, head dim]
    q = fake_quant_kv(k, kv_spec(4))
    for t in range(10):  # each vector quantized alone gives the same values: no cross-token statistics
        torch.testing.assert_close(fake_quant_kv(k[:, :, t:t + 1], kv_spec(4)), q[:, :, t:t + 1], rtol=0, atol=0)
    v = k[0, 0, 0]
    scale = (v.max() - v.min()) / 15  # asymmetric int4: one scale and zero over head_dim
    assert float((q[0, 0, 0] - v).abs().max()) <= float(scale) / 2 + 1e-6


def test_quantized_attention_with_a_cache_matches_the_full_forward():
    require_shared()
    model = stories260k()
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp = model(ids).logits
    kv = KVCacheQuant(model, kv_spec(4))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :16], use_cache=True)
        steps = [out.logits[:, -1]]
        past = out.past_key_values
        for t in range(16, 24):  # one token at a time through the cache
            out = model(ids[:, t:t + 1], cache=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 15:23], rtol=1e-4, atol=1e-4)
    assert float((full - fp).abs().max()) > 1e-2 and kv.calls > 0
    assert kv.report([256])["keys"].startswith("after RoPE")


def test_cache_bytes_arithmetic():
    require_shared()
    cfg = stories260k().config
    layers, heads, dim = 5, 4, 8  # stories260K: 5 layers, 4 KV heads of 8
    got = cache_bytes(cfg, 256, kv_spec(4))
    assert got["bytes"] == 2 * layers * heads * 256 * (dim * 4 + 16 + 4) / 8  # codes + fp16 scale + int4 zero
    assert cache_bytes(cfg, 256, kv_spec(8, "fp8_e4m3"))["bytes"] == 2 * layers * heads * 256 * (dim * 8 + 16) / 8
    assert cache_bytes(cfg, 256, None)["bytes"] == 2 * layers * heads * 256 * dim * 2


def test_report_refuses_a_model_that_never_called_it():
    require_shared()
    kv = KVCacheQuant(copy.deepcopy(stories260k()), kv_spec(8))
    with pytest.raises(RuntimeError, match="no attention call"):
        kv.report([64])


@pytest.mark.parametrize("over,msg", [(["eval.kv_cache.bits=3", "eval.kv_cache.qformat=fp8_e4m3"], "bits=3"),
                                      (["eval.kv_cache.bits=4", "eval.kv_cache.qformat=nf4"], "qformat=nf4"),
                                      (["eval.kv_cache.bits=4", "eval.kv_cache.contexts=[0]"], "contexts")])
def test_bad_kv_settings_are_one_line_errors(over, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=fp16", *over]))
    assert "\n" not in str(e.value)


def test_run_records_kv_cache(tmp_path):
    require_shared()
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", "logger=none", "eval.max_chunks=4", "method=fp16",
                       "eval.kv_cache.bits=8", "eval.kv_cache.qformat=fp8_e4m3", "eval.kv_cache.contexts=[4096]",
                       "skip_done=false"])
    cfg.paths.results = str(tmp_path / "results")
    cfg.out_dir = str(tmp_path / "run")
    m = run(cfg)
    assert m["run"]["tag"] == "fp16-kv8-fp8_e4m3"
    kv = m["kv_cache"]
    assert kv["attention_calls"] > 0 and [c["context"] for c in kv["cache"]] == [256, 512, 4096]
    p = m["ppl"]["wikitext2"]
    assert p["fp_ppl"] is not None and p["ppl"] != p["fp_ppl"] and abs(p["ppl"] / p["fp_ppl"] - 1) < 0.1
