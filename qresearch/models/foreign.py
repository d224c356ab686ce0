"""Checkpoints quantized by other tools, read into our packed QuantLinear buffers so that perplexity, lm-eval,
footprint and latency run through the same code as our own runs (model.source=compressed_tensors | gptq | awq).

Supported (anything else is refused with a one-line ConfigError before loading):
  compressed_tensors  llm-compressor output: format pack-quantized / int-quantized / naive-quantized, integer
                      weights, strategy tensor / channel / group (act-order g_idx kept), no activation quantization
  gptq                AutoGPTQ / GPTQModel HF format (checkpoint_format gptq or gptq_v2), bits 2..8
  awq                 AutoAWQ GEMM (version gemm, zero_point true), 4 bits
Layouts: qresearch/quant/foreign.py. Each QuantLinear gets `stored_bytes`: the bytes of that layer's tensors in the
checkpoint (what the footprint counts), next to the bytes of our own buffers (measured_packed_bytes).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.packed import QuantLinear
from ..nn.swap import set_module
from ..quant.foreign import awq_codes, awq_zeros, contiguous_groups, gptq_codes, gptq_zeros
from ..quant.packing import PACK_BITS, PackedMeta, pack_rows, pack_zeros, unpack_zeros

log = logging.getLogger(__name__)
QUANT_METHOD = {"compressed_tensors": "compressed-tensors", "gptq": "gptq", "awq": "awq"}
FOREIGN = tuple(QUANT_METHOD)
CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")


def quant_config(path: str | Path, source: str) -> dict:
    """The checkpoint's quantization_config, checked against `source` and what we can convert (cheap)."""
    f = Path(path) / "config.json"
    qc = json.loads(f.read_text()).get("quantization_config") if f.is_file() else None
    if not qc or qc.get("quant_method") != QUANT_METHOD[source]:
        raise ConfigError(f"model.source={source} but {path} has quantization_config.quant_method="
                          f"{(qc or {}).get('quant_method')!r}; allowed for this source: {QUANT_METHOD[source]!r}")
    if source == "compressed_tensors":
        for name, g in qc.get("config_groups", {}).items():
            _ct_check(g, qc, name)
        if qc.get("quantization_status") != "compressed":
            raise ConfigError(f"{path}: quantization_status={qc.get('quantization_status')!r}, not 'compressed' "
                              f"(saved with save_compressed=False: float weights, load with model.source=local)")
    elif source == "gptq":
        if qc.get("bits") not in PACK_BITS or qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise ConfigError(f"{path}: GPTQ bits={qc.get('bits')} checkpoint_format={qc.get('checkpoint_format')!r}"
                              f" not supported; allowed: bits {PACK_BITS}, checkpoint_format gptq | gptq_v2")
    elif qc.get("bits", qc.get("w_bit")) != 4 or str(qc.get("version", "gemm")).lower() != "gemm" \
            or not qc.get("zero_point", True):
        raise ConfigError(f"{path}: AWQ bits={qc.get('bits')} version={qc.get('version')!r} zero_point="
                          f"{qc.get('zero_point')} not supported; allowed: 4 bits, version gemm, zero_point true")
    return qc


