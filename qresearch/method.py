"""The method interface. A method step turns a model (+ calibration data) into records (codes, qparams,
artifacts, stats), never into modules; `swap_linears` builds modules from the records afterwards.

- `Method`: the base of every step (`quantize(model, ctx) -> QuantResult`), with its weight / activation specs
  and the options that show in the run tag (`tag_flags`).
- `BlockMethod`: steps that calibrate block by block (GPTQ, AWQ, ...). A subclass writes `quantize_block` and
  calls `rec.record(...)` once per linear; the base handles calibration checks, the engine and its cost.
- `run_tag` / `run_facts`: the run's label and effective settings, built from the steps that ran.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any

import torch
from torch import nn

from .artifacts import bits_map_from_artifacts, load_bits_map
from .calib.blockio import BlockIO
from .calib.engine import EngineConfig, calibrate
from .calib.stats import output_rel_error
from .errors import ConfigError
from .models.arch import ArchInfo, present_groups
from .quant import QuantSpec, weight_spec
from .quant.primitives import QTensor
from .quant.stats import check_finite, rel_error
from .records import ActQuant, LayerResult, QuantResult


@dataclass
class Context:
    """What a method may use: calibration token ids, the architecture entry, the compute device."""

    calib: torch.Tensor | None  # [n_samples, seqlen] token ids, or None when no calibration was asked for
    arch: ArchInfo
    device: torch.device
    seed: int = 0
    prior: QuantResult | None = None  # result of the previous steps when stacking


@dataclass(frozen=True)
class TagFlag:
    """A step option that shows in the run tag when it differs from `default`, as `text.format(value)`."""

    attr: str
    default: Any
    text: str


def _plain(v: Any) -> Any:
    return asdict(v) if is_dataclass(v) else v


class Method(ABC):
    """Base of every step. Subclasses set `name`, `needs_calibration`, `spec` (weights, None = untouched),
    `act` (activations, None = full precision) and implement `quantize`.

    `quantize` may modify the FP model in place only in ways that keep its function (e.g. folding scales)
    and returns codes + qparams for the linears it quantized.
    """

    name = "base"
    needs_calibration = False
    spec: QuantSpec | None = None
    act: QuantSpec | None = None
    tag_flags: tuple[TagFlag, ...] = ()
    bits_map: str | None = None  # per-layer bits: a .json / artifacts.safetensors path, or 'prior' (an earlier step's)
    _bits: dict[str, int] | None = None

    def use_bits_map(self, source: str | None) -> None:
        """Take per-layer bits from `source` (checked now when it is a file; 'prior' is resolved in quantize)."""
        self.bits_map = source
        if source is not None and source != "prior":
            self._check_bits(load_bits_map(source), source)

    def _check_bits(self, bits: dict[str, int], source: str) -> dict[str, int]:
        if self.spec is None:
            raise ConfigError(f"{self.name}: bits_map={source} needs a quantizing step (bits != 16)")
        bad = sorted({b for b in bits.values() if b not in self.spec.format.bits_allowed})
        if bad:
            raise ConfigError(f"bits_map={source}: bits {bad} do not fit qformat={self.spec.qformat}; allowed: "
                              f"{', '.join(map(str, self.spec.format.bits_allowed))}")
        return bits

    def resolve_bits_map(self, model: nn.Module, ctx: "Context") -> dict[str, Any] | None:
        """Load the bits map for this run (before quantizing); returns what was used, for the step's record."""
        if self.bits_map is None:
            self._bits = None
            return None
        if self.bits_map == "prior":
            found = bits_map_from_artifacts(ctx.prior.artifacts) if ctx.prior is not None else {}
            if not found:
                raise ConfigError(f"{self.name} bits_map=prior needs an earlier step that allocated bits (e.g. "
                                  f"method=mixed_{self.name})")
            bits = self._check_bits(found, "prior")
        else:
            bits = self._check_bits(load_bits_map(self.bits_map), self.bits_map)
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(set(bits) - linears)
        if unknown:
            raise ConfigError(f"bits_map={self.bits_map} names layers the model does not have: {unknown[:3]}")
        self._bits = bits
        return {"source": self.bits_map, "layers": len(bits), "histogram": dict(sorted(Counter(bits.values()).items()))}

    def spec_for(self, layer: str) -> QuantSpec | None:
        """The weight spec of one linear: the step's, at the bits map's width for that layer when there is one."""
        if self.spec is None or not self._bits or layer not in self._bits:
            return self.spec
        return replace(self.spec, bits=self._bits[layer])

    @abstractmethod
    def quantize(self, model: nn.Module, ctx: Context) -> QuantResult:
        """Quantize the model's linears; return their codes, qparams, artifacts and stats."""

    def settings(self) -> dict[str, Any]:
        """Every public setting of the step (recorded with the run)."""
        return {k: _plain(v) for k, v in vars(self).items() if not k.startswith("_")}

    def flags(self) -> list[str]:
        """Tag fragments of the options that differ from their defaults."""
        out = []
        for f in self.tag_flags:
            v = getattr(self, f.attr)
            if v != f.default:
                out.append(f.text.format(v))
        return out

    def record(self) -> dict[str, Any]:
        """What this step used: effective weight / activation settings, then every setting."""
        w, a = self.spec, self.act
        return {"name": self.name, "bits": w.bits if w else 16, "group_size": w.group_size if w else None,
                "sym": w.sym if w else None, "qformat": w.qformat if w else None, "act_bits": a.bits if a else 16,
                "act_granularity": a.granularity if a else None, "settings": self.settings()}


