"""Hooks on a block's submodules: record inputs, cache submodule outputs, swap weights temporarily."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..models.arch import get_module
from .blockio import BlockIO, Stop, block_forward, first_output


@torch.no_grad()
def record_inputs(block: nn.Module, io: BlockIO, names: list[str], fn: Callable[[str, torch.Tensor], None],
                  stop_after: bool = False, limit: int | None = None) -> None:
    """Forward `io` through `block`, calling fn(name, x) with each named submodule's input x [b, seq, in].

    With `stop_after`, each forward stops once every named module has been seen (saves the rest of the block).
    """
    seen: set[str] = set()
    handles = []
    for name in names:
        def hook(_mod, args, name=name):
            fn(name, args[0].detach())
            seen.add(name)
            if stop_after and len(seen) == len(names):
                raise Stop
        handles.append(get_module(block, name).register_forward_pre_hook(hook))
    try:
        n = len(io.hidden) if limit is None else min(limit, len(io.hidden))
        for i in range(n):
            seen.clear()
            with contextlib.suppress(Stop):
                block_forward(block, io.hidden[i], io.kwargs[i])
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def output_cache(block: nn.Module, io: BlockIO, names: set) -> dict:
    """{submodule name, or None for the whole block: [(args, kwargs, FP output)]} over the batches of io:
    what a search needs to re-run one submodule with candidate weights and compare to the FP output."""
    cache: dict = {n: [] for n in names}
    hooks = []
    for name in names - {None}:
        def hook(_m, args, kwargs, out, name=name):
            cache[name].append((args, dict(kwargs), first_output(out).detach()))
        hooks.append(get_module(block, name).register_forward_hook(hook, with_kwargs=True))
    try:
        for h, kw in zip(io.hidden, io.kwargs):
            out = block_forward(block, h, kw)
            if None in cache:
                cache[None].append(((h,), kw, out))
    finally:
        for hk in hooks:
            hk.remove()
    return cache


@contextlib.contextmanager
def swapped_weights(block: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the named linears of `block` other weights [out, in] (e.g. quantized ones)."""
    saved = {}
    try:
        for name, w in weights.items():
            lin = get_module(block, name)
            saved[name] = lin.weight.data
            lin.weight.data = w.to(lin.weight.dtype).to(lin.weight.device)
        yield
    finally:
        for name, w in saved.items():
            get_module(block, name).weight.data = w
