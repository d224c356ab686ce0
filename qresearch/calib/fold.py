"""Folding per-input-channel scales into a block (AWQ, SmoothQuant): prev.out /= s, linear.in *= s.
The FP function is unchanged (up to float rounding): x W^T = (x / s) (W * s)^T."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..models.arch import ArchInfo, ScalePair, get_module


def pair_channels(block: nn.Module, pair: ScalePair) -> int | None:
    """Number of channels a scale for `pair` has, or None when the pair cannot be folded in this block
    (a module is missing, or shapes disagree, e.g. v -> o under grouped-query attention)."""
    prev = get_module(block, pair.prev)
    lins = [get_module(block, n) for n in pair.linears]
    if prev is None or any(not isinstance(lin, nn.Linear) for lin in lins):
        return None
    if pair.kind == "norm":
        n = getattr(prev, "weight", None)
        n = None if n is None else n.numel()
    elif pair.kind == "linear":
        n = prev.out_features if isinstance(prev, nn.Linear) else None
    else:
        raise ConfigError(f"scale pair kind={pair.kind!r} is unknown; allowed: norm, linear")
    return n if n is not None and all(lin.in_features == n for lin in lins) else None


def foldable_pairs(block: nn.Module, arch: ArchInfo) -> list[ScalePair]:
    """The architecture's scale pairs that fold exactly in this block (shapes permitting)."""
    return [p for p in arch.pairs if pair_channels(block, p) is not None]


@torch.no_grad()
def fold_scales(block: nn.Module, pair: ScalePair, s: torch.Tensor) -> None:
    """In place: divide prev's output channels by s [C] and multiply the linears' input columns by s."""
    if pair_channels(block, pair) != s.numel():
        raise ValueError(f"scale of {s.numel()} channels does not fit pair {pair.prev} -> {pair.linears}")
    prev = get_module(block, pair.prev)
    if pair.kind == "norm":
        prev.weight.div_(s.to(prev.weight))
    else:
        prev.weight.div_(s.to(prev.weight)[:, None])  # [out, in] rows
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s.to(prev.bias))
    for name in pair.linears:
        lin = get_module(block, name)
        lin.weight.mul_(s.to(lin.weight)[None, :])  # [out, in] columns


# relative output error of the block above which a fold counts as not exact, by the block's dtype
FOLD_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def block_rel_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outs, refs))
    den = sum(float(r.double().pow(2).sum()) for r in refs)
    return (num / max(den, 1e-300)) ** 0.5


@torch.no_grad()
def checked_fold(block: nn.Module, pair: ScalePair, s: torch.Tensor, run, refs: list[torch.Tensor],
                 tol: float | None = None) -> tuple[bool, float]:
    """Fold s for `pair`, then compare the block's outputs `run()` with the FP outputs `refs`. A fold whose
    relative error exceeds `tol` (default by dtype, FOLD_TOL) is not exact here (e.g. a post-LN norm whose output
    also feeds the residual, or a non-homogeneous activation between two linears): it is undone.
    Returns (kept, relative error)."""
    prev = get_module(block, pair.prev)
    saved = [t.detach().clone() for t in _fold_params(block, pair)]
    fold_scales(block, pair, s)
    err = block_rel_error(run(), refs)
    tol = FOLD_TOL.get(prev.weight.dtype, 5e-2) if tol is None else tol
    if err <= tol:
        return True, err
    for t, old in zip(_fold_params(block, pair), saved):
        t.copy_(old)
    return False, err


def _fold_params(block: nn.Module, pair: ScalePair) -> list[torch.Tensor]:
    prev = get_module(block, pair.prev)
    out = [prev.weight] + ([prev.bias] if getattr(prev, "bias", None) is not None else [])
    return out + [get_module(block, n).weight for n in pair.linears]
