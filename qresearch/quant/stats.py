"""Per-layer error statistics (small pure functions)."""
import torch

from ..errors import NumericalError


def rel_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||ref - approx||_F / ||ref||_F in float64."""
    ref, approx = ref.double(), approx.double()
    return float((ref - approx).norm() / ref.norm().clamp_min(1e-30))


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise a one-line error if a quantized tensor holds NaN/inf."""
    if not torch.isfinite(t).all():
        raise NumericalError(f"{name}: quantized weights contain NaN/inf ({int((~torch.isfinite(t)).sum())} values)")
