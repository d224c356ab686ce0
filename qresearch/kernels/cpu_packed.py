"""Weight-only packed linears on CPU through real low-bit kernels instead of the dequantize-everything reference,
registered in the kernel registry (dispatch.py) as backend "cpu" (QRESEARCH_KERNELS=cpu keeps only them).

Three kernels, tried in this order (priorities between Triton's 10 and the reference's 100):
  aten_int4  torch.ops.aten._weight_int4pack_mm_for_cpu: codes < 16 (bits <= 4), bf16 activations. The op
             dequantizes (q - 8) * scale + zero, so zero = (8 - z) * s gives our (q - z) * s.
  aten_int8  torch.ops.aten._weight_int8pack_mm: per-channel, bf16 activations; int8 values q - 2^(b-1),
             asymmetric layers add rowsum(x) * (2^(b-1) - z) * s.
  c_lowbit   our fused dequant-matmul (cpu_lowbit.py, csrc/lowbit_cpu.c; fp32 math): any bits 2..8, any group,
             fp32/bf16/fp16 activations.
The aten ops' fp32/fp16 paths are slower than a dense fp32 matmul (experiments/bench_kernels.py), so they take
bf16 only. `prepare(kind, ...)` unpacks the int32_k buffers once and hands the codes to that kernel's prepare_*;
`LINEAR[kind](x, prepared, bias)` runs it; `run` keeps the prepared weights until the layer's buffers change,
and sends calls with many rows where the dense matmul is faster (bf16 from 32 rows) to cpu_panels.py.
Memory: the aten ops (and torch._int_mm's int8 weight, where W8A8 layers cannot run cpu_int8's VNNI kernel on the
stored codes) hold a second copy of the weight in their own layout beside the stored buffers (peak memory counts
both; "stored bytes" counts the buffers); c_lowbit reads 4- and 8-bit stored words in place when groups and width
are multiples of 32 (then only fp32 scales / zeros are made), else it copies.

Act-order (g_idx): when every group holds exactly `group` input columns (as GPTQ act-order writes them),
permuting the weight's columns once and the input's columns per call (x[:, perm]) makes the groups contiguous.
The registry sees only whether a layer has g_idx, not its values: another g_idx is refused at prepare with an
error naming QRESEARCH_KERNELS=torch (never a silent switch to another kernel).
"""
from __future__ import annotations

from functools import partial

import torch

from ..quant.packing import PackedMeta, unpack_rows
from . import cpu_aten, cpu_lowbit, cpu_panels
from . import reference as ref
from .cpu_aten import INT4_GROUPS, int4_op_group
from .dispatch import Kernel, LayerKey, register
from .int_mm import prepare_int8_weight
from .prepared import STAMPED, act_order_perm, cached, rebinding
from .reference import weight_zeros

FAST_ATEN_DTYPES = (torch.bfloat16,)
KERNELS = ("aten_int4", "aten_int8", "c_lowbit")
PRIORITY = {"aten_int4": 20, "aten_int8": 21, "c_lowbit": 30}


def _layer_reason(key: LayerKey, op: str | None = None) -> str | None:
    """Why no CPU kernel can run this layer at all (None: the kernel's own checks decide)."""
    m = key.meta
    if key.device.type != "cpu":
        return f"device {key.device.type} (the CPU kernels take CPU tensors)"
    if m.qformat != "int":
        return f"qformat={m.qformat} (the CPU kernels take integer codes)"
    if m.scale_coding.coded:
        return f"two-level scales (scale_bits={m.scale_bits}) are not decoded by the CPU kernels"
    if m.layout != "int32_k":
        return f"layout {m.layout}"
    if op is not None and not hasattr(torch.ops.aten, op):
        return f"torch {torch.__version__} has no aten.{op}"
    return None


def why_not_int4(key: LayerKey) -> str | None:
    m = key.meta
    if why := _layer_reason(key, "_weight_int4pack_mm_for_cpu"):
        return why
    if m.bits > 4:
        return f"bits={m.bits} (the int4 op holds codes < 16)"
    if key.dtype not in FAST_ATEN_DTYPES:
        return f"activation dtype {key.dtype} (the int4 op is fast for bf16 only)"
    if int4_op_group(m) is None:
        return f"group {m.group} is no multiple of {min(INT4_GROUPS)} (int4 op groups: {INT4_GROUPS})"
    return None


def why_not_int8(key: LayerKey) -> str | None:
    if why := _layer_reason(key, "_weight_int8pack_mm"):
        return why
    if key.meta.n_groups != 1:
        return f"group {key.meta.group} (the int8 op scales per output channel only)"
    if key.dtype not in FAST_ATEN_DTYPES:
        return f"activation dtype {key.dtype} (the int8 op is fast for bf16 only)"
    return None


def why_not_c(key: LayerKey) -> str | None:
    if why := _layer_reason(key):
        return why
    if key.dtype not in cpu_lowbit.DTYPES:
        return f"activation dtype {key.dtype} (our C kernel takes {', '.join(str(d) for d in cpu_lowbit.DTYPES)})"
    return cpu_lowbit.load()[1] or None  # no C compiler / build failed: the build's message


WHY_NOT = {"aten_int4": why_not_int4, "aten_int8": why_not_int8, "c_lowbit": why_not_c}


