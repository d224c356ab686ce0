"""Export of the new formats: FP8 E4M3 (float-quantized), MXFP4 and NVFP4 (compressed-tensors 0.20's fp4 packings)
reload in transformers with matching logits; formats compressed-tensors cannot hold are refused by config.plan (one
line, before anything loads); every format round-trips exactly through our qresearch-packed checkpoint."""
import warnings

import pytest
import torch

from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.export import load_quantized, save_compressed_tensors, save_quantized
from qresearch.kernels.reference import dequant_weight
from qresearch.nn.packed import QuantLinear
from qresearch.nn.swap import swap_linears
from qresearch.quant import quantize_tensor, weight_spec
from qresearch.records import LayerResult, QuantResult

from .conftest import DATA
from .helpers import compose_cfg


def _tiny(seed=0):
    """A tiny Llama whose linear widths (64, 128) are multiples of the MX / NV blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _packed(spec):
    model = _tiny()
    res = QuantResult({n: LayerResult(quantize_tensor(m.weight.data, spec)) for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and "layers" in n})
    swap_linears(model, res, "packed")
    return model


def _logits(model):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("qformat,bits,group", [("fp8_e4m3", 8, -1), ("fp8_e4m3", 8, 32), ("mxfp4", 4, 32),
                                                ("nvfp4", 4, 16)])
def test_compressed_tensors_float_formats_reload_in_transformers(tmp_path, qformat, bits, group):
    """fp8 / mxfp4 reload to identical weights and logits. NVFP4: compressed-tensors decompresses to bf16, so its
    weights equal ours rounded to bf16, and its logits equal ours computed with those weights. Loaded decompressed
    (dequantize=True, dense weights to compare); fp8 also runs compressed (the default) to the same logits."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = _packed(weight_spec(bits, group, True, qformat))
    save_compressed_tensors(model, tmp_path / "ct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        if qformat == "fp8_e4m3":
            compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
            torch.testing.assert_close(_logits(compressed), _logits(model), rtol=0, atol=1e-5)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            ours = dequant_weight(m.meta, m.qweight, m.scales, m.qzeros, None, m.scale2, m.lut)
            theirs = hf.get_submodule(name).weight.data.float()
            expect = ours.bfloat16().float() if qformat == "nvfp4" else ours
            assert torch.equal(theirs, expect), name
            if qformat == "nvfp4":  # our model with their (bf16-rounded) weights, for the logits comparison
                m.qweight, m.scales = None, None
                lin = torch.nn.Linear(m.in_features, m.out_features, bias=False)
                lin.weight.data = theirs
                model.set_submodule(name, lin)
    for m in hf.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.float()  # decompressed fp4 weights arrive in bf16
    torch.testing.assert_close(_logits(hf), _logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("over,msg", [(["qformat=fp8_e5m2", "bits=8"], "qformat=fp8_e5m2 has no compressed-tensors"),
                                      (["qformat=fp4_e2m1"], "qformat=fp4_e2m1"), (["qformat=nf4"], "qformat=nf4"),
                                      (["qformat=kmeans", "bits=3"], "qformat=kmeans"),
                                      (["qformat=binary", "bits=1"], "qformat=binary"),
                                      (["qformat=ternary", "bits=2"], "qformat=ternary"),
                                      (["scale_bits=8"], "two-level integer scales"),
                                      (["method=gptq", "method.gptq.act_order=true"], "act-order")])
def test_plan_refuses_what_compressed_tensors_cannot_hold(over, msg):
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", "method=rtn", "modules=packed",
                       "export=compressed_tensors", *over])
    with pytest.raises(ConfigError, match=msg) as e:
        plan(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", [weight_spec(4, 16, True, "nvfp4"), weight_spec(4, 32, True, "nf4"),
                                  weight_spec(3, -1, True, "kmeans"), weight_spec(4, 0, True, "kmeans"),
                                  weight_spec(1, -1, True, "binary"), weight_spec(4, 32, False, "int", 6, "tensor")],
                         ids=lambda s: s.tag)
def test_qresearch_checkpoint_round_trips_every_format(tmp_path, spec):
    model = _packed(spec)
    save_quantized(model, tmp_path / "q")
    again = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(again), _logits(model))
