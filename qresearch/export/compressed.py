"""Export weight-only results (RTN / GPTQ / AWQ) to compressed-tensors checkpoints, which transformers
(CompressedTensorsHfQuantizer) and vLLM load: integers as "pack-quantized", FP8 E4M3 as "float-quantized", MXFP4 and
NVFP4 as "mxfp4-pack-quantized" / "nvfp4-pack-quantized" (`CT_FORMATS`). Other formats are refused (`refusal`, checked
by config.plan before any quantization work).

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
from ..models.checkpoint import SOURCE_KEY, quantized_layers
from ..models.st_writer import write_safetensors
from ..nn.packed import QuantLinear
from ..quant.packing import unpack_rows
from ..quant.spec import QuantSpec


# qformat -> (compressed-tensors format, weight QuantizationArgs.type); the four a compressed-tensors 0.20 checkpoint
# can hold: integers (pack-quantized), FP8 E4M3 (float-quantized), MXFP4 (group 32, E8M0 scales) and NVFP4
# (group 16, FP8 E4M3 scales + an FP32 global scale). FP8 E5M2 (compressed-tensors' 8-bit float is E4M3), FP4 E2M1
# with 16-bit scales, NF4, k-means palettes, binary / ternary codes and two-level integer scales have no equivalent.
CT_FORMATS = {"int": ("pack-quantized", "int"), "fp8_e4m3": ("float-quantized", "float"),
              "mxfp4": ("mxfp4-pack-quantized", "float"), "nvfp4": ("nvfp4-pack-quantized", "float")}


def refusal(spec: QuantSpec) -> str | None:
    """Why weights of `spec` cannot be written as compressed-tensors (None: they can); checked in config.plan."""
    if spec.qformat not in CT_FORMATS:
        return (f"qformat={spec.qformat} has no compressed-tensors format (it holds: {', '.join(CT_FORMATS)})")
    coding = spec.format.scale_coding(spec)
    if coding.kind == "uint":
        return f"two-level integer scales (scale_bits={spec.scale_bits}) have no compressed-tensors equivalent"
    if spec.granularity == "tensor":
        return "a per-tensor weight grid is not exported"
    return None


def step_refusal(spec: QuantSpec | None, act: bool, act_order: bool) -> str | None:
    """Why a method step's output cannot be exported (None: it can), from its weight spec, activation quantization
    and act-order group indices."""
    why = None if spec is None else refusal(spec)
    if why is None and act:
        why = "activation quantization is not weight-only"
    if why is None and act_order:
        why = "act-order group indices (gptq act_order without static_groups) are not applied on load"
    return why


def _scheme(m: QuantLinear, name: str) -> tuple[str, dict]:
    """(compression format, weight QuantizationArgs) of one layer (raises ConfigError when not expressible)."""
    meta = m.meta
    why = refusal(meta.spec)
    if why is None and (m.act is not None or m.fp_cols is not None):
        why = "activation quantization / outlier columns are not weight-only"
    elif why is None and m.g_idx is not None:
        why = "act-order group indices are not applied by compressed-tensors' loaders"
    elif why is None and meta.group != meta.in_features and meta.in_features % meta.group:
        why = f"in_features={meta.in_features} is not a multiple of group={meta.group} (partial last group)"
    if why:
        raise ConfigError(f"{name}: cannot export to compressed-tensors: {why}; "
                          f"use qresearch.export.save_quantized (our format) instead")
    fmt, ct_type = CT_FORMATS[meta.qformat]
    per_channel = meta.group == meta.in_features
    strategy = "tensor_group" if meta.qformat == "nvfp4" else "channel" if per_channel else "group"
    return fmt, {"num_bits": meta.bits, "type": ct_type, "symmetric": meta.sym, "dynamic": False,
                 "strategy": strategy, "group_size": None if per_channel else meta.group, "actorder": None,
                 "observer": "minmax"}


def _layer_tensors(name: str, m: QuantLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's tensors in its compressed-tensors format (codes and scales copied, never re-rounded)."""
    meta, out = m.meta, {}
    if meta.qformat == "fp8_e4m3":
        codes = unpack_rows(m.qweight, 8, meta.in_features)  # [out, in] E4M3 bit patterns
        out[f"{name}.weight"] = codes.view(torch.float8_e4m3fn).contiguous()
        out[f"{name}.weight_scale"] = m.scales.to(dtype).contiguous()
    elif meta.qformat in ("mxfp4", "nvfp4"):
        out[f"{name}.weight_packed"] = m.qweight.contiguous().view(torch.uint8)  # two codes per byte, low first
        scales = m.scales.contiguous()  # uint8: E8M0 exponents (mxfp4) / E4M3 bit patterns (nvfp4)
        out[f"{name}.weight_scale"] = scales if meta.qformat == "mxfp4" else scales.view(torch.float8_e4m3fn)
        if meta.qformat == "nvfp4":
            out[f"{name}.weight_global_scale"] = m.scale2.reshape(1).float().contiguous()
    else:
        out[f"{name}.weight_packed"] = m.qweight.contiguous()
        out[f"{name}.weight_scale"] = m.scales.to(dtype).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if m.qzeros is not None:
            out[f"{name}.weight_zero_point"] = m.qzeros.contiguous()
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.contiguous()
    return out


def _groups(layers: dict[str, QuantLinear]) -> dict:
    """One config group per distinct weight scheme, targeting its layers by exact module name."""
    groups: dict[str, dict] = {}
    for name, m in layers.items():
        fmt, w = _scheme(m, name)
        key = json.dumps([fmt, w], sort_keys=True)
        g = groups.setdefault(key, {"targets": [], "weights": w, "input_activations": None,
                                    "output_activations": None, "format": fmt})
        g["targets"].append(name)
    return {f"group_{i}": g for i, g in enumerate(groups.values())}


def save_compressed_tensors(model: nn.Module, path: str | Path, tokenizer=None, source: dict | None = None) -> Path:
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
        tensors.update(_layer_tensors(name, m, dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    cfg = model.config.to_dict()
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    formats = sorted({g["format"] for g in groups.values()})
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups, "ignore": linears, "kv_cache_scheme": None, "sparsity_config": {}}
    if any(not g["weights"]["symmetric"] for g in groups.values()):
        cfg["quantization_config"]["dequantize"] = True  # see the module docstring
    if source is not None:
        cfg[SOURCE_KEY] = source
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
