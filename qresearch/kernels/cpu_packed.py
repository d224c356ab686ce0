"""Weight-only packed linears on CPU through real low-bit kernels instead of the dequantize-everything reference.

Three kernels, tried in this order (the first whose `supports_*` returns None runs; the reasons of the others are
what dispatch reports):
  aten_int4  torch.ops.aten._weight_int4pack_mm_for_cpu: codes < 16 (bits <= 4), bf16 activations. The op
             dequantizes (q - 8) * scale + zero, so zero = (8 - z) * s gives our (q - z) * s.
  aten_int8  torch.ops.aten._weight_int8pack_mm: per-channel, bf16 activations; int8 values q - 2^(b-1),
             asymmetric layers add rowsum(x) * (2^(b-1) - z) * s.
  c_lowbit   our fused dequant-matmul (cpu_lowbit.py, csrc/lowbit_cpu.c; fp32 math): any bits 2..8, any group,
             fp32/bf16/fp16 activations.
The aten ops' fp32/fp16 paths are slower than a dense fp32 matmul (experiments/bench_kernels.py), so they take
bf16 only. `prepare(kind, ...)` unpacks the int32_k buffers once and hands the codes to that kernel's prepare_*;
`LINEAR[kind](x, prepared, bias)` runs it; `run` keeps the prepared weights in the layer's cache.

Act-order (g_idx): when every group holds exactly `group` input columns (GPTQ act-order), permuting the weight's
columns once and the input's columns per call (x[:, perm]) makes the groups contiguous.
"""
from __future__ import annotations

import weakref

import torch

from ..quant.packing import PackedMeta, unpack_rows
from . import cpu_aten, cpu_lowbit
from . import reference as ref
from .cpu_aten import INT4_GROUPS, int4_op_group
from .reference import weight_zeros

FAST_ATEN_DTYPES = (torch.bfloat16,)
KERNELS = ("aten_int4", "aten_int8", "c_lowbit")
_PERMS: dict[tuple, tuple] = {}  # (group, in, g_idx stamp) -> (weakref g_idx, column permutation or None: not clean)


def _stamp(t: torch.Tensor | None) -> tuple | None:
    """(storage address, in-place version): changes when a buffer is replaced or written (load_state_dict)."""
    if t is None:
        return None
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # inference-mode tensors keep no version counter (and cannot be written outside it)
        return t.data_ptr(), -1


def act_order_perm(g_idx: torch.Tensor | None, meta: PackedMeta) -> tuple[torch.Tensor | None, str | None]:
    """(perm making groups contiguous or None without g_idx, reason when g_idx is not `group` columns a group)."""
    if g_idx is None:
        return None, None
    perm = _memo(_PERMS, (meta.group, meta.in_features), g_idx, lambda: _clean_perm(g_idx, meta))
    if perm is None:
        return None, f"act-order g_idx does not give every group exactly {meta.group} columns"
    return perm, None


def _clean_perm(g_idx: torch.Tensor, meta: PackedMeta) -> torch.Tensor | None:
    perm = torch.argsort(g_idx.long(), stable=True)
    want = torch.arange(meta.in_features) // meta.group  # sorted g_idx of a clean act-order layer
    return perm if torch.equal(g_idx.long().cpu()[perm.cpu()], want) else None


def _memo(table: dict, key: tuple, g_idx: torch.Tensor | None, compute):
    """table[key + g_idx's stamp], recomputed unless the entry was made for this very g_idx tensor (weakref)."""
    full = (*key, _stamp(g_idx))
    hit = table.get(full)
    if hit is None or (g_idx is not None and hit[0]() is not g_idx):
        hit = (weakref.ref(g_idx) if g_idx is not None else None, compute())
        table[full] = hit
    return hit[1]


def _common_reason(mode_kind: str, dtype: torch.dtype, op: str | None = None) -> str | None:
    if mode_kind == "int8":
        return "int8 activations (W8A8) are not a weight-only kernel"
    if op is not None and not hasattr(torch.ops.aten, op):
        return f"torch {torch.__version__} has no aten.{op}"
    return None


def supports_int4(meta: PackedMeta, mode_kind: str, dtype: torch.dtype, g_idx=None) -> str | None:
    why = _common_reason(mode_kind, dtype, "_weight_int4pack_mm_for_cpu") or act_order_perm(g_idx, meta)[1]
    if why:
        return why
    if meta.bits > 4:
        return f"bits={meta.bits} (the int4 op holds codes < 16)"
    if dtype not in FAST_ATEN_DTYPES:
        return f"activation dtype {dtype} (the int4 op is fast for bf16 only)"
    if int4_op_group(meta) is None:
        return f"group {meta.group} is no multiple of {min(INT4_GROUPS)} (int4 op groups: {INT4_GROUPS})"
    return None


