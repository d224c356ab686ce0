"""Export / reload: our qresearch-packed format reloads to identical logits; the compressed-tensors
pack-quantized export loads in transformers on CPU and reproduces our logits."""
import json

import pytest
import torch

from qresearch.export import is_qresearch_checkpoint, load_quantized, save_compressed_tensors, save_quantized
from qresearch.nn.swap import swap_linears
from qresearch.quant.spec import ConfigError
from tests._qhelpers import shared_dir
from tests.test_quantlinear import rtn_result


def _packed_stories(bits=4, group=128, sym=False, act_order_layer=None):
    from transformers import AutoModelForCausalLM

    path = shared_dir() / "models" / "stories260K"
    if not path.is_dir():
        pytest.fail(f"stories260K not found at {path}; set QRESEARCH_SHARED")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = rtn_result(model, bits, group, sym)
    if act_order_layer:  # a permuted group index exercises the g_idx buffer
        res = result.layers[act_order_layer]
        in_f = res.weight.codes.shape[1]
        res.weight.g_idx = (torch.arange(in_f) // res.weight.spec.group_for(in_f))[torch.randperm(in_f)].to(torch.int32)
    swap_linears(model, result, "packed")
    return model


def _logits(model, seed=0):
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(seed))  # [batch, seq]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_qresearch_format_reloads_identically(tmp_path):
    model = _packed_stories(4, 128, False, act_order_layer="model.layers.1.mlp.down_proj")  # 172: partial group
    save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["config.json", "model.safetensors"]
    assert is_qresearch_checkpoint(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["layers"]["model.layers.1.mlp.down_proj"]["g_idx"] and qc["layout"] == "int32_k"
    again = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(again), _logits(model))
    assert "kernel=torch_ref_w4a16" in repr(again.get_submodule("model.layers.0.mlp.up_proj"))


def test_qresearch_loader_refuses_other_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config":
                                                      {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="not a qresearch-packed"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("bits,group,sym", [(4, -1, True), (4, 4, True), (4, 4, False), (8, -1, False)])
def test_compressed_tensors_loads_in_transformers(tmp_path, bits, group, sym):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = _packed_stories(bits, group, sym)  # group 4 divides both 64 and 172
    save_compressed_tensors(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert qc.get("dequantize", False) == (not sym)  # asymmetric: see export/compressed.py
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()  # a plain load
    ours, theirs = _logits(model), _logits(hf)
    assert (theirs - ours).abs().max() <= 1e-4 * ours.abs().max()


def test_compressed_tensors_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(ConfigError, match="partial last group"):
        save_compressed_tensors(_packed_stories(4, 128, True), tmp_path / "a")
