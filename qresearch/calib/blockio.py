"""Inputs of one decoder block over the calibration set: capture them, subset them, run the block on them."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..models.arch import ArchInfo, blocks_of


class Stop(Exception):
    """Raised from a hook to end a forward early once what we need has been recorded."""


@dataclass
class BlockIO:
    """Inputs of one block for every calibration batch: hidden [b, seq, hidden] and the kwargs the model passed."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def first_output(y):
    """A block / attention module returns a tuple whose first element is the hidden state."""
    return y[0] if isinstance(y, (tuple, list)) else y


def block_forward(block: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    return first_output(block(h, **kw))


@torch.no_grad()
def run_block(block: nn.Module, io: BlockIO, limit: int | None = None) -> list[torch.Tensor]:
    """Block outputs for the first `limit` batches of `io` (all when None)."""
    n = len(io.hidden) if limit is None else min(limit, len(io.hidden))
    return [block_forward(block, io.hidden[i], io.kwargs[i]) for i in range(n)]


@torch.no_grad()
def capture_inputs(model: nn.Module, arch: ArchInfo, calib: torch.Tensor, device: torch.device,
                   batch_size: int) -> BlockIO:
    """Run the model's pre-block modules on `calib` [n, seq] and record what block 0 receives."""
    block0 = blocks_of(model, arch)[0]
    hidden, kwargs = [], []

    def hook(_mod, args, kw):
        kw = dict(kw)
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach())
        kwargs.append({k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")})
        raise Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):  # [b, seq]
            with contextlib.suppress(Stop):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return BlockIO(hidden, kwargs)


def _take(x, b: int, n: int):
    """First n rows of every tensor in x whose leading dim is the batch size b (hidden, masks, cos/sin)."""
    if isinstance(x, torch.Tensor):
        return x[:n] if x.dim() > 0 and x.shape[0] == b and b > 1 else x
    if isinstance(x, (tuple, list)):
        return type(x)(_take(v, b, n) for v in x)
    if isinstance(x, dict):
        return {k: _take(v, b, n) for k, v in x.items()}
    return x


def subset(io: BlockIO, n: int | None) -> BlockIO:
    """The first n calibration windows of io (all when n is None)."""
    if n is None:
        return io
    hidden, kwargs, left = [], [], n
    for h, kw in zip(io.hidden, io.kwargs):
        if left <= 0:
            break
        k = min(left, h.shape[0])
        hidden.append(h[:k])
        kwargs.append(_take(kw, h.shape[0], k) if k < h.shape[0] else kw)
        left -= k
    return BlockIO(hidden, kwargs)
