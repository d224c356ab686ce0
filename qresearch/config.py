"""Config at the edge (DESIGN rule 5): OmegaConf resolvers, and cfg -> validated, typed Plan before any heavy work."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .data.sets import EvalSet, parse_eval_sets
from .data.text import check_calibration
from .method import Method
from .models.load import ModelSpec, resolve_path
from .quant.spec import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("fake", "packed")
EXPORTS = ("qresearch", "compressed_tensors")


def wtag(bits: int, group_size: int, sym: bool) -> str:
    """w4g128, w3g-1-sym, w16 (off)."""
    if int(bits) == 16:
        return "w16"
    return f"w{bits}g{group_size}" + ("-sym" if str(sym).lower() in ("true", "1") else "")


def on(flag, text: str, otherwise: str = "") -> str:
    """`text` when a config flag is true, else `otherwise` (for method tags like gptq-w4g128-ao)."""
    return text if str(flag).lower() in ("true", "1") else otherwise


def unless(value, default, prefix: str) -> str:
    """`prefix + value` when a knob differs from its default, else "" (e.g. gptq-w4g128-d0.1 for percdamp=0.1)."""
    return "" if str(value) == str(default) else f"{prefix}{value}"


def register_resolvers() -> None:
    for name, fn in {"qr_root": lambda: str(ROOT), "qr_wtag": wtag, "qr_on": on, "qr_unless": unless}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


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


@dataclass
class Plan:
    """Everything a run needs, validated. Built without loading a model or reading data."""

    model: ModelSpec
    steps: list[Method]
    method_name: str
    method_tag: str
    eval: EvalPlan
    calib: dict[str, Any]  # name, root, source, n_samples, seqlen
    device: torch.device
    seed: int
    format: str
    bits: int
    group_size: int
    sym: bool
    export: str | None = None

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.steps)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; allowed: auto, cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"device={name!r} is unknown; allowed: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def _steps(cfg: DictConfig) -> list[Method]:
    from hydra.utils import instantiate

    steps = []
    for i, step_cfg in enumerate(cfg.method.steps):
        try:
            step = instantiate(step_cfg)
        except Exception as e:  # hydra wraps constructor errors; surface ours as one line
            cause = e
            while cause.__cause__ is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__
            if isinstance(cause, ConfigError):
                raise cause from None
            raise ConfigError(f"method {cfg.method.name!r} step {i} ({step_cfg.get('_target_')}) could not be "
                              f"built: {str(e).splitlines()[0]}") from e
        if not isinstance(step, Method):
            raise ConfigError(f"method step {step_cfg.get('_target_')} is not a qresearch Method")
        steps.append(step)
    return steps


def _eval_plan(e: DictConfig) -> EvalPlan:
    sets = parse_eval_sets(e.datasets, e.splits, e.root, e.source)
    if e.seqlen < 2:
        raise ConfigError(f"eval.seqlen={e.seqlen} is too small; allowed: >= 2")
    if e.max_chunks is not None and e.max_chunks < 1:
        raise ConfigError(f"eval.max_chunks={e.max_chunks} is invalid; allowed: null or a positive int")
    protocol = e.get("protocol", "gptq")
    if protocol not in ("gptq", "sliding"):
        raise ConfigError(f"eval.protocol={protocol!r} is unknown; allowed: gptq, sliding")
    stride = e.get("stride") or int(e.seqlen) // 2
    if protocol == "sliding" and not 1 <= stride <= e.seqlen:
        raise ConfigError(f"eval.stride={stride} is invalid; allowed: 1..eval.seqlen ({e.seqlen})")
    lm = OmegaConf.to_container(e.lm_eval, resolve=True) if e.get("lm_eval") else None
    if lm and lm["tasks"]:
        from .eval.lm_eval_bridge import check_lm_eval

        check_lm_eval(lm, e.root)
    return EvalPlan(sets, e.root, e.source, int(e.seqlen), e.max_chunks, int(e.batch_size), bool(e.baseline),
                    protocol, stride if protocol == "sliding" else None, lm if lm and lm["tasks"] else None)


def plan(cfg: DictConfig) -> Plan:
    """Validate the composed config; every user error surfaces here as a one-line ConfigError."""
    bits, group_size = int(cfg.bits), int(cfg.group_size)
    if not (2 <= bits <= 8 or bits == 16):
        raise ConfigError(f"bits={bits} is out of range; allowed: 2..8, or 16 for no quantization")
    if group_size == 0 or group_size < -1:
        raise ConfigError(f"group_size={group_size} is invalid; allowed: -1 (per-channel) or a positive int")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r} is unknown; allowed: {', '.join(FORMATS)}")
    export = cfg.get("export")
    if export is not None and export not in EXPORTS:
        raise ConfigError(f"export={export!r} is unknown; allowed: null, {', '.join(EXPORTS)}")
    if export is not None and cfg.format != "packed":
        raise ConfigError(f"export={export} writes packed weights; run it with format=packed (got format={cfg.format})")
    m = OmegaConf.to_container(cfg.model, resolve=True)
    fields = {k: m[k] for k in ModelSpec.__dataclass_fields__ if k in m}
    spec = ModelSpec(**fields)
    resolve_path(spec)
    steps = _steps(cfg)
    ev = _eval_plan(cfg.eval)
    calib = {k: cfg.data[k] for k in ("name", "root", "source", "n_samples", "seqlen")}
    p = Plan(spec, steps, cfg.method.name, cfg.method.tag, ev, calib, _device(cfg.device), int(cfg.seed),
             cfg.format, bits, group_size, bool(cfg.sym), cfg.get("export"))
    if p.needs_calibration:
        check_calibration(calib["name"], calib["root"], calib["source"])
        if calib["n_samples"] < 1 or calib["seqlen"] < 2:
            raise ConfigError(f"data.n_samples={calib['n_samples']} / data.seqlen={calib['seqlen']} invalid; "
                              f"allowed: n_samples >= 1, seqlen >= 2")
    return p
