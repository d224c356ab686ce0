"""Quantization primitives, numeric formats and observers."""
from ..errors import ConfigError
from .formats import FORMATS, NumericFormat, get_format
from .primitives import (QTensor, choose_qparams, dequantize, fake_quantize, group_minmax, qparams_from_minmax,
                         quantize, quantize_tensor)
from .spec import QuantSpec

__all__ = ["FORMATS", "NumericFormat", "QTensor", "QuantSpec", "ConfigError", "choose_qparams", "dequantize",
           "fake_quantize", "get_format", "group_minmax", "qparams_from_minmax", "quantize", "quantize_tensor",
           "weight_spec"]


def weight_spec(bits: int, group_size: int = 128, sym: bool = False, qformat: str = "int") -> "QuantSpec | None":
    """Spec for weight quantization from the top-level knobs; bits=16 means 'off' (None)."""
    if bits == 16:
        return None
    if group_size == 0 or group_size < -1:
        raise ConfigError(f"group_size={group_size} is invalid; allowed: -1 (per-channel) or a positive int")
    gran = "channel" if group_size == -1 else "group"
    return QuantSpec(bits=bits, group_size=group_size, sym=sym, granularity=gran, qformat=qformat)
