"""qresearch/nn/fused.py: q/k/v and gate/up of packed models fused into one packed layer each."""
import pytest
import torch

from methods.rtn import RTN
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.nn.fused import FusedSlice, fuse_siblings, is_fused
from qresearch.nn.packed import QuantLinear, packed_weight_bytes
from qresearch.nn.swap import swap_linears
from tests.pipeline_helpers import stories260k, tiny_model


def packed(model, **rtn):
    result = RTN(**rtn).quantize(model, Context(calib=None, arch=arch_for(model), device=torch.device("cpu")))
    swap_linears(model, result, "packed")
    return model


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rtn", [dict(bits=4, group_size=32, sym=False),  # asym: zero codes repacked along out
                                 dict(bits=3, group_size=-1, sym=False),  # 3-bit codes straddle words
                                 dict(bits=8, group_size=-1, sym=True, act_bits=8, act_granularity="token")])
def test_fused_model_gives_the_unfused_logits(rtn):
    """stories260K (GQA: k/v narrower than q): every q/k/v and gate/up group fused; one token (decode): the same
    logits bit for bit (the CPU kernels' per-row sums do not depend on the number of rows there); 18 tokens:
    within fp32 rounding (the many-row kernels block rows by the layer's width)."""
    model = packed(stories260k(), **rtn)
    arch = arch_for(model)
    one = IDS[:1, :1]
    with torch.no_grad():
        want, want1 = model(IDS).logits, model(one).logits
    bytes_before = packed_weight_bytes(model)
    used = fuse_siblings(model, arch)
    n_blocks = model.config.num_hidden_layers
    assert sum(v.endswith("+fused") for v in used.values()) == 5 * n_blocks, used
    assert is_fused(model)
    # the same codes and scales; zero codes packed densely along the fused rows can save a word's padding
    assert 0 <= bytes_before - packed_weight_bytes(model) < 4 * 2 * n_blocks * model.config.hidden_size
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4 * n_blocks  # qkv, o, gate_up, down
    with torch.no_grad():
        got, got1 = model(IDS).logits, model(one).logits
    assert torch.equal(got1, want1)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    with torch.inference_mode():  # inference tensors keep no version counter: the product still runs once per input
        assert torch.equal(model(IDS).logits, got) and torch.equal(model(one).logits, got1)


def test_groups_that_cannot_be_fused_are_left_with_the_reason():
    """Mixed bit widths in q/k/v (a bits_map): that group stays unfused, gate/up still fuse; outputs unchanged."""
    model = packed(tiny_model("llama"), bits=4, group_size=32, sym=False)
    w8 = packed(tiny_model("llama"), bits=8, group_size=32, sym=False)
    model.model.layers[0].self_attn.k_proj = w8.model.layers[0].self_attn.k_proj  # one member at another width
    with torch.no_grad():
        want = model(IDS).logits
    used = fuse_siblings(model, arch_for(model))
    assert used["model.layers.0.self_attn.q_proj+self_attn.k_proj+self_attn.v_proj"].startswith(
        "not fused: weight formats differ")
    assert isinstance(model.model.layers[1].self_attn.k_proj, FusedSlice)
    assert isinstance(model.model.layers[0].mlp.up_proj, FusedSlice)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, FusedSlice)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, want)


def test_product_runs_once_per_input_and_holds_nothing_after():
    """One fused call per input tensor; an input modified in place in between is recomputed; once every member
    took its slice the product keeps no tensors."""
    model = packed(tiny_model("llama"), bits=4, group_size=32, sym=False)
    fuse_siblings(model, arch_for(model))
    attn = model.model.layers[0].self_attn
    product = attn.q_proj.fused
    calls = []
    product.layer.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 64)
    with torch.no_grad():
        q, k = attn.q_proj(x), attn.k_proj(x)
        assert len(calls) == 1 and product._last is not None
        v = attn.v_proj(x)
        assert len(calls) == 1 and product._last is None
        ref = product.layer(x)
        assert torch.equal(torch.cat([q, k, v], -1), ref)
        calls.clear()
        attn.q_proj(x)
        x.mul_(2.0)  # same tensor object, new contents: k recomputes
        k2 = attn.k_proj(x)
    assert len(calls) == 2 and torch.equal(k2, product.layer(x)[:, q.shape[1]:q.shape[1] + k.shape[1]])


