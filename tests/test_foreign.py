"""Other tools' checkpoints under our protocol (issue 16): compressed-tensors (checked against the
compressed-tensors library's own decompression), AutoGPTQ / GPTQModel and AutoAWQ GEMM layouts (checked against
packers written here from the formats' definitions, bit by bit in Python integers), refusals, and a full run."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qresearch.errors import ConfigError
from qresearch.export import save_compressed_tensors
from qresearch.kernels.reference import dequant_weight
from qresearch.models.foreign import load_foreign
from qresearch.models.load import ModelSpec, resolve_path
from qresearch.nn.packed import QuantLinear

from .conftest import DATA, require_shared
from .helpers import compose_cfg
from .test_export import _logits, _packed_stories

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _weights(model):
    return {n: dequant_weight(m.meta, m.qweight, m.scales, m.qzeros, m.g_idx)
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("bits,group,sym", [(4, -1, False), (4, 4, True), (3, 4, False), (8, -1, True)])
def test_compressed_tensors_equals_the_library_decompression(tmp_path, bits, group, sym):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = _packed_stories(bits, group, sym)
    save_compressed_tensors(model, tmp_path / "ct")
    ours = load_foreign(tmp_path / "ct", "compressed_tensors", torch.float32)
    assert torch.equal(_logits(ours), _logits(model))  # same codes, same (fp16-valued) scales
    lib = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32,
                                               quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    for name, w in _weights(ours).items():
        assert torch.equal(w, lib.get_submodule(name).weight.data), name
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    layer = "model.layers.0.mlp.down_proj"
    want = sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith(layer + ".weight_"))
    assert ours.get_submodule(layer).stored_bytes == want


def _stream_words(values: list[int], bits: int) -> list[int]:
    """Dense little-endian bit stream of unsigned `bits`-bit values -> 32-bit words (signed int32 values)."""
    acc = sum(v << (i * bits) for i, v in enumerate(values))
    n = -(-len(values) * bits // 32)
    return [((acc >> (32 * w)) & 0xFFFFFFFF) - (1 << 32) * (((acc >> (32 * w)) >> 31) & 1) for w in range(n)]


def _gptq_pack(codes, zeros, scales, g_idx, bits, fmt):
    """AutoGPTQ layout: qweight [words(in), out] (stream down each output column), qzeros [G, words(out)]
    (zero - 1 in the v1 format), scales [G, out] fp16, g_idx [in] int32."""
    out_f, in_f = codes.shape
    qweight = torch.tensor([_stream_words(codes[o].tolist(), bits) for o in range(out_f)], dtype=torch.int32).t()
    z = (zeros.t().long() - (1 if fmt == "gptq" else 0)) % 2**bits  # [G, out]; v1 keeps zero - 1 (mod 2^b)
    qzeros = torch.tensor([_stream_words(row.tolist(), bits) for row in z], dtype=torch.int32)
    return {"qweight": qweight.contiguous(), "qzeros": qzeros, "scales": scales.t().half().contiguous(),
            "g_idx": g_idx.to(torch.int32)}


def _awq_pack(codes, zeros, scales):
    """AutoAWQ GEMM: qweight [in, out/8], qzeros [G, out/8], column 8w + ORDER[i] in nibble i; scales [G, out]."""
    def pack(vals):  # [rows, out] -> [rows, out/8]
        rows, cols = vals.shape
        words = [[sum(int(vals[r, 8 * w + AWQ_ORDER[i]]) << (4 * i) for i in range(8)) for w in range(cols // 8)]
                 for r in range(rows)]
        return torch.tensor([[x - (1 << 32) * (x >> 31) for x in row] for row in words], dtype=torch.int32)
    return {"qweight": pack(codes.t()), "qzeros": pack(zeros.t().long()), "scales": scales.t().half().contiguous()}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _foreign_folder(path, kind, bits, group, sym=False, act_order=False, fmt="gptq"):
    """A tiny Llama whose linears hold random codes / qparams, written in `kind`'s layout; returns the float model
    with the same dequantized weights (the reference) and the per-layer (codes, zeros, scales, g_idx)."""
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    tensors, layers = {}, {}
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]:
        out_f, in_f = lin.weight.shape
        gs = in_f if group == -1 else group
        n_g = -(-in_f // gs)
        codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
        zeros = torch.full((out_f, n_g), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (out_f, n_g), generator=g)
        scales = (torch.rand(out_f, n_g, generator=g) * 0.02 + 0.001).half().float()
        gi = torch.arange(in_f) // gs
        if act_order:
            gi = gi[torch.randperm(in_f, generator=g)]
        lin.weight.data = (codes - zeros[:, gi]).float() * scales[:, gi]  # the reference dequantization
        packed = _gptq_pack(codes, zeros, scales, gi, bits, fmt) if kind == "gptq" else _awq_pack(codes, zeros, scales)
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        layers[name] = lin.weight.data.clone()
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in layers:
            tensors[k] = v.contiguous()
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    qc = ({"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": sym,
           "checkpoint_format": fmt} if kind == "gptq" else
          {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
    (path / "config.json").write_text(json.dumps({**model.config.to_dict(), "quantization_config": qc}))
    return model, layers


@pytest.mark.parametrize("bits,group,sym,act_order,fmt", [(4, 32, False, False, "gptq"), (3, 32, False, True, "gptq"),
                                                          (4, -1, True, False, "gptq"), (2, 16, False, False, "gptq_v2"),
                                                          (8, 32, False, True, "gptq")])
def test_gptq_layout(tmp_path, bits, group, sym, act_order, fmt):
    ref, layers = _foreign_folder(tmp_path / "g", "gptq", bits, group, sym, act_order, fmt)
    ours = load_foreign(tmp_path / "g", "gptq", torch.float32)
    got = _weights(ours)
    for name, w in layers.items():
        assert torch.equal(got[name], w), name
        m = ours.get_submodule(name)
        assert (m.qzeros is None) == sym and (m.g_idx is not None) == act_order
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5)


def test_awq_gemm_layout(tmp_path):
    ref, layers = _foreign_folder(tmp_path / "a", "awq", 4, 32)
    ours = load_foreign(tmp_path / "a", "awq", torch.float32)
    got = _weights(ours)
    for name, w in layers.items():
        assert torch.equal(got[name], w), name
    assert torch.allclose(_logits(ours), _logits(ref), atol=1e-5)
    m = ours.get_submodule("model.layers.0.mlp.down_proj")  # qweight + qzeros int32, scales fp16
    assert m.stored_bytes == 96 * 8 * 4 + 3 * 8 * 4 + 3 * 64 * 2  # in 96, out 64, 3 groups


@pytest.mark.parametrize("source,qc,match", [
    ("gptq", {"quant_method": "awq", "bits": 4}, "quant_method='awq'; allowed for this source: 'gptq'"),
    ("awq", {"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ bits=4 version='gemv'"),
    ("gptq", {"quant_method": "gptq", "bits": 5, "checkpoint_format": "marlin"}, "checkpoint_format='marlin'"),
    ("compressed_tensors", {"quant_method": "compressed-tensors", "quantization_status": "compressed",
                            "config_groups": {"g": {"format": "int-quantized", "input_activations": {"num_bits": 8},
                                                    "weights": {"type": "int", "num_bits": 8, "strategy": "channel"}}}},
     "activation quantization is not converted"),
    ("compressed_tensors", {"quant_method": "compressed-tensors", "quantization_status": "frozen", "config_groups": {}},
     "quantization_status='frozen'"),
])
def test_refusals_before_loading(tmp_path, source, qc, match):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    with pytest.raises(ConfigError, match=match):
        resolve_path(ModelSpec("m", source, str(tmp_path)))


def test_run_evaluates_a_foreign_checkpoint_with_its_stored_bytes(tmp_path):
    """model.source=compressed_tensors method=fp16 modules=packed: perplexity equals the exported packed model's,
    and the footprint counts the checkpoint's stored bytes of the quantized layers."""
    require_shared()
    from qresearch.runner import run

    model = _packed_stories(4, -1, False)
    save_compressed_tensors(model, tmp_path / "ct")
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    q_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if ".weight_" in k)
    stories = DATA.parent / "models" / "stories260K"
    cfg = compose_cfg(["model=stories260k", "model.source=compressed_tensors", f"model.path={tmp_path / 'ct'}",
                       f"model.tokenizer={stories}",
                       "method=fp16", "modules=packed", f"data.root={DATA}", "logger=none", "eval.max_chunks=4"])
    cfg.paths.results, cfg.out_dir = str(tmp_path / "res"), str(tmp_path / "res" / "run")
    m = run(cfg)
    from qresearch.data.tokens import eval_tokens
    from qresearch.eval.ppl import perplexity
    from transformers import AutoTokenizer

    ids, _ = eval_tokens("wikitext2", "test", str(DATA), AutoTokenizer.from_pretrained(stories), "local")
    want = perplexity(model, ids, 256, torch.device("cpu"), 4)["ppl"]
    assert m["ppl"]["wikitext2"]["ppl"] == pytest.approx(want, rel=1e-6)
    n_other = sum(p.numel() for p in model.parameters())  # the packed model's parameters: all non-quantized
    assert m["footprint"]["weight_bytes"] == q_bytes + 2 * n_other
    n_layers = sum(k.endswith(".weight_shape") for k in stored)
    assert m["footprint"]["measured_packed_bytes"] == q_bytes - 16 * n_layers  # all but weight_shape int64 [2]
    assert m["model"]["source"] == "compressed_tensors" and m["run"]["bits"] == 16


def test_plan_refuses_requantizing_or_fake_modules(tmp_path):
    from qresearch.config import plan

    save_compressed_tensors(_packed_stories(4, -1, False), tmp_path / "ct")
    base = ["model=stories260k", "model.source=compressed_tensors", f"model.path={tmp_path / 'ct'}", f"data.root={DATA}"]
    with pytest.raises(ConfigError, match="already quantized; evaluate it with method=fp16"):
        plan(compose_cfg(base + ["method=rtn", "modules=packed"]))
    with pytest.raises(ConfigError, match="loads packed weights; run it with modules=packed"):
        plan(compose_cfg(base + ["method=fp16", "modules=fake"]))
    assert plan(compose_cfg(base + ["method=fp16", "modules=packed"])).model.source == "compressed_tensors"
