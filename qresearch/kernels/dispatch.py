"""The one dispatch point: Triton on CUDA when the layer's format, shape and dtype are supported; on CPU the
low-bit kernels of cpu_packed (aten int4/int8 weight-packed ops, our C kernel); else the pure-torch reference.
The choice is a name ("triton_w4a16", "c_lowbit_w4a16", "torch_ref_w8a8", ...) that QuantLinear exposes as
`kernel_name` and the run records per layer (DESIGN rule 7: no silent fallbacks).

QRESEARCH_KERNELS=torch forces the reference everywhere; =triton forces Triton (on CPU only under
TRITON_INTERPRET=1, which is how the tests run the Triton kernels); =cpu forces the CPU kernels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..method import ActQuant
from ..quant.packing import PackedMeta
from . import cpu_packed

TRITON_DTYPES = (torch.float16, torch.bfloat16)  # fp32 would go through TF32 tensor cores: not our reference
BACKENDS = ("auto", "torch", "triton", "cpu")


@dataclass(frozen=True)
class ActMode:
    """How a packed layer treats its input: 'none' (A16), 'int8' (W8A8 int GEMM), 'fake' (fake-quant + A16 ref)."""

    kind: str
    bits: int = 16
    dynamic_tensor: bool = False  # per-tensor dynamic scale (SmoothQuant O2): computed per call in torch


def act_mode(meta: PackedMeta, act: ActQuant | None, has_gidx: bool) -> ActMode:
    """Classify a layer's activation quantization; int8 only for sym per-channel 8-bit weights."""
    if act is None:
        return ActMode("none")
    s = act.spec
    w_ok = meta.bits == 8 and meta.sym and meta.n_groups == 1 and not has_gidx
    a_ok = not s.is_fp8 and s.bits == 8 and (act.static_scale is not None or
                                             (s.sym and s.granularity in ("token", "tensor")))
    if w_ok and a_ok:
        return ActMode("int8", 8, act.static_scale is None and s.granularity == "tensor")
    return ActMode("fake", s.bits)


def family(meta: PackedMeta, mode: ActMode) -> str:
    return f"w{meta.bits}a{mode.bits}" if mode.kind != "int8" else "w8a8"


def backend() -> str:
    b = os.environ.get("QRESEARCH_KERNELS", "auto")
    if b not in BACKENDS:
        raise ValueError(f"QRESEARCH_KERNELS={b!r} is unknown; allowed: {', '.join(BACKENDS)}")
    return b


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_supports(meta: PackedMeta, mode: ActMode, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(supported, reason when not) for running this layer's Triton kernel."""
    if mode.kind == "fake":
        return False, f"activation quantization a{mode.bits} has no Triton kernel"
    if device.type != "cuda" and not interpreting():
        return False, f"device {device.type} (Triton needs CUDA, or TRITON_INTERPRET=1)"
    if device.type == "cuda" and mode.kind != "int8" and dtype not in TRITON_DTYPES:
        return False, f"activation dtype {dtype} (Triton kernels take fp16/bf16)"
    if meta.layout != "int32_k":
        return False, f"layout {meta.layout}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return True, ""


def choose(meta: PackedMeta, mode: ActMode, device: torch.device, dtype: torch.dtype,
           g_idx: torch.Tensor | None = None) -> tuple[str, str]:
    """(kernel name, reason the reference was chosen or '')."""
    fam = family(meta, mode)
    b = backend()
    if b == "torch":
        return f"torch_ref_{fam}", "QRESEARCH_KERNELS=torch"
    ok, why = (False, "QRESEARCH_KERNELS=cpu") if b == "cpu" else triton_supports(meta, mode, device, dtype)
    if b == "triton" and not ok:
        raise RuntimeError(f"QRESEARCH_KERNELS=triton but {fam} cannot run in Triton here: {why}")
    if ok:
        return f"triton_{fam}", ""
    if device.type == "cpu":
        kind, cpu_why = cpu_packed.select(meta, mode.kind, dtype, g_idx)
        if kind is not None:
            return f"{kind}_{fam}", ""
        why = f"{why}; {cpu_why}"
    if b == "cpu":
        raise RuntimeError(f"QRESEARCH_KERNELS=cpu but {fam} cannot run in a CPU kernel here: {why}")
    return f"torch_ref_{fam}", why


def run(kernel: str, x: torch.Tensor, meta: PackedMeta, bufs: dict, mode: ActMode) -> torch.Tensor:
    """y [M, N] = layer(x [M, K]) with the named kernel. `bufs`: qweight, scales, qzeros, g_idx, bias, act_scale,
    and `prepared` (the layer's cache of CPU-kernel weights)."""
    qw, s, z, gi, b = (bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx", "bias"))
    static = bufs.get("act_scale")
    if mode.dynamic_tensor:  # one scale for the whole tensor, absmax / 127 as primitives computes it
        amax = x.detach().abs().amax().float()
        static = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    if kernel.startswith(cpu_packed.KERNELS):
        return cpu_packed.run(kernel.rsplit("_", 1)[0], x, meta, bufs)
    if kernel.startswith("triton_"):
        if mode.kind == "int8":
            from .triton_w8a8 import w8a8_linear

            return w8a8_linear(x, meta, qw, s, b, static)
        from .triton_wq import wq_linear

        return wq_linear(x, meta, qw, s, z, gi, b)
    from . import reference as ref

    if mode.kind == "int8":
        return ref.w8a8_ref(x, meta, qw, s, b, static)
    return ref.wa16_ref(x, meta, qw, s, z, gi, b)