def require_weight_spec(method: str, bits: int, group_size: int, sym: bool, qformat: str = "int",
                        scale_bits: int | None = None, scale_level2: str = "channel") -> QuantSpec:
    """The weight spec of a step that must quantize weights (bits=16 is refused with a one-line error)."""
    spec = weight_spec(bits, group_size, sym, qformat, scale_bits, scale_level2)
    if spec is None:
        raise ConfigError(f"{method} with bits=16 quantizes nothing; allowed bits: 2..8 (use method=fp16 instead)")
    return spec


def require_calibration(method: str, ctx: Context) -> None:
    if ctx.calib is None:
        raise ConfigError(f"{method} needs calibration data; set data=c4 (or data=random)")


def run_tag(recipe: str, steps: list[Method]) -> str:
    """The run's label from what its steps do: recipe, weight spec, activation spec, non-default options."""
    w = next((s.spec for s in reversed(steps) if s.spec is not None), None)
    a = next((s for s in reversed(steps) if s.act is not None), None)
    parts = [recipe]
    if steps:
        parts.append(w.tag if w is not None else "w16")
    if a is not None:
        parts.append(a.act.act_tag)
    for s in steps:
        parts += s.flags()
    return "-".join(parts)


def run_facts(steps: list[Method]) -> dict[str, Any]:
    """Effective settings of the whole run: the last step that set weights / activations decides."""
    w = next((s.spec for s in reversed(steps) if s.spec is not None), None)
    a = next((s.act for s in reversed(steps) if s.act is not None), None)
    return {"bits": w.bits if w else 16, "group_size": w.group_size if w else None, "sym": w.sym if w else None,
            "qformat": w.qformat if w else None, "act_bits": a.bits if a else 16,
            "act_granularity": a.granularity if a else None, "act_qformat": a.qformat if a else None}


class Recorder:
    """Builds the LayerResult and the per-layer stats row of each quantized linear (one place for both)."""

    def __init__(self, method: str, result: QuantResult):
        self.method, self.result = method, result

    def record(self, full: str, q: QTensor, W: torch.Tensor, *, block: int | None = None,
               H: torch.Tensor | None = None, act: ActQuant | None = None, t0: float | None = None,
               **extra: Any) -> torch.Tensor:
        """Register `q` as the result for linear `full` (FP weight W [out, in], input Hessian H when known);
        returns the dequantized weight (float32) for propagation to the next layers."""
        Wq = q.dequantize()
        check_finite(full, Wq)
        row: dict[str, Any] = {"layer": full, "method": self.method}
        if block is not None:
            row["block"] = block
        row["shape"] = list(W.shape)
        if H is not None:
            row["out_rel_err"] = output_rel_error(W, Wq, H)
        row["weight_rel_err"] = rel_error(W, Wq)
        row.update(extra)
        if t0 is not None:
            row["seconds"] = time.perf_counter() - t0
        self.result.layers[full] = LayerResult(q, act=act, stats=row)
        self.result.stats.append(row)
        return Wq


@dataclass
class Block:
    """One decoder block as a block method sees it."""

    index: int
    module: nn.Module
    io: BlockIO  # its inputs over the calibration set
    prefix: str  # e.g. "model.layers.3."
    groups: list[list[str]]  # sequential groups of linears present in this block (names relative to it)
    ctx: Context

    def linear(self, name: str) -> nn.Linear:
        return self.module.get_submodule(name)


class BlockMethod(Method):
    """A step that calibrates block by block through `qresearch.calib.engine`. Subclasses set `self.engine`
    (an EngineConfig) and implement `quantize_block`; `prepare` may set per-run state."""

    needs_calibration = True
    engine: EngineConfig

    def prepare(self, model: nn.Module, ctx: Context) -> None:
        """Called once before the first block (e.g. to load saved artifacts)."""

    @abstractmethod
    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        """Quantize the block's linears (rec.record for each); return {name: dequantized weight} so the engine
        can propagate quantized outputs to the next block."""

    def quantize(self, model: nn.Module, ctx: Context) -> QuantResult:
        require_calibration(self.name, ctx)
        used = self.resolve_bits_map(model, ctx)
        self.prepare(model, ctx)
        result = QuantResult()
        if used is not None:
            result.info["bits_map"] = used
        rec = Recorder(self.name, result)

        def process(i: int, block: nn.Module, io: BlockIO) -> dict[str, torch.Tensor]:
            blk = Block(i, block, io, f"{ctx.arch.blocks}.{i}.", present_groups(block, ctx.arch), ctx)
            return self.quantize_block(blk, rec)

        result.info["engine"] = calibrate(model, ctx.arch, ctx.calib, ctx.device, process, self.engine).as_dict()
        return result
