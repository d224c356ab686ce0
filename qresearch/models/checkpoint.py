"""Reading a qresearch-packed checkpoint (written by qresearch.export.packed): check the config against the tensors
key by key, rebuild the model from its config, put empty QuantLinears where the config says, load the tensors
(safetensors only, nothing unpickled)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.packed import QuantLinear
from ..nn.swap import set_module
from .files import read_config, safetensors_header

FORMAT, VERSION = "qresearch-packed", 1
LAYERS_KEY = "qresearch_layers"  # safetensors metadata: the layer settings the tensors were written with
SOURCE_KEY = "qresearch_source"  # config.json: the run that wrote an export (runner.export_source)


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The packed layers to write, by module name; a model with fused siblings (nn/fused.py) is refused: its
    packed layers are the fused ones, under the first member's name."""
    from ..nn.fused import is_fused

    if is_fused(model):
        raise ValueError("the model's sibling projections are fused (fuse_siblings): exports write one packed layer "
                         "per linear; export the model before fusing it, or run without fuse_siblings")
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def is_qresearch_checkpoint(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    if not f.is_file():
        return False
    try:
        qc = json.loads(f.read_text()).get("quantization_config") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "qresearch"


def _quant_config(path: Path) -> dict:
    raw = read_config(path, "qresearch checkpoint")
    qc = raw.get("quantization_config") or {}
    if qc.get("format") != FORMAT or qc.get("version") != VERSION:
        raise ConfigError(f"{path} is not a {FORMAT} v{VERSION} checkpoint (quantization_config: "
                          f"{qc.get('quant_method')!r} / {qc.get('format')!r} v{qc.get('version')})")
    if not isinstance(qc.get("layers"), dict) or not qc["layers"]:
        raise ConfigError(f"{path}/config.json: quantization_config has no layers")
    return raw


def check_checkpoint(path: str | Path) -> None:
    """config.json's quantization_config against the tensors, key by key, before anything loads: each layer's
    settings must equal those recorded with the tensors (model.safetensors metadata), and every buffer the
    settings imply must be stored with that shape and dtype. Raises a one-line ConfigError naming layer and key."""
    path = Path(path)
    layers = _quant_config(path)["quantization_config"]["layers"]
    f = path / "model.safetensors"
    if not f.is_file():
        raise ConfigError(f"{path} has no model.safetensors")
    header = safetensors_header(f, "qresearch checkpoint")
    recorded = (header.get("__metadata__") or {}).get(LAYERS_KEY)
    if recorded is not None:
        _compare_settings(f, layers, json.loads(recorded))
    for name, c in layers.items():
        try:
            with torch.device("meta"):  # buffer shapes without memory
                m = QuantLinear.from_config(c)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{f.parent / 'config.json'}: layer {name}: quantization_config is invalid "
                              f"({type(e).__name__}: {e})") from None
        for key, buf in m.named_buffers():
            _check_buffer(f, header, f"{name}.{key}", buf)


def _compare_settings(f: Path, cfg: dict, rec: dict) -> None:
    for name in sorted(set(cfg) | set(rec)):
        if name not in rec or name not in cfg:
            where = "config.json" if name in cfg else f"{f.name} only"
            raise ConfigError(f"{f.parent}: layer {name} is quantized in {where}; config and tensors disagree")
        for key in sorted(set(cfg[name]) | set(rec[name])):
            if cfg[name].get(key) != rec[name].get(key):
                raise ConfigError(f"{f.parent}: layer {name}: quantization_config {key}={cfg[name].get(key)!r} "
                                  f"disagrees with the tensors (written with {key}={rec[name].get(key)!r})")


def _check_buffer(f: Path, header: dict, key: str, buf: torch.Tensor) -> None:
    from .st_writer import DTYPES

    got = header.get(key)
    if got is None:
        raise ConfigError(f"{f}: tensor {key} is missing (the quantization_config implies it)")
    if got["shape"] != list(buf.shape) or got["dtype"] != DTYPES[buf.dtype]:
        raise ConfigError(f"{f}: tensor {key} is {got['dtype']} {got['shape']}; the quantization_config implies "
                          f"{DTYPES[buf.dtype]} {list(buf.shape)}")


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model from config.json, put empty QuantLinears where the config says, load the tensors (after
    check_checkpoint)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    check_checkpoint(path)
    raw = _quant_config(path)
    qc = raw["quantization_config"]
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
    tied = {n for names in names_of.values() if len(names) > 1 for n in names}  # stored once
    if unexpected or set(missing) - tied:
        raise ConfigError(f"{path}: tensors do not match the config: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    model.config.use_cache = False
    return model.to(device).eval()
