"""Cached launches of Triton kernels: the host half of a small call.

A Triton JIT call (`kernel[grid](*args, **constexprs)`) binds its arguments, computes their specialization
(dtype and 16-byte alignment of each pointer, integer classes), looks the compiled kernel up and launches it:
27 us of host time per call on the H100 machine, against 13 us through the CompiledKernel the JIT call returns
(results/host_launch_nvidia_h100_80gb_hbm3.json). At decode every packed linear is one such call, so eager
decode was host-bound (0.67x fp16 for a 7B-shaped model while its CUDA-graph step ran 1.49x).

`Launcher(kernel)(grid, *args, num_warps=, **constexprs)` keys each call on what can change the compiled kernel:
every tensor argument's dtype and 16-byte alignment, the device of the first argument (a tensor in every kernel
here), every other argument's exact value and type (finer than Triton's own integer specialization, so never
coarser: one entry per distinct value, e.g. per token count M), the constexprs and launch options. The first call of
a key goes through the JIT (compiling if needed) and keeps the CompiledKernel it returns; later calls launch it
directly, with the same arguments in the kernel's parameter order. Under TRITON_INTERPRET=1 the JIT call returns no
compiled kernel and every call stays a JIT call; so does every call inside `jit_only()`.
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch

# Triton reads TRITON_INTERPRET when it decorates a kernel, i.e. when the kernel modules (which import this one) load:
# read once here, the kernel modules' per-call "am I interpreted" check costs nothing
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_STATE = {"cached": True}  # False inside jit_only(): every launch a JIT call (an A/B of the launch path)


def cached() -> bool:
    """False inside jit_only()."""
    return _STATE["cached"]


@contextlib.contextmanager
def jit_only():
    """Launch through Triton's JIT (autotuned kernels: through the autotuner) on every call inside this block: what
    every launch was before this module."""
    before = _STATE["cached"]
    _STATE["cached"] = False
    try:
        yield
    finally:
        _STATE["cached"] = before


class Launcher:
    """One @triton.jit kernel's launches, cached per specialization key (see the module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        sig = inspect.signature(getattr(kernel, "fn", kernel)).parameters  # the kernel's Python function
        self.params = list(sig)
        self.defaults = {n: p.default for n, p in sig.items() if p.default is not inspect.Parameter.empty}
        self.cache: dict[tuple, tuple] = {}  # key -> (CompiledKernel, constexpr values in parameter order)

    def __call__(self, grid: tuple, *args, num_warps: int = 4, num_stages: int | None = None, **constexprs):
        """Launch; returns the (CompiledKernel, constexpr values) entry of this key, None when there is none (the
        interpreter, jit_only()). A caller whose later calls differ only in tensors of the same dtype and alignment
        may launch that entry itself: `entry[0][grid3](*args, *entry[1])` (triton_gemv's bound calls do)."""
        key = (tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (a.__class__, a)
                      for a in args]), args[0].device.index, tuple(constexprs.items()), num_warps, num_stages)
        hit = self.cache.get(key) if _STATE["cached"] else None
        if hit is not None:
            compiled, tail = hit
            compiled[grid + (1,) * (3 - len(grid))](*args, *tail)
            return hit
        opts = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
        compiled = self.kernel[grid](*args, **constexprs, **opts)
        if not hasattr(compiled, "packed_metadata"):  # the interpreter: no CompiledKernel
            return None
        tail = tuple(constexprs[n] if n in constexprs else self.defaults[n] for n in self.params[len(args):])
        self.cache[key] = (compiled, tail)
        return self.cache[key] if _STATE["cached"] else None
