"""Config at the edge: OmegaConf resolvers, and cfg -> a validated, typed Plan before any heavy work.

Every user error surfaces here as a one-line ConfigError naming the value and what is allowed: top-level knobs
and every step option are checked against their types (a step's constructor annotations) before anything loads.
"""
from __future__ import annotations

import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .data.sets import EvalSet, parse_eval_sets
from .data.text import check_calibration
from .errors import ConfigError
from .method import Method, run_facts, run_tag
from .models.load import PREQUANTIZED, ModelSpec, check_hub_model, config_dict, max_positions, resolve_path
from .nn.swap import MODULES
from .quant.formats import FORMATS

ROOT = Path(__file__).resolve().parents[1]
EXPORTS = ("qresearch", "compressed_tensors")
LOGGER_MODES = ("online", "offline", "disabled")


# --- resolvers ------------------------------------------------------------------------------------------------

def model_name(preset: str, preset_path: str, path: str) -> str:
    """The preset's name while the model path is the preset's own, else the folder / id's last part."""
    if str(path) == str(preset_path):
        return preset
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(path).rstrip("/")).name) or preset


def kv_tag(kv: Any) -> str:
    """Tag fragment of KV-cache quantization: -kv8, -kv4-sym, -kv8-fp8_e4m3 ('' when off)."""
    if kv is None or kv.get("bits", 16) == 16:
        return ""
    fmt = kv.get("qformat", "int")
    return f"-kv{kv['bits']}{'-sym' if kv.get('sym') and fmt == 'int' else ''}{'' if fmt == 'int' else '-' + fmt}"


def full_tag(recipe: str, steps: list[Method], modules: str, kv: Any = None, fuse: bool = False) -> str:
    """The run tag: what the steps do, plus -packed / -integer for those modules (fake is the default), -fused for
    fused sibling projections, plus the KV cache."""
    return run_tag(recipe, steps) + ("" if modules == "fake" else f"-{modules}") + ("-fused" if fuse else "") + \
        kv_tag(kv)


def tag_of(method: DictConfig, modules: str, kv: Any = None, fuse: bool = False) -> str:
    """Run tag of a method node (for the run dir, resolved by Hydra before run(); errors surface in plan())."""
    try:
        return full_tag(method.name, build_steps(method), modules, kv, fuse)
    except Exception:  # noqa: BLE001 - plan() reports the error properly; the dir is then discarded
        return f"{method.get('name', 'method')}-invalid"


def register_resolvers() -> None:
    for name, fn in {"qr_root": lambda: str(ROOT), "qr_tag": tag_of, "qr_model_name": model_name}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


# --- typed checks ---------------------------------------------------------------------------------------------

def _type_ok(value: Any, hint: Any) -> bool:
    """Does a config value have the annotated type? bool is never an int here, and an int is a float."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # containers and other types: the constructor checks them


_PHRASES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint) or (hint,)
    return " or ".join(_PHRASES.get(a, getattr(a, "__name__", str(a))) for a in args)


def check_value(where: str, value: Any, hint: Any) -> None:
    if not _type_ok(value, hint):
        raise ConfigError(f"{where}={value!r} must be {_type_name(hint)}")


def _step_class(target: str, where: str) -> type:
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{where}._target_={target!r} cannot be imported: {str(e).splitlines()[0]}") from None


def check_step_options(cls: type, options: dict, where: str) -> None:
    """Every option of a step config names a constructor parameter and has its annotated type."""
    params = inspect.signature(cls.__init__).parameters
    hints = typing.get_type_hints(cls.__init__)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in options.items():
        if key.startswith("_"):
            continue
        if key not in params and not open_ended:
            allowed = ", ".join(p for p in params if p != "self")
            raise ConfigError(f"{where}.{key} is not an option of {cls.__name__}; allowed: {allowed}")
        if key in hints:
            check_value(f"{where}.{key}", value, hints[key])


def build_steps(method: DictConfig) -> list[Method]:
    """Instantiate the recipe's steps in `method.order` (each a step config mounted at method.<name>)."""
    from hydra.utils import instantiate

    steps = []
    for name in method.get("order", []):
        if name not in method:
            raise ConfigError(f"method {method.name!r} lists step {name!r} in order but has no method.{name} config")
        node = method[name]
        options = OmegaConf.to_container(node, resolve=True)
        cls = _step_class(options.get("_target_", ""), f"method.{name}")
        check_step_options(cls, options, f"method.{name}")
        try:
            step = instantiate(node)
        except Exception as e:  # hydra wraps constructor errors; surface ours as one line
            cause = e
            while cause.__cause__ is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__
            if isinstance(cause, ConfigError):
                raise cause from None
            raise ConfigError(f"method.{name} ({cls.__name__}) could not be built: {str(e).splitlines()[0]}") from e
        if not isinstance(step, Method):
            raise ConfigError(f"method.{name}: {cls.__name__} is not a qresearch Method")
        steps.append(step)
    return steps


