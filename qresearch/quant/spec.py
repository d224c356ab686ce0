"""QuantSpec: what a tensor is quantized to (format, bits, granularity, symmetry), validated once."""
from __future__ import annotations

from dataclasses import dataclass

GRANULARITIES = ("tensor", "channel", "group", "token")
FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")
INT_BITS = range(2, 9)  # 2..8; 16 means "off" and is handled by callers, never by a spec


class ConfigError(ValueError):
    """Bad user input (one line: the value and what is allowed). Raised before expensive work."""


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor.

    Convention (DESIGN rule 4): a weight is [out, in]; qparams are [out, ceil(in / group_size)].
    group_size = -1 means per-channel (one group spans the whole row). Per-tensor and per-token are named
    granularities: per-tensor = one group over everything, per-token = one group per row of a [tokens, hidden] view.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    granularity: str = "group"  # tensor | channel | group | token
    fmt: str = "int"  # int | fp8_e4m3 | fp8_e5m2

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ConfigError(f"format={self.fmt!r} is not supported; allowed: {', '.join(FORMATS)}")
        if self.fmt == "int" and self.bits not in INT_BITS:
            raise ConfigError(f"bits={self.bits} is out of range; allowed: 2..8 (or 16 for no quantization)")
        if self.fmt != "int" and self.bits != 8:
            raise ConfigError(f"bits={self.bits} does not fit format {self.fmt}; fp8 formats have bits=8")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity={self.granularity!r} is unknown; allowed: {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and not (self.group_size == -1 or self.group_size >= 1):
            raise ConfigError(f"group_size={self.group_size} is invalid; allowed: -1 (per-channel) or a positive int")
        if self.fmt != "int" and not self.sym:
            object.__setattr__(self, "sym", True)  # fp8 scaling is symmetric by construction

    @property
    def is_fp8(self) -> bool:
        return self.fmt != "int"

    def group_for(self, in_features: int) -> int:
        """Effective group length along the last dim for a row of `in_features` values."""
        if self.granularity in ("channel", "token") or self.group_size == -1:
            return in_features
        if self.granularity == "tensor":
            return in_features
        return min(self.group_size, in_features)

    def n_groups(self, in_features: int) -> int:
        g = self.group_for(in_features)
        return -(-in_features // g)

    @property
    def tag(self) -> str:
        """Short human tag, e.g. w4g128, w3g-1s, fp8_e4m3."""
        if self.is_fp8:
            return self.fmt
        g = {"tensor": "t", "token": "tok", "channel": "-1"}.get(self.granularity, str(self.group_size))
        return f"w{self.bits}g{g}" + ("s" if self.sym else "")


def int_range(bits: int, sym: bool) -> tuple[int, int]:
    """Unsigned code range [qmin, qmax] used for storage. Sym codes are stored with zero point 2^(bits-1)."""
    return 0, 2**bits - 1