def prepare(kind: str, meta: PackedMeta, qweight, scales, qzeros, g_idx, dtype: torch.dtype):
    """Unpack the int32_k buffers once (act-order columns made contiguous) into kernel `kind`'s layout; c_lowbit
    reads 4- and 8-bit buffers in place where their groups allow it (cpu_lowbit.prepare_lowbit_stored)."""
    perm, why = act_order_perm(g_idx, meta)
    if why:
        raise ValueError(f"{kind} cannot run this layer: {why} (GPTQ act-order does); set QRESEARCH_KERNELS=torch")
    if kind == "c_lowbit" and perm is None:  # the stored words as they are, where they are the kernel's layout
        stored = cpu_lowbit.prepare_lowbit_stored(meta, qweight, scales, weight_zeros(meta, qzeros))
        if stored is not None:
            return stored
    codes = unpack_rows(qweight, meta.bits, meta.in_features)  # [out, in] uint8
    codes = codes if perm is None else codes[:, perm.to(codes.device)]
    return PREPARE[kind](meta, codes, scales, weight_zeros(meta, qzeros).to(qweight.device), perm, dtype)


PREPARE = {"aten_int4": cpu_aten.prepare_int4, "aten_int8": cpu_aten.prepare_int8,
           "c_lowbit": cpu_lowbit.prepare_lowbit,  # (meta, codes, scales, zeros, perm, dtype) -> prepared
           "int_mm": prepare_int8_weight}  # the W8A8 layers' int8 weight (dispatch's torch_int_mm kernel)
LINEAR = {"aten_int4": cpu_aten.int4_linear, "aten_int8": cpu_aten.int8_linear,
          "c_lowbit": cpu_lowbit.lowbit_linear}  # (x, prepared, bias) -> y


def prepared_for(kind: str, meta: PackedMeta, bufs: dict, dtype: torch.dtype):
    """The layer's weights in kernel `kind`'s layout, made once per (kind, dtype) and kept while the layer's
    buffers are the same tensors at the same version (kernels/prepared.py)."""
    return cached((kind, dtype), bufs, lambda: prepare(kind, meta, *(bufs[k] for k in STAMPED), dtype))


def run(kind: str, x: torch.Tensor, meta: PackedMeta, bufs: dict, mode=None) -> torch.Tensor:
    """y [M, out] = layer(x [M, in]) with kernel `kind` (the registry's run signature with `kind` bound)."""
    grad = torch.is_grad_enabled() and x.requires_grad
    if not grad and cpu_panels.use_panels(kind, x.shape[0], x.dtype):  # many rows: panels + the dense matmul
        return cpu_panels.linear(x, meta, bufs)  # (its panel buffer is reused: autograd must not keep it)
    prepared = prepared_for(kind, meta, bufs, x.dtype)
    if grad:  # the kernels have no backward: d/dx through the reference
        weight_fn = partial(ref.dequant_weight, meta, *(bufs[k] for k in STAMPED))
        return _WithInputGrad.apply(x, kind, prepared, bufs.get("bias"), weight_fn)
    return LINEAR[kind](x, prepared, bufs.get("bias"))


WATCHED = (*STAMPED, "bias")  # the buffers a plan's bound call was made from


def plan(kind: str, x: torch.Tensor, meta: PackedMeta, bufs: dict, mode=None):
    """run() for calls like x (its rows and dtype) with the layer's prepared weights, bias and loop bound once: a
    function of x alone (QuantLinear keeps it per layer: dispatch plans), rebound when a WATCHED buffer changes in
    place (QuantLinear makes a new plan when one is replaced); calls that need an input gradient take run(). None
    where run() sends such calls to the panels."""
    m, dtype = x.shape[0], x.dtype
    if cpu_panels.use_panels(kind, m, dtype):
        return None
    bound = rebinding(bufs, WATCHED, lambda: BIND[kind](prepared_for(kind, meta, bufs, dtype), bufs.get("bias"), m,
                                                        dtype))

    def call(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return run(kind, x, meta, bufs, mode)
        return bound(x)
    return call


def _bind(linear):
    """BIND entry of a kernel whose linear(x, prepared, bias) has nothing more to fix per call."""
    return lambda prepared, bias, m, dtype: partial(linear, p=prepared, bias=bias)


BIND = {"aten_int4": _bind(cpu_aten.int4_linear), "aten_int8": _bind(cpu_aten.int8_linear),
        "c_lowbit": cpu_lowbit.bind_linear}  # (prepared, bias, rows, dtype) -> a function of x


class _WithInputGrad(torch.autograd.Function):
    """Kernel forward; backward dy @ W with W dequantized by the reference (weights are buffers: no grad)."""

    @staticmethod
    def forward(ctx, x, kind, prepared, bias, weight_fn):
        ctx.weight_fn = weight_fn
        return LINEAR[kind](x, prepared, bias)

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.weight_fn().to(dy.dtype), None, None, None, None  # [M, out] @ [out, in]


def _weight_only(key: LayerKey) -> bool:
    return key.mode.kind != "int8"  # A16, or fake-quantized activations (the layer quantizes x before the call)


CPU_KERNELS = tuple(Kernel(k, "cpu", PRIORITY[k], _weight_only, WHY_NOT[k], partial(run, k), partial(plan, k))
                    for k in KERNELS)
for _k in CPU_KERNELS:
    register(_k)