# --- the plan -------------------------------------------------------------------------------------------------

@dataclass
class EvalPlan:
    datasets: list[EvalSet]  # built-in splits and own texts (data/sets.py)
    root: str
    source: str
    seqlen: int
    max_chunks: int | None
    batch_size: int
    baseline: bool
    protocol: str = "gptq"  # gptq | sliding
    stride: int | None = None
    lm_eval: dict[str, Any] | None = None  # tasks, limit, num_fewshot, batch_size
    latency: dict[str, Any] | None = None  # LatencyConfig fields when enabled
    kv_cache: dict[str, Any] | None = None  # bits, qformat, sym, contexts when enabled (eval/kvcache.py)


@dataclass
class Plan:
    """Everything a run needs, validated. Built without loading a model or reading data."""

    model: ModelSpec
    steps: list[Method]
    recipe: str  # method.name
    tag: str  # built from the steps (method.run_tag)
    facts: dict[str, Any]  # effective bits / group / format / activation bits (method.run_facts)
    eval: EvalPlan
    calib: dict[str, Any]  # name, root, source, n_samples, seqlen
    device: torch.device
    seed: int
    modules: str  # fake | packed
    export: str | None = None
    fuse: bool = False  # modules=packed: sibling projections fused (nn/fused.py)

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)


TOP_LEVEL = {"bits": int, "group_size": int, "sym": bool, "qformat": str, "act_bits": int, "seed": int,
             "modules": str, "device": str, "export": str | None, "skip_done": bool, "scale_bits": int | None,
             "scale_level2": str, "bits_map": str | None, "fuse": bool}


def check_top_level(cfg: DictConfig) -> None:
    """Types and ranges of the top-level knobs (before anything interpolates them into a step)."""
    for key, hint in TOP_LEVEL.items():
        check_value(key, cfg.get(key, False) if key == "fuse" else cfg.get(key), hint)
    if cfg.qformat not in FORMATS:
        raise ConfigError(f"qformat={cfg.qformat!r} is unknown; allowed: {', '.join(FORMATS)}")
    low = min(FORMATS[cfg.qformat].bits_allowed)
    if not (low <= cfg.bits <= 8 or cfg.bits == 16):
        raise ConfigError(f"bits={cfg.bits} is out of range; allowed: {max(low, 2)}..8 (1: qformat=binary), "
                          f"or 16 for no quantization")
    if cfg.group_size < -1 or (cfg.group_size == 0 and cfg.qformat != "kmeans"):
        raise ConfigError(f"group_size={cfg.group_size} is invalid; allowed: -1 (per-channel) or a positive int "
                          f"(0: a per-layer palette, qformat=kmeans)")
    if not (2 <= cfg.act_bits <= 8 or cfg.act_bits == 16):
        raise ConfigError(f"act_bits={cfg.act_bits} is out of range; allowed: 2..8, or 16 for full precision")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} is out of range; allowed: 0..2^32-1")
    if cfg.modules not in MODULES:
        raise ConfigError(f"modules={cfg.modules!r} is unknown; allowed: {', '.join(MODULES)}")
    if cfg.export is not None and cfg.export not in EXPORTS:
        raise ConfigError(f"export={cfg.export!r} is unknown; allowed: null, {', '.join(EXPORTS)}")
    if cfg.export is not None and cfg.modules != "packed":
        raise ConfigError(f"export={cfg.export} writes packed weights; run it with modules=packed "
                          f"(got modules={cfg.modules})")
    if cfg.get("fuse", False) and cfg.modules != "packed":
        raise ConfigError(f"fuse=true fuses packed layers; run it with modules=packed (got modules={cfg.modules})")
    if cfg.get("fuse", False) and cfg.export is not None:
        raise ConfigError(f"fuse=true with export={cfg.export}: exports write one packed layer per linear; "
                          f"export without fuse (fusing is a runtime choice of the loaded model)")


