"""Quantization primitives, numeric formats and observers."""
from ..errors import ConfigError
from .formats import FORMATS, NumericFormat, get_format
from .primitives import (QTensor, choose_qparams, dequantize, fake_quantize, fit_qparams, group_minmax,
                         qparams_from_minmax, quantize, quantize_tensor)
from .spec import QuantSpec

__all__ = ["FORMATS", "NumericFormat", "QTensor", "QuantSpec", "ConfigError", "choose_qparams", "dequantize",
           "fake_quantize", "fit_qparams", "get_format", "group_minmax", "qparams_from_minmax", "quantize", "quantize_tensor",
           "weight_spec"]


def weight_spec(bits: int, group_size: int = 128, sym: bool = False, qformat: str = "int",
                scale_bits: int | None = None, scale_level2: str = "channel") -> "QuantSpec | None":
    """Spec for weight quantization from the top-level knobs; bits=16 means 'off' (None). group_size -1 =
    per-channel; 0 = per-tensor only where the format shares one fit per layer (kmeans: one palette per layer)."""
    if bits == 16:
        return None
    if group_size < -1 or (group_size == 0 and qformat != "kmeans"):
        allowed = ", 0 (per-layer palette)" if qformat == "kmeans" else ""
        raise ConfigError(f"group_size={group_size} is invalid; allowed: -1 (per-channel){allowed} or a positive int")
    gran = {-1: "channel", 0: "tensor"}.get(group_size, "group")
    return QuantSpec(bits=bits, group_size=group_size, sym=sym, granularity=gran, qformat=qformat,
                     scale_bits=scale_bits, scale_level2=scale_level2)
