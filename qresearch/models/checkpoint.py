"""Reading a qresearch-packed checkpoint (written by qresearch.export.packed): rebuild the model from its config,
put empty QuantLinears where the config says, load the tensors (safetensors only, nothing unpickled)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..nn.packed import QuantLinear
from ..nn.swap import set_module

FORMAT, VERSION = "qresearch-packed", 1


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def is_qresearch_checkpoint(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    qc = json.loads(f.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "qresearch"


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from config.json, put empty QuantLinears where the config says, load the tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("format") != FORMAT or qc.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} checkpoint (quantization_config: "
                         f"{qc.get('quant_method')!r} / {qc.get('format')!r} v{qc.get('version')})")
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "quantization_config"})
    dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch."))
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    for name, c in qc["layers"].items():
        set_module(model, name, QuantLinear.from_config(c))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    tied = {n for names in names_of.values() if len(names) > 1 for n in names}  # stored once by save_model
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: tensors do not match the config: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.config.use_cache = False
    return model.to(device).eval()