def check_logger(lg: DictConfig) -> None:
    if lg.name not in ("wandb", "none"):
        raise ConfigError(f"logger={lg.name!r} is unknown; allowed: wandb, none")
    if lg.name == "wandb" and lg.mode not in LOGGER_MODES:
        raise ConfigError(f"logger.mode={lg.mode!r} is unknown; allowed: {', '.join(LOGGER_MODES)}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; allowed: auto, cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device={name!r} is unknown; allowed: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def _eval_plan(e: DictConfig) -> EvalPlan:
    for key, hint in {"seqlen": int, "max_chunks": int | None, "batch_size": int, "baseline": bool,
                      "protocol": str, "stride": int | None}.items():
        check_value(f"eval.{key}", e.get(key), hint)
    sets = parse_eval_sets(e.datasets, e.splits, e.root, e.source)
    if e.seqlen < 2:
        raise ConfigError(f"eval.seqlen={e.seqlen} is too small; allowed: >= 2")
    if e.max_chunks is not None and e.max_chunks < 1:
        raise ConfigError(f"eval.max_chunks={e.max_chunks} is invalid; allowed: null or a positive int")
    if e.batch_size < 1:
        raise ConfigError(f"eval.batch_size={e.batch_size} is invalid; allowed: a positive int")
    if e.protocol not in ("gptq", "sliding"):
        raise ConfigError(f"eval.protocol={e.protocol!r} is unknown; allowed: gptq, sliding")
    stride = int(e.seqlen) // 2 if e.stride is None else e.stride
    if e.protocol == "sliding" and not 1 <= stride <= e.seqlen:
        raise ConfigError(f"eval.stride={stride} is invalid; allowed: 1..eval.seqlen ({e.seqlen})")
    lm = OmegaConf.to_container(e.lm_eval, resolve=True) if e.get("lm_eval") else None
    if lm and lm["tasks"]:
        from .eval.lm_eval_bridge import check_lm_eval

        check_lm_eval(lm, e.root)
    lat = OmegaConf.to_container(e.latency, resolve=True) if e.get("latency") else None
    if lat and lat.get("enabled"):
        from .eval.latency import check_latency

        check_latency(lat)
    return EvalPlan(sets, e.root, e.source, int(e.seqlen), e.max_chunks, int(e.batch_size), e.baseline, e.protocol,
                    stride if e.protocol == "sliding" else None, lm if lm and lm["tasks"] else None,
                    lat if lat and lat.get("enabled") else None, _kv_plan(e))


def _kv_plan(e: DictConfig) -> dict[str, Any] | None:
    """eval.kv_cache checked (types, supported bits / format) -> its settings, or None when off."""
    from .eval.kvcache import check_kv_settings

    return check_kv_settings(OmegaConf.to_container(e.kv_cache, resolve=True) if e.get("kv_cache") else None)


def _calib(cfg: DictConfig, needed: bool) -> dict[str, Any]:
    calib = {k: cfg.data[k] for k in ("name", "root", "source", "n_samples", "seqlen")}
    if needed:
        check_calibration(calib["name"], calib["root"], calib["source"])
        for key in ("n_samples", "seqlen"):
            check_value(f"data.{key}", calib[key], int)
        if calib["n_samples"] < 1 or calib["seqlen"] < 2:
            raise ConfigError(f"data.n_samples={calib['n_samples']} / data.seqlen={calib['seqlen']} invalid; "
                              f"allowed: n_samples >= 1, seqlen >= 2")
    return calib


def check_positions(model_name: str, limit: int | None, seqlens: dict[str, int]) -> None:
    """Refuse sequence lengths beyond the model's trained positions (RoPE would run on untrained ones)."""
    for key, n in seqlens.items():
        if limit is not None and n > limit:
            raise ConfigError(f"{key}={n} exceeds {model_name}'s max_position_embeddings={limit}; "
                              f"allowed: 2..{limit}")


def _check_steps(cfg: DictConfig, steps: list[Method], facts: dict) -> None:
    """Combinations of knobs and steps that would do something other than asked."""
    if cfg.act_bits != 16 and facts["act_bits"] == 16:
        raise ConfigError(f"act_bits={cfg.act_bits} but no step of method {cfg.method.name!r} quantizes "
                          f"activations; steps that do: rtn (e.g. method=rtn act_bits={cfg.act_bits}), smoothquant, "
                          f"llm_int8, zeroquant, integer")
    if cfg.act_bits != 16 and facts["act_bits"] not in (16, cfg.act_bits):
        raise ConfigError(f"act_bits={cfg.act_bits} but method {cfg.method.name!r} quantizes activations to "
                          f"{facts['act_bits']} bits; set it on the step (method.<step>.act_bits={cfg.act_bits})")
    if cfg.modules == "integer" and not any(getattr(s, "integer_io", False) for s in steps):
        raise ConfigError(f"modules=integer needs static input and output qparams, which method={cfg.method.name} "
                          f"does not produce; use method=integer or method=smoothquant_integer")
    if cfg.model.source in PREQUANTIZED and cfg.modules != "packed":
        raise ConfigError(f"model.source={cfg.model.source} loads packed weights; run it with modules=packed")
    if cfg.model.source in PREQUANTIZED and any(s.spec is not None for s in steps):
        raise ConfigError(f"model.source={cfg.model.source} is already quantized; evaluate it with method=fp16 "
                          f"(got method={cfg.method.name})")
    if cfg.modules == "packed" and cfg.model.source not in PREQUANTIZED and not any(s.spec is not None for s in steps):
        raise ConfigError(f"modules=packed needs quantized weights, but method={cfg.method.name} at bits="
                          f"{facts['bits']} quantizes none; use modules=fake")


STEP_KNOBS = ("bits", "group_size", "sym", "qformat", "scale_bits", "scale_level2", "bits_map")  # read by steps only


def assigned(overrides: typing.Sequence[str]) -> dict[str, str]:
    """{key: value} of a command line's assignments ('bits=4', '+bits=4', '++bits=4'; deletions '~k' skipped)."""
    out = {}
    for o in overrides:
        key, eq, value = o.lstrip("+").partition("=")
        if eq and not key.startswith("~"):
            out[key] = value
    return out


def _show(v: Any) -> str:
    """A config value as one writes it on the command line (true, null, 8)."""
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def check_knobs_read(cfg: DictConfig, overrides: typing.Sequence[str], steps: list[Method]) -> None:
    """A top-level weight knob set on the command line that no step of the recipe interpolates would change
    nothing (method=llm_int8 bits=4 would run int8): refuse it, naming what the steps fix instead. A recipe that
    quantizes no weights (fp16, regularize) takes any: sweeps and tables cross it with the knobs of the others."""
    if not any(s.spec is not None for s in steps):
        return
    raw = OmegaConf.to_yaml(cfg.method)  # unresolved: a step that reads a knob holds ${knob}
    method = cfg.method.get("name", "?")
    for key, value in assigned(overrides).items():
        if key not in STEP_KNOBS or re.search(r"\$\{(?:oc\.select:)?" + key + r"\s*[},]", raw):
            continue
        fixed = [f"method.{s}.{key}={_show(OmegaConf.to_container(cfg.method[s])[key])}" if key in cfg.method.get(s, {})
                 else f"method.{s} has no {key} option" for s in cfg.method.get("order", [])]
        raise ConfigError(f"{key}={value} is read by no step of method={method} ({'; '.join(fixed)}); "
                          f"allowed: drop {key}=..., or set a step's own option")


def _check_export(kind: str, spec: ModelSpec, steps: list[Method], facts: dict) -> None:
    """What the chosen export cannot express, refused before any model loads (when the model's config can be
    read without loading it; otherwise the export itself refuses per layer after quantizing)."""
    from .export.check import check_exportable

    if kind == "compressed_tensors":
        from .export.compressed import step_refusal

        for s in steps:
            why = step_refusal(s.spec, s.act is not None,
                               getattr(s, "act_order", False) and not getattr(s, "static_groups", False))
            if why:
                raise ConfigError(f"export=compressed_tensors cannot hold method.{s.name}'s weights: {why}; "
                                  f"use export=qresearch")
    model_config = config_dict(spec)
    if model_config is None or facts["bits"] == 16:
        return
    weight_step = next(s for s in reversed(steps) if s.spec is not None)
    check_exportable(kind, model_config, facts["group_size"], bool(getattr(weight_step, "act_order", False)),
                     bool(getattr(weight_step, "static_groups", False)), facts["act_bits"],
                     weight_step.spec.format.code_bits(weight_step.spec), bool(getattr(weight_step, "lm_head", False)))


def _check_kernel_env() -> None:
    """The QRESEARCH_* kernel-path switches (kernels/dispatch.py), checked before anything loads."""
    from .kernels.dispatch import check_env

    try:
        check_env()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def plan(cfg: DictConfig, overrides: typing.Sequence[str] = ()) -> Plan:
    """Validate the composed config; every user error surfaces here as a one-line ConfigError. `overrides`: the
    command line's (Hydra's task overrides), for knobs it set that the recipe would ignore."""
    check_top_level(cfg)
    check_logger(cfg.logger)
    _check_kernel_env()
    m = OmegaConf.to_container(cfg.model, resolve=True)
    spec = ModelSpec(**{k: m[k] for k in ModelSpec.__dataclass_fields__ if k in m})
    resolve_path(spec)
    if spec.source == "hub":
        check_hub_model(spec)
    steps = build_steps(cfg.method)
    check_knobs_read(cfg, overrides, steps)
    facts = run_facts(steps)
    _check_steps(cfg, steps, facts)
    ev = _eval_plan(cfg.eval)
    needs_calib = any(s.needs_calibration for s in steps)
    calib = _calib(cfg, needs_calib)
    seqlens = {"eval.seqlen": ev.seqlen} | ({"data.seqlen": calib["seqlen"]} if needs_calib else {})
    check_positions(spec.name, max_positions(spec), seqlens)
    if cfg.export is not None:
        _check_export(cfg.export, spec, steps, facts)
    fuse = bool(cfg.get("fuse", False))
    return Plan(spec, steps, cfg.method.name, full_tag(cfg.method.name, steps, cfg.modules, ev.kv_cache, fuse), facts,
                ev, calib, _device(cfg.device), cfg.seed, cfg.modules, cfg.export, fuse)
