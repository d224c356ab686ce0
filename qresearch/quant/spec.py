"""QuantSpec: what a tensor is quantized to (numeric format, bits, granularity, symmetry), validated once."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .formats import NumericFormat, get_format
from .scales import LEVEL2

GRANULARITIES = ("tensor", "channel", "group", "token")

__all__ = ["ConfigError", "GRANULARITIES", "QuantSpec"]


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Convention: a weight is [out, in]; qparams are [out, ceil(in / group_size)]. group_size = -1 means
    per-channel (one group spans the whole row). Per-tensor and per-token are named granularities:
    per-tensor = one group over everything, per-token = one group per row of a [tokens, hidden] view.
    `qformat` names an entry of the numeric-format table (quant/formats.py). `scale_bits` chooses how group scales
    are stored (quant/scales.py): None = the format's default, 16 = floats, 2..8 = integer scales against a
    per-`scale_level2` (channel | tensor) fp32 scale (two-level, VS-Quant style).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    granularity: str = "group"  # tensor | channel | group | token
    qformat: str = "int"
    scale_bits: int | None = None
    scale_level2: str = "channel"

    def __post_init__(self):
        if self.scale_level2 not in LEVEL2:
            raise ConfigError(f"scale_level2={self.scale_level2!r} is unknown; allowed: {', '.join(LEVEL2)}")
        fmt = get_format(self.qformat)
        fmt.validate(self)
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is unknown; allowed: {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and not (self.group_size == -1 or self.group_size >= 1):
            raise ConfigError(f"group_size={self.group_size} is invalid; allowed: -1 (per-channel) or a positive int")
        if fmt.sym_only and not self.sym:
            object.__setattr__(self, "sym", True)  # e.g. fp8: scaling is symmetric by construction

    @property
    def format(self) -> NumericFormat:
        return get_format(self.qformat)

    def group_for(self, in_features: int) -> int:
        """Effective group length along the last dim for a row of `in_features` values."""
        if self.granularity in ("channel", "token", "tensor") or self.group_size == -1:
            return in_features
        return min(self.group_size, in_features)

    def n_groups(self, in_features: int) -> int:
        return -(-in_features // self.group_for(in_features))

    @property
    def tag(self) -> str:
        """Short tag of a weight spec: w4g128, w3g-1-sym, w8g-1-fp8_e4m3 (per-tensor: gt, per-token: gtok)."""
        g = {"tensor": "t", "token": "tok", "channel": "-1"}.get(self.granularity, str(self.group_size))
        sym = "-sym" if self.sym and not self.format.sym_only else ""
        fmt = "" if self.qformat == "int" else f"-{self.qformat}"
        return f"w{self.bits}g{g}{sym}{fmt}{self.format.scale_coding(self).tag}"

    @property
    def act_tag(self) -> str:
        """Short tag of an activation spec: a8tok (per-token), a8t (per-tensor), with -fp8_e4m3 etc."""
        g = {"tensor": "t", "token": "tok", "channel": "ch"}.get(self.granularity, f"g{self.group_size}")
        fmt = "" if self.qformat == "int" else f"-{self.qformat}"
        return f"a{self.bits}{g}{'' if self.sym else '-asym'}{fmt}"
