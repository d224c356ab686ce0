"""Our export format, "qresearch-packed" v1: a model with QuantLinear layers, saved and reloaded exactly.

Folder layout:
  model.safetensors   every tensor of the model's state dict; a QuantLinear `<name>` stores
                      <name>.qweight  int32 [out, ceil(in*bits/32)]    codes, int32_k layout (quant/packing.py)
                      <name>.scales   fp16/bf16 [out, n_groups]
                      <name>.qzeros   int32 [ceil(out*bits/32), n_groups]   (asymmetric only)
                      <name>.g_idx    int32 [in]                        (act-order only)
                      <name>.bias, <name>.act_scale, <name>.outliers, <name>.fp_cols   (when present)
                      tied tensors are stored once; metadata: "qresearch_layers" = the layer settings
                      the tensors were written with (checked against config.json on load)
  config.json         the HF model config + "quantization_config": {"quant_method": "qresearch",
                      "format": "qresearch-packed", "version": 1, "layout": "int32_k",
                      "layers": {<name>: QuantLinear.config()}}
  tokenizer files     when a tokenizer is given
Loading (qresearch/models/checkpoint.py) reads safetensors only (no pickle): load_quantized(path), after
check_checkpoint(path) compares the config with the tensors key by key.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..models.checkpoint import FORMAT, LAYERS_KEY, SOURCE_KEY, VERSION, quantized_layers
from ..models.st_writer import dedup_shared, write_safetensors


def save_quantized(model: nn.Module, path: str | Path, tokenizer=None, source: dict | None = None) -> Path:
    """Write `model` (already swapped to modules=packed) to `path` in the qresearch-packed format. The same model
    gives the same model.safetensors bytes in every process (st_writer)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers; swap_linears(model, result, 'packed') first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, alias = dedup_shared(model.state_dict())
    layer_cfg = {n: m.config() for n, m in layers.items()}
    meta = {"format": "pt", "qresearch_format": FORMAT, LAYERS_KEY: json.dumps(layer_cfg, sort_keys=True), **alias}
    write_safetensors(path / "model.safetensors", tensors, meta)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "qresearch", "format": FORMAT, "version": VERSION,
                                  "layout": "int32_k", "layers": layer_cfg}
    if source is not None:
        cfg[SOURCE_KEY] = source
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
