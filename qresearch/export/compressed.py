"""Export weight-only results (RTN / GPTQ / AWQ) to the compressed-tensors "pack-quantized" format, which
transformers (CompressedTensorsHfQuantizer) and vLLM load.

Our int32_k layout is bit-for-bit the compressed-tensors packing (codes stored as signed value + 2^(b-1), dense
little-endian stream along `in`; zero points streamed along `out`), so codes and zeros are copied. Per layer:
  <name>.weight_packed int32 [out, ceil(in*b/32)], <name>.weight_scale [out, n_groups] (model dtype),
  <name>.weight_zero_point int32 [ceil(out*b/32), n_groups] (asymmetric), <name>.weight_shape int64 [2].
These are the names, shapes, dtypes and packing compressed-tensors' own PackedQuantizationCompressor writes
(tests/test_export_load.py compresses a model with it and compares tensor by tensor).

Asymmetric checkpoints carry `"dequantize": true` in their quantization_config. With compressed-tensors 0.20
and transformers 5, a plain `AutoModelForCausalLM.from_pretrained(dir)` of *any* asymmetric pack-quantized
checkpoint (the library's own output included) fails: the loader allocates unpacked zero points [out, n_groups]
(the meta-tensor path of PackedQuantizationCompressor.compress does not pack them) while the files hold packed
ones [ceil(out*b/32), n_groups]. With the flag, transformers dequantizes the weights while loading (it would
decompress them on the first forward anyway); vLLM and compressed-tensors ignore the key and read the packed
tensors as they are.

Limits of compressed-tensors 0.20 (refused with a clear error, never silently changed; check_exportable says so
before a model loads): group strategy needs in_features % group_size == 0 (no partial last group), act-order
group indices are not applied on load, activation quantization and fp outlier columns are not weight-only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.checkpoint import quantized_layers
from ..models.st_writer import write_safetensors
from ..nn.packed import QuantLinear
from ..quant.formats import get_format


def _scheme(m: QuantLinear, name: str) -> dict:
    """compressed-tensors weight QuantizationArgs for one layer (raises ConfigError when not expressible)."""
    meta = m.meta
    why = None
    ct_type = get_format(meta.qformat).ct_type
    if ct_type != "int":
        why = f"qformat={meta.qformat} (compressed-tensors type {ct_type}) is not an integer format"
    elif m.act is not None or m.fp_cols is not None:
        why = "activation quantization / outlier columns are not weight-only"
    elif m.g_idx is not None:
        why = "act-order group indices are not applied by compressed-tensors' pack-quantized loader"
    elif meta.group != meta.in_features and meta.in_features % meta.group:
        why = f"in_features={meta.in_features} is not a multiple of group={meta.group} (partial last group)"
    if why:
        raise ConfigError(f"{name}: cannot export to compressed-tensors pack-quantized: {why}; "
                          f"use qresearch.export.save_quantized (our format) instead")
    per_channel = meta.group == meta.in_features
    return {"num_bits": meta.bits, "type": ct_type, "symmetric": meta.sym, "dynamic": False,
            "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else meta.group,
            "actorder": None, "observer": "minmax"}


def _groups(layers: dict[str, QuantLinear]) -> dict:
    """One config group per distinct weight scheme, targeting its layers by exact module name."""
    groups: dict[str, dict] = {}
    for name, m in layers.items():
        w = _scheme(m, name)
        key = json.dumps(w, sort_keys=True)
        g = groups.setdefault(key, {"targets": [], "weights": w, "input_activations": None,
                                    "output_activations": None, "format": "pack-quantized"})
        g["targets"].append(name)
    return {f"group_{i}": g for i, g in enumerate(groups.values())}


def save_compressed_tensors(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write a packed model (modules=packed) as a compressed-tensors pack-quantized HF checkpoint."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers; swap_linears(model, result, 'packed') first")
    groups = _groups(layers)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    tensors, seen = {}, {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers:
            continue
        key = (t.data_ptr(), t.shape)
        if key in seen and getattr(model.config, "tie_word_embeddings", False):
            continue  # tied head: stored once, like save_pretrained
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    for name, m in layers.items():
        tensors[f"{name}.weight_packed"] = m.qweight.contiguous()
        tensors[f"{name}.weight_scale"] = m.scales.to(dtype).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if m.qzeros is not None:
            tensors[f"{name}.weight_zero_point"] = m.qzeros.contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    cfg = model.config.to_dict()
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": groups, "ignore": linears, "kv_cache_scheme": None, "sparsity_config": {}}
    if any(not g["weights"]["symmetric"] for g in groups.values()):
        cfg["quantization_config"]["dequantize"] = True  # see the module docstring
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