def _ct_check(group: dict, qc: dict, name: str) -> None:
    w, fmt = group.get("weights") or {}, group.get("format") or qc.get("format")
    why = None
    if group.get("input_activations") or group.get("output_activations"):
        why = "activation quantization is not converted (weight-only checkpoints only)"
    elif fmt not in CT_FORMATS:
        why = f"format {fmt!r} (allowed: {', '.join(CT_FORMATS)})"
    elif w.get("type") != "int" or w.get("num_bits") not in PACK_BITS:
        why = f"weights type={w.get('type')!r} num_bits={w.get('num_bits')} (allowed: int, {PACK_BITS})"
    elif w.get("strategy") not in ("tensor", "channel", "group"):
        why = f"strategy={w.get('strategy')!r} (allowed: tensor, channel, group)"
    elif w.get("strategy") == "tensor" and not w.get("symmetric", True):
        why = "asymmetric per-tensor weights (allowed: symmetric per-tensor, or channel / group)"
    if why:
        raise ConfigError(f"compressed-tensors config group {name}: {why}")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no .safetensors files (pickled checkpoints are not read)")
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _nbytes(ts: list[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _build(codes_or_packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g_idx, bits: int,
           group: int, shape: tuple[int, int], dtype: torch.dtype, prepacked: bool = False) -> QuantLinear:
    """QuantLinear from codes [out, in] (or an already int32_k-packed qweight), scales / zeros [out, n_groups]."""
    out_f, in_f = shape
    meta = PackedMeta(bits, group, in_f, out_f, zeros is None)
    m = QuantLinear(meta, dtype, None, False, g_idx is not None, 0)
    m.qweight.copy_(codes_or_packed if prepacked else pack_rows(codes_or_packed, bits))
    assert scales.shape == (out_f, meta.n_groups), f"scales {tuple(scales.shape)} != {(out_f, meta.n_groups)}"
    m.scales = scales.contiguous()  # kept in the checkpoint's dtype (its bytes, its exact values)
    if zeros is not None:
        m.qzeros.copy_(pack_zeros(zeros, bits))
    if g_idx is not None:
        m.g_idx.copy_(g_idx)
    return m


def _ct_layer(prefix: str, t: dict, w: dict, fmt: str, dtype: torch.dtype) -> tuple[QuantLinear, list[str]]:
    bits, off = w["num_bits"], 2 ** (w["num_bits"] - 1)
    keys = [k for k in (f"{prefix}.weight_{s}" for s in ("packed", "scale", "zero_point", "g_idx", "shape")) if k in t]
    scale = t[f"{prefix}.weight_scale"]
    if fmt == "pack-quantized":
        out_f, in_f = (int(x) for x in t[f"{prefix}.weight_shape"])
        packed = t[f"{prefix}.weight_packed"]
    else:
        keys.append(f"{prefix}.weight")
        q = t[f"{prefix}.weight"]
        out_f, in_f = q.shape
        packed = pack_rows((q.to(torch.int64) + off).to(torch.uint8), bits)
    group = in_f if w["strategy"] != "group" else int(w["group_size"])
    scale = scale.reshape(out_f if w["strategy"] != "tensor" else 1, -1).expand(out_f, -1)  # [out, n_groups]
    zeros = None
    if not w.get("symmetric", True):  # tensor strategy is symmetric here (_ct_check)
        zp = t[f"{prefix}.weight_zero_point"]
        zeros = unpack_zeros(zp, bits, out_f) if fmt == "pack-quantized" else zp.float().reshape(out_f, -1) + off
    g_idx = contiguous_groups(t.get(f"{prefix}.weight_g_idx"), group, in_f)
    return _build(packed, scale, zeros, g_idx, bits, group, (out_f, in_f), dtype, prepacked=True), keys


def _ct_scheme(name: str, module: nn.Module, qc: dict) -> tuple[dict, str] | None:
    """(weights args, format) of the config group that targets `name`, or None when it is not quantized."""
    def hit(targets):
        return any(tg == name or tg == type(module).__name__ or (tg.startswith("re:") and re.match(tg[3:], name))
                   for tg in targets or [])
    if hit(qc.get("ignore")):
        return None
    for g in qc.get("config_groups", {}).values():
        if hit(g.get("targets")):
            return g["weights"], g.get("format") or qc.get("format")
    return None


def _gptq_layer(prefix: str, t: dict, qc: dict, dtype: torch.dtype) -> tuple[QuantLinear, list[str]]:
    bits, fmt = qc["bits"], qc.get("checkpoint_format", "gptq")
    keys = [k for k in (f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")) if k in t]
    scales = t[f"{prefix}.scales"].t()  # [out, n_groups]
    out_f, n_groups = scales.shape
    in_f = t[f"{prefix}.g_idx"].numel() if f"{prefix}.g_idx" in t else t[f"{prefix}.qweight"].shape[0] * 32 // bits
    group = in_f if qc.get("group_size", -1) in (-1, None) else int(qc["group_size"])
    codes = gptq_codes(t[f"{prefix}.qweight"], bits, in_f)  # [out, in]
    zeros = gptq_zeros(t[f"{prefix}.qzeros"], bits, out_f, fmt)  # [out, n_groups]
    if qc.get("sym") and bool((zeros == 2 ** (bits - 1)).all()):
        zeros = None  # symmetric: the implied zero, as we store it
    g_idx = contiguous_groups(t.get(f"{prefix}.g_idx"), group, in_f)
    return _build(codes, scales, zeros, g_idx, bits, group, (out_f, in_f), dtype), keys


def _awq_layer(prefix: str, t: dict, qc: dict, dtype: torch.dtype) -> tuple[QuantLinear, list[str]]:
    keys = [f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales")]
    scales = t[f"{prefix}.scales"].t()  # [out, n_groups]
    out_f = scales.shape[0]
    codes = awq_codes(t[f"{prefix}.qweight"], out_f)  # [out, in]
    in_f = codes.shape[1]
    group = in_f if qc.get("group_size", qc.get("q_group_size", -1)) in (-1, None) else \
        int(qc.get("group_size", qc.get("q_group_size")))
    return _build(codes, scales, awq_zeros(t[f"{prefix}.qzeros"], out_f), None, 4, group, (out_f, in_f), dtype), keys


def foreign_layers(model: nn.Module, source: str, qc: dict, t: dict, dtype: torch.dtype) -> dict[str, tuple]:
    """{linear name: (QuantLinear, checkpoint keys it consumed)} for every quantized linear of the checkpoint."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if source == "compressed_tensors":
            scheme = _ct_scheme(name, mod, qc)
            if scheme is not None:
                out[name] = _ct_layer(name, t, scheme[0], scheme[1], dtype)
        elif f"{name}.qweight" in t:
            out[name] = (_gptq_layer if source == "gptq" else _awq_layer)(name, t, qc, dtype)
    if not out:
        raise ConfigError(f"no quantized linear found in the {source} checkpoint (tensor names do not match the model)")
    return out


def load_foreign(path: str | Path, source: str, dtype: torch.dtype) -> nn.Module:
    """Rebuild the model from config.json, swap in QuantLinears converted from the checkpoint, load the rest."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qc = quant_config(path, source)
    raw = json.loads((path / "config.json").read_text())
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    t = _tensors(path)
    layers = foreign_layers(model, source, qc, t, dtype)
    used = set()
    for name, (ql, keys) in layers.items():
        bias = t.get(f"{name}.bias")
        if bias is not None:
            ql.bias = bias.to(dtype)
            keys = keys + [f"{name}.bias"]
        ql.stored_bytes = _nbytes([t[k] for k in keys if not k.endswith(".bias")])
        set_module(model, name, ql)
        used.update(keys)
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items() if k not in used}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    names_of: dict[int, list[str]] = {}
    for n, prm in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(prm), []).append(n)
    tied = {n for names in names_of.values() if len(names) > 1 for n in names}  # stored once
    missing = [k for k in missing if k not in tied and k.rpartition(".")[0] not in layers]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    log.info("%s: %d linears converted from %s to packed QuantLinear", path, len(layers), source)
    model.config.use_cache = False
    return model.eval()