def test_fused_model_moves_as_one_and_is_not_exported(tmp_path):
    """`.to()` reaches the shared product through its owner; the exporters refuse a fused model (they write
    unfused layers)."""
    from qresearch.export.packed import save_quantized

    model = packed(tiny_model("llama"), bits=4, group_size=32, sym=False)
    fuse_siblings(model, arch_for(model))
    model.to(torch.float64).to(torch.float32)  # buffers of the shared product converted once, through the owner
    k = model.model.layers[0].self_attn.k_proj
    assert k.fused is model.model.layers[0].self_attn.q_proj.product
    with pytest.raises(ValueError, match="fused"):
        save_quantized(model, tmp_path / "export")


def test_fuse_knob_is_checked_before_any_loading_and_tags_the_run():
    from qresearch.config import plan
    from qresearch.quant.spec import ConfigError
    from qresearch.tracking.store import config_hash, hashed

    from .conftest import DATA
    from .helpers import compose_cfg

    base = ["method=rtn", "model=stories260k", f"data.root={DATA}"]
    with pytest.raises(ConfigError, match="fuse=true fuses packed layers; run it with modules=packed"):
        plan(compose_cfg([*base, "fuse=true"]))
    with pytest.raises(ConfigError, match="fuse=true with export=qresearch"):
        plan(compose_cfg([*base, "fuse=true", "modules=packed", "export=qresearch"]))
    p = plan(compose_cfg([*base, "fuse=true", "modules=packed"]))
    assert p.fuse and p.tag.endswith("-packed-fused")
    cfg = compose_cfg([*base, "modules=packed"])
    assert "fuse" not in hashed(dict(cfg)) and "/rtn-w4g128-packed/" in cfg.out_dir  # earlier runs keep their hash
    fused = compose_cfg([*base, "modules=packed", "fuse=true"])
    assert config_hash(hashed(dict(fused))) != config_hash(hashed(dict(cfg))) and "-packed-fused/" in fused.out_dir


def test_fused_run_matches_the_packed_run(results_dir):
    """run.py ... modules=packed fuse=true: the fused kernels recorded per layer, perplexity within float rounding
    of the unfused packed run."""
    import json

    from .conftest import DATA, require_shared
    from .helpers import run_cli, run_dirs

    require_shared()
    common = ["model=stories260k", "method=rtn", "bits=4", f"data.root={DATA}", "logger=none", "modules=packed",
              "eval.max_chunks=4", "eval.baseline=false", "skip_done=false"]
    for extra in ([], ["fuse=true"]):
        r = run_cli(*common, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    runs = {m["run"]["tag"]: m for m in (json.loads((d / "metrics.json").read_text()) for d in run_dirs(results_dir))}
    plain, fused = runs["rtn-w4g128-packed"], runs["rtn-w4g128-packed-fused"]
    assert fused["kernels"] == {"c_lowbit_w4a16": 10, "c_lowbit_w4a16+fused": 25}, fused["kernels"]
    p0, p1 = plain["ppl"]["wikitext2"]["ppl"], fused["ppl"]["wikitext2"]["ppl"]
    assert abs(p1 - p0) / p0 < 1e-6, (p0, p1)


@pytest.mark.parametrize("kind,fused", [("qwen2", 10), ("opt", 6), ("gpt_neox", 0)])
def test_other_architectures_fuse_their_sibling_groups(kind, fused):
    """Qwen2 (q/k/v with biases), OPT (q/k/v with biases, fc1/fc2 not siblings), GPT-NeoX (q/k/v already one
    linear): what the table's groups allow is fused, logits unchanged."""
    model = packed(tiny_model(kind), bits=4, group_size=32, sym=False)
    with torch.no_grad():
        want = model(IDS).logits
        used = fuse_siblings(model, arch_for(model))
        got = model(IDS).logits
    assert sum(v.endswith("+fused") for v in used.values()) == fused
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_a_group_with_an_unquantized_member_stays_unfused():
    """A member left as a float nn.Linear (a bits map keeping it at 16 bits): the group is reported, not fused."""
    model = packed(tiny_model("llama"), bits=4, group_size=32, sym=False)
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    used = fuse_siblings(model, arch_for(model))
    assert used["model.layers.0.mlp.gate_proj+mlp.up_proj"] == "not fused: Linear is not a packed layer"
    assert isinstance(model.model.layers[1].mlp.up_proj, FusedSlice)
