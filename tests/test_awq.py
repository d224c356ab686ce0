"""AWQ: folding keeps the FP function on every table architecture; searches beat plain RTN; artifacts reload."""
import pytest
import torch

from methods.awq import AWQ, act_scales, awq_search_clip, awq_search_scales, clipped_qtensor, pseudo_quantize
from qresearch.method import Context
from qresearch.models.arch import arch_for, block_linears, blocks_of
from qresearch.calib.fold import fold_scales, pair_channels
from qresearch.quant import weight_spec
from qresearch.quant.spec import ConfigError
from qresearch.artifacts import save_artifacts
from tests.pipeline_helpers import TINY, tiny_model


@pytest.mark.parametrize("kind", sorted(TINY))
def test_folding_random_scales_keeps_fp_outputs(kind):
    model = tiny_model(kind)
    arch = arch_for(model)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    folded = 0
    for block in blocks_of(model, arch):
        for pair in arch.pairs:
            c = pair_channels(block, pair)
            if c is not None:
                fold_scales(block, pair, torch.rand(c) * 4 + 0.1)
                folded += 1
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert folded >= 2 * len(blocks_of(model, arch))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_v_to_o_pair_skipped_under_gqa_and_used_with_mha():
    gqa, mha = tiny_model("llama"), tiny_model("llama_mha")
    pair = [p for p in arch_for(gqa).pairs if p.prev == "self_attn.v_proj"][0]
    assert pair_channels(blocks_of(gqa, arch_for(gqa))[0], pair) is None
    assert pair_channels(blocks_of(mha, arch_for(mha))[0], pair) == 64


def _outlier_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, :4] *= 30  # a few salient channels, as in LLM activations
    return x


def test_scale_search_beats_rtn_on_salient_channels():
    x, w, spec = _outlier_inputs(), torch.randn(64, 128), weight_spec(3, 64, False)
    loss = lambda cand: float(((x @ w.T - x @ cand[0].T) ** 2).mean())  # noqa: E731
    s, alpha, losses = awq_search_scales(loss, x.abs().mean(0), [w], spec, n_grid=20)
    assert len(losses) == 20 and losses[0] == pytest.approx(loss([pseudo_quantize(w, spec)]))  # alpha 0 = RTN
    assert alpha > 0 and min(losses) < 0.8 * losses[0]
    torch.testing.assert_close(s, act_scales(x.abs().mean(0), alpha))


def test_clip_search_reduces_output_error():
    x, spec = torch.randn(4096, 128), weight_spec(3, 64, False)
    w = torch.randn(32, 128)
    w[:, ::17] *= 6  # heavy-tailed weights: clipping helps
    mx = awq_search_clip(w, x.T @ x / len(x), spec)
    err = lambda q: float(((x @ (w - q.dequantize()).T) ** 2).sum())  # noqa: E731
    assert mx.shape == (32, 2)
    assert err(clipped_qtensor(w, spec, mx)) < err(clipped_qtensor(w, spec))


@pytest.mark.parametrize("kind", ["llama_mha", "opt"])
def test_awq_method_reload_and_fp_function(kind, tmp_path):
    ids = torch.randint(0, 128, (4, 32))
    model = tiny_model(kind)
    arch = arch_for(model)
    with torch.no_grad():
        ref = model(input_ids=ids[:1]).logits
    res = AWQ(bits=3, group_size=32, search_samples=2, batch_size=2).quantize(
        model, Context(calib=ids, arch=arch, device=torch.device("cpu")))
    with torch.no_grad():  # folding alone keeps the FP model's function
        torch.testing.assert_close(model(input_ids=ids[:1]).logits, ref, rtol=1e-4, atol=1e-4)
    assert len(res.layers) == 2 * len(block_linears(blocks_of(model, arch)[0], arch)) and any(k.endswith(".scales") for k in res.artifacts)
    assert any(r.stats["alpha"] not in (None, 0.0) for r in res.layers.values())
    save_artifacts(tmp_path / "a.safetensors", res.artifacts)
    again = AWQ(bits=3, group_size=32, load_artifacts=str(tmp_path / "a.safetensors"), batch_size=2).quantize(
        tiny_model(kind), Context(calib=ids, arch=arch, device=torch.device("cpu")))
    for name, r in res.layers.items():
        assert torch.equal(again.layers[name].weight.codes, r.weight.codes), name


def test_awq_bad_options():
    with pytest.raises(ConfigError, match="max_shrink"):
        AWQ(max_shrink=1.5)
    with pytest.raises(ConfigError, match="search_samples=0"):
        AWQ(search_samples=0)
