"""Sequential block-by-block calibration: capture block 0's inputs, then per block let a method quantize it and
re-run it to produce the next block's inputs (from the quantized or the FP block). Only the current block needs to
live on the compute device (`offload`): the others wait on the CPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..models.arch import ArchInfo, blocks_of, get_module
from .blockio import BlockIO, capture_inputs, run_block
from .hooks import swapped_weights

PROPAGATE = ("quantized", "fp")


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
    peak_device_bytes: int = 0  # block weights + calibration activations in and out (CUDA: allocator peak)
    block_bytes: int = 0
    activation_bytes: int = 0

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "peak_device_bytes": self.peak_device_bytes,
                "max_block_bytes": self.block_bytes, "activation_bytes": self.activation_bytes}


def _param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters()) + sum(
        b.numel() * b.element_size() for b in m.buffers())


@dataclass
class BlockResult:
    """What `process` may return instead of the bare weights: the weights and the block's outputs on its inputs
    computed with them (the method already ran that forward, so the engine does not run it again)."""

    weights: dict[str, torch.Tensor]
    outputs: list[torch.Tensor]


# process(i, block, io) quantizes block i (it may fold scales in place) and returns {linear name: quantized W}
# (or a BlockResult with the quantized block's outputs too)
BlockFn = Callable[[int, nn.Module, BlockIO], "dict[str, torch.Tensor] | BlockResult"]


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
    for i, block in enumerate(blocks_of(model, arch)):
        block.to(device)
        fp_out = run_block(block, io) if cfg.propagate == "fp" else None
        qweights = process(i, block, io)
        if isinstance(qweights, BlockResult):
            fp_out = qweights.outputs if fp_out is None else fp_out
            qweights = qweights.weights
        if fp_out is None:
            with swapped_weights(block, qweights):
                fp_out = run_block(block, io)
        on_dev = _param_bytes(block) + io.nbytes()
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
