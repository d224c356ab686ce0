"""Exports load where users load them: compressed-tensors layout = the library's own compressor, plain
`from_pretrained(dir)` on every architecture of the table, byte-identical files across processes, a qresearch
checkpoint whose config disagrees with its tensors refused key by key, and the pre-flight export check."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qresearch.export import load_quantized, save_compressed_tensors, save_quantized
from qresearch.export.check import check_exportable
from qresearch.models.arch import ARCHS, arch_for, linear_in_features, quantizable_linears
from qresearch.nn.packed import QuantLinear
from qresearch.nn.swap import swap_linears
from qresearch.quant.spec import ConfigError
from tests._qhelpers import REPO
from tests.test_export import _packed_stories
from tests.test_quantlinear import rtn_result

TINY = {  # every linear's in_features is a multiple of 16
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "opt": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                 pad_token_id=0),
}


def _tiny(model_type: str, seed=0):
    cfg = AutoConfig.for_model(model_type, vocab_size=128, num_hidden_layers=2, max_position_embeddings=128,
                               **TINY[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _logits(model):
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))  # [batch, seq]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_table_covers_every_architecture():
    assert set(TINY) == set(ARCHS)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_in_features_from_config_match_the_model(model_type):
    model = _tiny(model_type)
    want = linear_in_features(model.config.to_dict())
    arch = arch_for(model)
    got = {n[len(arch.blocks) + 1:].split(".", 1)[1]: lin.in_features
           for n, lin in quantizable_linears(model, arch).items()}
    assert got == want

@pytest.mark.parametrize("model_type", sorted(ARCHS))
@pytest.mark.parametrize("sym", [False, True])
def test_compressed_tensors_plain_load_every_architecture(tmp_path, model_type, sym):
    """The default export (asymmetric) and the symmetric one load with a plain from_pretrained; same logits."""
    pytest.importorskip("compressed_tensors")
    model = _tiny(model_type)
    swap_linears(model, rtn_result(model, 4, 16, sym), "packed")
    save_compressed_tensors(model, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ours, theirs = _logits(model), _logits(hf)
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()


@pytest.mark.parametrize("bits,group,sym", [(4, 16, False), (4, -1, False), (3, 16, False), (8, 16, True)])
def test_compressed_tensors_layout_equals_the_library_compressor(tmp_path, bits, group, sym):
    """Compress the same codes and qparams with compressed-tensors' PackedQuantizationCompressor: every tensor
    it writes (packed codes, scales, packed zero points, shape) equals ours, name by name, bit for bit."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    model = _tiny("llama")
    swap_linears(model, rtn_result(model, bits, group, sym), "packed")
    save_compressed_tensors(model, tmp_path / "ct")
    ours = load_file(str(tmp_path / "ct" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    m: QuantLinear = model.get_submodule(name)
    q = {"weight": m.forward(torch.eye(m.in_features)).T.contiguous()}  # dequantized weight [out, in]
    q["weight_scale"] = m.scales.float()
    if not sym:
        from qresearch.quant.packing import unpack_zeros

        zero = unpack_zeros(m.qzeros, bits, m.out_features)  # [out, n_groups] unsigned
        q["weight_zero_point"] = (zero - 2 ** (bits - 1)).to(torch.int8)  # the library's signed convention
    strategy = "channel" if group == -1 else "group"
    args = QuantizationArgs(num_bits=bits, symmetric=sym, strategy=strategy, group_size=None if group == -1 else group)
    theirs = PackedQuantizationCompressor.compress(q, QuantizationScheme(targets=["Linear"], weights=args))
    keys = {k for k in ours if k.startswith(name + ".")}
    assert keys == {f"{name}.{k}" for k in theirs}, (keys, sorted(theirs))
    for k, v in theirs.items():
        mine = ours[f"{name}.{k}"]
        assert mine.dtype == v.dtype and mine.shape == v.shape, (k, mine.shape, v.shape)
        assert torch.equal(mine.float() if k == "weight_scale" else mine, v.float() if k == "weight_scale" else v), k


_WRITE = """
import hashlib, sys, torch
sys.path.insert(0, {repo!r})
from tests.test_export_load import _tiny
from tests.test_quantlinear import rtn_result
from qresearch.nn.swap import swap_linears
from qresearch.export import save_quantized, save_compressed_tensors
m = _tiny("llama")
swap_linears(m, rtn_result(m, 4, 16, False), "packed")
save_quantized(m, sys.argv[1] + "/q")
save_compressed_tensors(m, sys.argv[1] + "/ct")
"""


def test_exports_are_byte_identical_across_processes(tmp_path):
    """Two processes (different hash seeds) write the same bytes, so a checksum proves a reproduction."""
    digests = []
    for i in range(2):
        out = tmp_path / str(i)
        r = subprocess.run([sys.executable, "-c", _WRITE.format(repo=str(REPO)), str(out)], capture_output=True,
                           text=True, timeout=300, env={"PYTHONHASHSEED": str(i + 1), "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr[-2000:]
        digests.append({f: hashlib.sha256((out / f / "model.safetensors").read_bytes()).hexdigest()
                        for f in ("q", "ct")})
    assert digests[0] == digests[1]
    header_len = int.from_bytes((tmp_path / "0" / "q" / "model.safetensors").read_bytes()[:8], "little")
    meta = json.loads((tmp_path / "0" / "q" / "model.safetensors").read_bytes()[8:8 + header_len])["__metadata__"]
    assert list(meta) == sorted(meta) and len(meta) >= 3  # the multi-key metadata is what used to reorder


def _edit_layer(path, layer, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["layers"][layer].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_qresearch_config_disagreeing_with_tensors_is_refused(tmp_path):
    model = _packed_stories(4, 128, False)
    save_quantized(model, tmp_path / "q")
    load_quantized(tmp_path / "q")  # the untouched export loads
    layer = "model.layers.1.mlp.down_proj"  # in 172: group 128 and group 150 both give 2 groups (same shapes)
    _edit_layer(tmp_path / "q", layer, group=150)
    with pytest.raises(ConfigError) as e:
        load_quantized(tmp_path / "q")
    msg = str(e.value)
    assert "\n" not in msg and layer in msg and "group=150" in msg and "group=128" in msg, msg


def test_qresearch_shape_mismatch_is_named(tmp_path):
    """Without the recorded settings (a file written by other tools), a config that changes shapes is still
    refused, naming the tensor, its stored shape and the shape the config implies."""
    from safetensors.torch import load_file

    from qresearch.models.st_writer import write_safetensors

    model = _packed_stories(4, 128, False)
    save_quantized(model, tmp_path / "q")
    f = tmp_path / "q" / "model.safetensors"
    write_safetensors(f, load_file(str(f)), {"format": "pt"})  # same tensors, no recorded layer settings
    load_quantized(tmp_path / "q")
    layer = "model.layers.0.self_attn.q_proj"  # in 64: 8 int32 words per row at 4 bits, 6 at 3 bits
    _edit_layer(tmp_path / "q", layer, bits=3)
    with pytest.raises(ConfigError, match=rf"{layer}.qweight is I32 \[64, 8\]; the quantization_config implies "
                                          rf"I32 \[64, 6\]"):
        load_quantized(tmp_path / "q")


@pytest.mark.parametrize("kw,needle", [
    (dict(group_size=128), "mlp.down_proj has in_features=172"),
    (dict(group_size=-1, act_bits=8), "act_bits=8"),
    (dict(group_size=4, act_order=True), "act_order=true needs static_groups=true"),
    (dict(group_size=4, bits=16), "bits=16"),
])
def test_check_exportable_refuses_before_loading(kw, needle):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 8}
    with pytest.raises(ConfigError) as e:
        check_exportable("compressed_tensors", cfg, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
    check_exportable("compressed_tensors", cfg, group_size=4, act_order=True, static_groups=True)
    check_exportable("compressed_tensors", cfg, group_size=-1)
    check_exportable("qresearch", cfg, group_size=128, act_order=True, act_bits=8)  # our format stores all of it
    with pytest.raises(ConfigError, match="export='onnx'"):
        check_exportable("onnx", cfg, group_size=128)


def test_config_dict_feeds_the_preflight_without_loading_weights():
    from qresearch.models.load import ModelSpec, config_dict

    from .conftest import STORIES, require_shared

    require_shared()
    cfg = config_dict(ModelSpec("stories260k", "local", str(STORIES)))
    assert cfg["intermediate_size"] == 172
    with pytest.raises(ConfigError, match="in_features=172"):
        check_exportable("compressed_tensors", cfg, group_size=128)
    assert config_dict(ModelSpec("t", "tiny", config={"model_type": "opt", "ffn_dim": 8}))["ffn_dim"] == 8
    assert config_dict(ModelSpec("h", "hub", "no-such-org/no-such-model")) is None  # not cached, no download
