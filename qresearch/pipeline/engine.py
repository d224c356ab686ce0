"""Sequential block-by-block calibration: capture block 0's inputs, then per block let a method quantize it and
re-run it to produce the next block's inputs (from the quantized or the FP block). Only the current block needs to
live on the compute device (`offload`): the others wait on the CPU.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..models.arch import ArchInfo, blocks_of, get_module
from ..quant.spec import ConfigError

PROPAGATE = ("quantized", "fp")


class _Stop(Exception):
    """Raised from a hook to end a forward early once what we need has been recorded."""


@dataclass
class BlockIO:
    """Inputs of one block for every calibration batch: hidden [b, seq, hidden] and the kwargs the model passed."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


@dataclass
class EngineConfig:
    """How calibration runs: batch size of block forwards, offload, and which outputs feed the next block."""

    batch_size: int = 8
    offload: bool = True
    propagate: str = "quantized"  # quantized | fp

    def __post_init__(self):
        if self.propagate not in PROPAGATE:
            raise ConfigError(f"propagate={self.propagate!r} is unknown; allowed: {', '.join(PROPAGATE)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} is invalid; allowed: a positive int")


@dataclass
class EngineStats:
    """What one calibration pass cost: seconds and the most bytes placed on the compute device at once."""

    seconds: float = 0.0
    peak_device_bytes: int = 0  # block weights + calibration activations (+ method buffers it reports)
    block_bytes: int = 0
    activation_bytes: int = 0
    blocks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "peak_device_bytes": self.peak_device_bytes,
                "max_block_bytes": self.block_bytes, "activation_bytes": self.activation_bytes}


def _to(x, device):
    """Move tensors (also inside tuples / dicts) to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters()) + sum(
        b.numel() * b.element_size() for b in m.buffers())


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
        raise _Stop

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):  # [b, seq]
            with contextlib.suppress(_Stop):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        handle.remove()
    return BlockIO(hidden, kwargs)


def block_forward(block: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(h, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, io: BlockIO, limit: int | None = None) -> list[torch.Tensor]:
    """Block outputs for the first `limit` batches of `io` (all when None)."""
    n = len(io.hidden) if limit is None else min(limit, len(io.hidden))
    return [block_forward(block, io.hidden[i], io.kwargs[i]) for i in range(n)]


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
                raise _Stop
        handles.append(get_module(block, name).register_forward_pre_hook(hook))
    try:
        n = len(io.hidden) if limit is None else min(limit, len(io.hidden))
        for i in range(n):
            seen.clear()
            with contextlib.suppress(_Stop):
                block_forward(block, io.hidden[i], io.kwargs[i])
    finally:
        for h in handles:
            h.remove()


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


# process(i, block, io) quantizes block i (it may fold scales in place) and returns {linear name: quantized W}
BlockFn = Callable[[int, nn.Module, BlockIO], dict[str, torch.Tensor]]


def _place(model: nn.Module, arch: ArchInfo, device: torch.device, offload: bool) -> None:
    """With offload, everything waits on the CPU except the modules that run before block 0."""
    if offload and device.type != "cpu":
        model.to("cpu")
        for name in arch.pre:
            mod = get_module(model, name)
            if mod is not None:
                mod.to(device)


def calibrate(model: nn.Module, arch: ArchInfo, calib: torch.Tensor, device: torch.device, process: BlockFn,
              cfg: EngineConfig | None = None) -> EngineStats:
    """Drive `process` over every block in order; returns timing and device-memory accounting."""
    cfg = cfg or EngineConfig()
    stats, t0 = EngineStats(), time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _place(model, arch, device, cfg.offload)
    io = capture_inputs(model, arch, calib, device, cfg.batch_size)
    blocks = blocks_of(model, arch)
    for i, block in enumerate(blocks):
        block.to(device)
        fp_out = run_block(block, io) if cfg.propagate == "fp" else None
        qweights = process(i, block, io)
        if fp_out is None:
            with swapped_weights(block, qweights):
                fp_out = run_block(block, io)
        on_dev = _param_bytes(block) + io.nbytes()
        stats.blocks.append({"block": i, "device_bytes": on_dev})
        stats.peak_device_bytes = max(stats.peak_device_bytes, on_dev + io.nbytes())  # inputs + outputs
        stats.block_bytes, stats.activation_bytes = max(stats.block_bytes, _param_bytes(block)), io.nbytes()
        if cfg.offload and device.type != "cpu":
            block.to("cpu")
        io = BlockIO(fp_out, io.kwargs)
    if cfg.offload and device.type != "cpu":
        model.to(device)
    if device.type == "cuda":
        stats.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    stats.seconds = time.perf_counter() - t0
    return stats
