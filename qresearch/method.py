"""The method interface: a method turns a model (+ calibration data) into data, not modules (DESIGN rule 2)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .quant.primitives import QTensor
from .quant.spec import QuantSpec


@dataclass
class ActQuant:
    """Activation quantization for one linear's input: dynamic (qparams per call) or static (fixed scale)."""

    spec: QuantSpec  # granularity 'token' (dynamic per-token) or 'tensor'
    static_scale: torch.Tensor | None = None  # [1, 1] for static per-tensor; None = dynamic


@dataclass
class LayerResult:
    """One quantized linear: codes + qparams for W [out, in], optional act-order group index and act quant."""

    weight: QTensor
    g_idx: torch.Tensor | None = None  # [in] group of each input column (act-order GPTQ); None = contiguous
    act: ActQuant | None = None
    outliers: torch.Tensor | None = None  # [in] bool: input columns kept in full precision (LLM.int8())
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantResult:
    """What a method returns: per-linear results keyed by module name, searched artifacts, per-layer stats rows."""

    layers: dict[str, LayerResult] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    stats: list[dict[str, Any]] = field(default_factory=list)

    def merge(self, later: "QuantResult") -> "QuantResult":
        """Stack steps: a later step's layers replace earlier ones; artifacts and stats accumulate."""
        return QuantResult({**self.layers, **later.layers}, {**self.artifacts, **later.artifacts},
                           self.stats + later.stats)


@dataclass
class Context:
    """What a method may use: calibration token ids, the architecture entry, the compute device."""

    calib: torch.Tensor | None  # [n_samples, seqlen] token ids, or None when no calibration was asked for
    arch: Any  # qresearch.models.arch.ArchInfo
    device: torch.device
    seed: int = 0
    prior: QuantResult | None = None  # result of the previous step when stacking


class Method(ABC):
    """Base class. Subclasses set `name` and `needs_calibration` and implement `quantize`.

    `quantize` may modify the FP model in place only in ways that keep its function (e.g. AWQ folding scales),
    and returns codes + qparams for the linears it quantized.
    """

    name = "base"
    needs_calibration = False

    @abstractmethod
    def quantize(self, model: nn.Module, ctx: Context) -> QuantResult:
        """Quantize the model's linears; return their codes, qparams, artifacts and stats."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded with the run (public attributes)."""
        return {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in vars(self).items() if not k.startswith("_")}
