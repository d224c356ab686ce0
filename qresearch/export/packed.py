"""Our export format, "qresearch-packed" v1: a model with QuantLinear layers, saved and reloaded exactly.

Folder layout:
  model.safetensors   every tensor of the model's state dict; a QuantLinear `<name>` stores
                      <name>.qweight  int32 [out, ceil(in*bits/32)]    codes, int32_k layout (quant/packing.py)
                      <name>.scales   fp16/bf16 [out, n_groups]
                      <name>.qzeros   int32 [ceil(out*bits/32), n_groups]   (asymmetric only)
                      <name>.g_idx    int32 [in]                        (act-order only)
                      <name>.bias, <name>.act_scale, <name>.outliers, <name>.fp_cols   (when present)
                      tied tensors are stored once (safetensors.torch.save_model)
  config.json         the HF model config + "quantization_config": {"quant_method": "qresearch",
                      "format": "qresearch-packed", "version": 1, "layout": "int32_k",
                      "layers": {<name>: QuantLinear.config()}}
  tokenizer files     when a tokenizer is given
Loading (qresearch/models/checkpoint.py) reads safetensors only (no pickle): load_quantized(path).
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..models.checkpoint import FORMAT, VERSION, quantized_layers


def save_quantized(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    """Write `model` (already swapped to modules=packed) to `path` in the qresearch-packed format."""
    from safetensors.torch import save_model

    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers; swap_linears(model, result, 'packed') first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / "model.safetensors"), metadata={"format": "pt", "qresearch_format": FORMAT})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "qresearch", "format": FORMAT, "version": VERSION,
                                  "layout": "int32_k", "layers": {n: m.config() for n, m in layers.items()}}
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