def supports_int8(meta: PackedMeta, mode_kind: str, dtype: torch.dtype, g_idx=None) -> str | None:
    why = _common_reason(mode_kind, dtype, "_weight_int8pack_mm") or act_order_perm(g_idx, meta)[1]
    if why:
        return why
    if meta.n_groups != 1:
        return f"group {meta.group} (the int8 op scales per output channel only)"
    if dtype not in FAST_ATEN_DTYPES:
        return f"activation dtype {dtype} (the int8 op is fast for bf16 only)"
    return None


def supports_c(meta: PackedMeta, mode_kind: str, dtype: torch.dtype, g_idx=None) -> str | None:
    why = _common_reason(mode_kind, dtype) or act_order_perm(g_idx, meta)[1]
    if why:
        return why
    if dtype not in cpu_lowbit.DTYPES:
        return f"activation dtype {dtype} (our C kernel takes {', '.join(str(d) for d in cpu_lowbit.DTYPES)})"
    return cpu_lowbit.load()[1] or None


SUPPORTS = {"aten_int4": supports_int4, "aten_int8": supports_int8, "c_lowbit": supports_c}


_SELECTED: dict[tuple, tuple] = {}  # (meta, mode, dtype, g_idx stamp) -> (weakref g_idx, select's answer)


def select(meta: PackedMeta, mode_kind: str, dtype: torch.dtype, g_idx=None) -> tuple[str | None, str]:
    """(first kernel in KERNELS that can run this layer, '') or (None, every kernel's reason). Memoized: it runs on
    every forward."""
    return _memo(_SELECTED, (meta, mode_kind, dtype), g_idx, lambda: _select(meta, mode_kind, dtype, g_idx))


def _select(meta: PackedMeta, mode_kind: str, dtype: torch.dtype, g_idx=None) -> tuple[str | None, str]:
    reasons = []
    for k in KERNELS:
        why = SUPPORTS[k](meta, mode_kind, dtype, g_idx)
        if why is None:
            return k, ""
        reasons.append(f"{k}: {why}")
    return None, "; ".join(reasons)


def prepare(kind: str, meta: PackedMeta, qweight, scales, qzeros, g_idx, dtype: torch.dtype):
    """Unpack the int32_k buffers once (act-order columns made contiguous) into kernel `kind`'s layout."""
    perm = act_order_perm(g_idx, meta)[0]
    codes = unpack_rows(qweight, meta.bits, meta.in_features)  # [out, in] uint8
    codes = codes if perm is None else codes[:, perm.to(codes.device)]
    return PREPARE[kind](meta, codes, scales, weight_zeros(meta, qzeros).to(qweight.device), perm, dtype)


PREPARE = {"aten_int4": cpu_aten.prepare_int4, "aten_int8": cpu_aten.prepare_int8,
           "c_lowbit": cpu_lowbit.prepare_lowbit}  # (meta, codes, scales, zeros, perm, dtype) -> prepared
LINEAR = {"aten_int4": cpu_aten.int4_linear, "aten_int8": cpu_aten.int8_linear,
          "c_lowbit": cpu_lowbit.lowbit_linear}  # (x, prepared, bias) -> y


def run(kind: str, x: torch.Tensor, meta: PackedMeta, bufs: dict) -> torch.Tensor:
    """y [M, out] with kernel `kind`. bufs["prepared"] (a dict the layer owns, not a buffer) keeps the converted
    weights per (kernel, dtype) until a packed buffer changes; without it every call prepares afresh."""
    qw, s, z, gi = (bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx"))
    cache, stamp = bufs.get("prepared"), tuple(_stamp(t) for t in (qw, s, z, gi))
    hit = None if cache is None else cache.get((kind, x.dtype))
    if hit is None or hit[0] != stamp:
        hit = (stamp, prepare(kind, meta, qw, s, z, gi, x.dtype))
        if cache is not None:
            cache[(kind, x.dtype)] = hit
    if torch.is_grad_enabled() and x.requires_grad:  # the kernels have no backward: d/dx through the reference
        return _WithInputGrad.apply(x, kind, hit[1], bufs.get("bias"), lambda: ref.dequant_weight(meta, qw, s, z, gi))
    return LINEAR[kind](x, hit[1], bufs.get("bias"))


class _WithInputGrad(torch.autograd.Function):
    """Kernel forward; backward dy @ W with W dequantized by the reference (weights are buffers: no grad)."""

    @staticmethod
    def forward(ctx, x, kind, prepared, bias, weight_fn):
        ctx.weight_fn = weight_fn
        return LINEAR[kind](x, prepared, bias)

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.weight_fn().to(dy.dtype), None, None, None, None  # [M, out] @ [out, in]
