"""What methods return, as data: per-linear codes + qparams, activation quantization, artifacts, stats.

Low in the import graph (only quant/ and errors below it): kernels, modules, evaluation, tracking and
methods all read these records; none of them needs anything above.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
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
    # LLM.int8() decomposition: in each call, input columns whose |x| reaches this in any row stay in float
    outlier_threshold: float | None = None
    # integer-only inference (modules=integer): static per-tensor qparams of the output [1, 1], requantized
    out_spec: QuantSpec | None = None
    out_scale: torch.Tensor | None = None
    out_zero: torch.Tensor | None = None

    @property
    def tag(self) -> str:
        return self.spec.act_tag + ("-static" if self.static_scale is not None else "") + \
            (f"-t{self.outlier_threshold:g}" if self.outlier_threshold is not None else "")


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
        `info` is recorded by the runner before merging). A later weight-only layer keeps the earlier layer's
        activation quantization (e.g. smoothquant then gptq: GPTQ's weights, SmoothQuant's activations)."""
        layers = dict(self.layers)
        for name, res in later.layers.items():
            prev = self.layers.get(name)
            if res.act is None and prev is not None and prev.act is not None:
                res = replace(res, act=prev.act)
            layers[name] = res
        return QuantResult(layers, {**self.artifacts, **later.artifacts}, self.stats + later.stats)
