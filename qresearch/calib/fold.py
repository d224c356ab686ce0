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
