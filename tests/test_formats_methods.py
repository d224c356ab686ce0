"""The formats through the methods and modules unchanged: GPTQ on an identity Hessian rounds like RTN for every
format (fitted ones included), GPTQ beats RTN's output error, palette fine-tuning never hurts, packed layers decode
exactly what fake-quant does (coded scales, palettes) and their bytes are the arithmetic plus container padding,
and AWQ runs each format."""
import pytest
import torch

from methods.awq import awq_search_clip, clipped_qtensor
from methods.gptq import gptq_quantize
from qresearch.calib.stats import accumulate_hessian, output_sq_error
from qresearch.eval.footprint import layer_bits
from qresearch.nn.packed import QuantLinear
from qresearch.quant import quantize_tensor, weight_spec
from qresearch.quant.codebook import finetune_lut
from qresearch.records import LayerResult

SPECS = [weight_spec(4, 32, False, "int", 6), weight_spec(8, -1, True, "fp8_e4m3"), weight_spec(8, 32, True, "fp8_e5m2"),
         weight_spec(4, 32, True, "fp4_e2m1"), weight_spec(4, 32, True, "mxfp4"), weight_spec(4, 16, True, "nvfp4"),
         weight_spec(4, 32, True, "nf4"), weight_spec(3, -1, True, "kmeans"), weight_spec(2, 32, True, "kmeans"),
         weight_spec(4, 0, True, "kmeans"), weight_spec(1, -1, True, "binary"), weight_spec(2, -1, True, "ternary"),
         weight_spec(2, 32, True, "ternary", 8, "tensor")]
IDS = [s.tag for s in SPECS]


def _data(out=24, inp=96, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    H, _ = accumulate_hessian(None, 0, x)
    return torch.randn(out, inp, generator=g), H


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_identity_hessian_gptq_rounds_like_rtn(spec):
    w, _ = _data()
    q, _ = gptq_quantize(w, torch.eye(w.shape[1]), spec, blocksize=32)
    ref = quantize_tensor(w, spec)
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scale, ref.scale)
    assert (q.lut is None) == (ref.lut is None) and (q.lut is None or torch.equal(q.lut, ref.lut))
    assert (q.scale2 is None) == (ref.scale2 is None) and (q.scale2 is None or torch.equal(q.scale2, ref.scale2))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_output_error(spec, act_order):
    """Plain, and act-order with static groups (fitted on the unquantized weights, contiguous: no g_idx)."""
    w, H = _data()
    q, _ = gptq_quantize(w, H, spec, blocksize=32, act_order=act_order, static_groups=act_order)
    assert q.g_idx is None
    rtn = quantize_tensor(w, spec)
    assert output_sq_error(w, q.dequantize(), H) < output_sq_error(w, rtn.dequantize(), H)


@pytest.mark.parametrize("group", [-1, 32, 0])
@pytest.mark.parametrize("act_order", [False, True])
def test_palette_finetuning_lowers_output_error(group, act_order):
    w, H = _data()
    q, _ = gptq_quantize(w, H, weight_spec(3, group, True, "kmeans"), act_order=act_order)
    ft = finetune_lut(w, H, q)
    assert output_sq_error(w, ft.dequantize(), H) < output_sq_error(w, q.dequantize(), H)
    assert ft.lut.shape == q.lut.shape and torch.equal(ft.lut, ft.lut.sort(dim=-1).values)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_packed_layer_decodes_like_fake_and_counts_its_bytes(spec):
    w, H = _data(out=24, inp=80)  # 80: a partial last group at 32
    q, _ = gptq_quantize(w, H, spec)
    lin = torch.nn.Linear(80, 24, bias=False)
    lin.weight.data = w
    m = QuantLinear.from_result(lin, LayerResult(q))
    x = torch.randn(5, 80, generator=torch.Generator().manual_seed(1))
    fp16_scales = not m.meta.scale_coding.coded and m.scales is not None
    ref = x @ (q.dequantize() if not fp16_scales else _fp16_scaled(q)).T
    torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-5)
    arith = sum(layer_bits(LayerResult(q)).values()) / 8
    words = 24 * (-(-80 * m.meta.bits // 32)) * 4 - 24 * 80 * m.meta.bits / 8  # int32 row padding of the codes
    coded = m.scales is not None and m.meta.scale_coding.coded  # uint8 containers for < 8-bit scale codes
    scale_pad = m.scales.numel() * (8 - m.meta.scale_coding.bits) / 8 if coded else 0
    assert m.weight_bytes() == pytest.approx(arith + words + scale_pad)


def _fp16_scaled(q):
    from qresearch.quant.primitives import QTensor

    return QTensor(q.codes, q.scale.half().float(), q.zero, q.spec, q.g_idx, q.lut, q.scale2).dequantize()


@pytest.mark.parametrize("spec", [s for s in SPECS if s.granularity != "tensor"], ids=lambda s: s.tag)
def test_awq_clip_search_never_worse_than_no_clip(spec):
    w, H = _data()
    mx = awq_search_clip(w, H / 2, spec, n_grid=10, max_shrink=0.5)
    clipped, plain = clipped_qtensor(w, spec, mx), clipped_qtensor(w, spec)
    assert output_sq_error(w, clipped.dequantize(), H) <= output_sq_error(w, plain.dequantize(), H) * (1 + 1e-6)


@pytest.mark.parametrize("over,tag", [(["method=gptq", "qformat=nvfp4", "group_size=16", "modules=packed"],
                                       "gptq-w4g16-nvfp4-packed"),
                                      (["method=awq", "qformat=kmeans", "bits=3", "group_size=-1"], "awq-w3g-1-kmeans"),
                                      (["method=rtn", "bits=4", "scale_bits=6", "scale_level2=tensor"],
                                       "rtn-w4g128-s6t")])
def test_formats_run_end_to_end(tmp_path, over, tag):
    from qresearch.runner import run
    from tests.conftest import DATA, require_shared
    from tests.helpers import compose_cfg

    require_shared()
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", "logger=none", "eval.max_chunks=3",
                       "data.n_samples=4", "data.seqlen=64", "skip_done=false", *over])
    cfg.paths.results = str(tmp_path / "results")
    cfg.out_dir = str(tmp_path / "run")
    m = run(cfg)
    assert m["run"]["tag"] == tag
    assert 1 < m["ppl"]["wikitext2"]["ppl"] < 3 * m["ppl"]["wikitext2"]["fp_ppl"]
    if "modules=packed" in over:
        assert set(m["kernels"]) == {"torch_ref_w4a16"} and m["footprint"]["measured_packed_bytes"] > 0
