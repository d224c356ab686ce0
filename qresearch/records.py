"""What methods return, as data: per-linear codes + qparams, activation quantization, artifacts, stats.

Low in the import graph (only quant/ and errors below it): kernels, modules, evaluation, tracking and
methods all read these records; none of them needs anything above.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .quant.primitives import QTensor
from .quant.spec import QuantSpec


@dataclass
class ActQuant:
    """Activation quantization of one linear's input: dynamic (qparams per call) or static (fixed qparams)."""

    spec: QuantSpec  # granularity 'token' (dynamic per-token) or 'tensor'
    static_scale: torch.Tensor | None = None  # [1, 1] for static per-tensor; None = dynamic
    static_zero: torch.Tensor | None = None  # [1, 1]; None = the format's symmetric zero

    @property
    def tag(self) -> str:
        return self.spec.act_tag + ("-static" if self.static_scale is not None else "")


@dataclass
class LayerResult:
    """One quantized linear: codes + qparams for W [out, in] (act-order index inside), optional act quant."""

    weight: QTensor
    act: ActQuant | None = None
    outliers: torch.Tensor | None = None  # [in] bool: input columns kept in full precision (LLM.int8())
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantResult:
    """What a method step returns: per-linear results keyed by module name, searched artifacts, per-layer
    stats rows, and facts about the step itself (`info`: engine cost, searched values) for the run's metrics."""

    layers: dict[str, LayerResult] = field(default_factory=dict)
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def merge(self, later: "QuantResult") -> "QuantResult":
        """Stack steps: a later step's layers replace earlier ones; artifacts and stats accumulate (each step's
        `info` is recorded by the runner before merging)."""
        return QuantResult({**self.layers, **later.layers}, {**self.artifacts, **later.artifacts},
                           self.stats + later.stats)
