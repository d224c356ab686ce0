"""Weight-only packed linears on CPU through real low-bit kernels instead of the dequantize-everything reference.

Three kernels, tried in this order (the first whose `supports_*` returns None runs; the reasons of the others are
what dispatch reports):
  aten_int4  torch.ops.aten._weight_int4pack_mm_for_cpu: codes < 16 (bits <= 4), bf16 activations. The op
             dequantizes (q - 8) * scale + zero, so zero = (8 - z) * s gives our (q - z) * s.
  aten_int8  torch.ops.aten._weight_int8pack_mm: per-channel, bf16 activations; int8 values q - 2^(b-1),
             asymmetric layers add rowsum(x) * (2^(b-1) - z) * s.
  c_lowbit   our fused dequant-matmul (csrc/lowbit_cpu.c, fp32 math): any bits 2..8, any group, fp32/bf16/fp16.
The aten ops' fp32/fp16 paths are slower than a dense fp32 matmul (experiments/bench_kernels.py), so they take
bf16 only. Each `prepare_*` converts the packed buffers once; `*_linear(x, prepared, bias)` runs it.

Act-order (g_idx): when every group holds exactly `group` input columns (GPTQ act-order), permuting the weight's
columns once and the input's columns per call (x[:, perm]) makes the groups contiguous.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..quant.packing import PackedMeta, unpack_rows
from . import cpu_build
from . import reference as ref
from .reference import weight_zeros

INT4_GROUPS = (256, 128, 64, 32)  # group sizes _weight_int4pack_mm_for_cpu accepts
INT8_K_MULTIPLE = 16  # torch 2.13's bf16 _weight_int8pack_mm segfaults for M > 1 when in_features % 16 != 0
FAST_ATEN_DTYPES = (torch.bfloat16,)
C_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
C_LARGE_M = 48  # from this many rows, dequantize the whole weight once and run the dense matmul instead
KERNELS = ("aten_int4", "aten_int8", "c_lowbit")
_PERMS: dict[tuple, torch.Tensor | None] = {}  # (g_idx ptr, version, group) -> column permutation (None: not clean)


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
    key = (_stamp(g_idx), meta.group, meta.in_features)
    if key not in _PERMS:
        perm = torch.argsort(g_idx.long(), stable=True)
        want = torch.arange(meta.in_features) // meta.group  # sorted g_idx of a clean act-order layer
        _PERMS[key] = perm if torch.equal(g_idx.long().cpu()[perm.cpu()], want) else None
    if _PERMS[key] is None:
        return None, f"act-order g_idx does not give every group exactly {meta.group} columns"
    return _PERMS[key], None


def int4_op_group(meta: PackedMeta) -> int | None:
    """Group length for the int4 op: divides our group, so no op group straddles two of ours (None: none does)."""
    if meta.n_groups == 1:  # per-channel: any op group works (K is padded up to a multiple of it)
        return next((g for g in INT4_GROUPS if meta.in_features % g == 0), INT4_GROUPS[-1])
    return next((g for g in INT4_GROUPS if meta.group % g == 0), None)


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
    if dtype not in C_DTYPES:
        return f"activation dtype {dtype} (our C kernel takes {', '.join(str(d) for d in C_DTYPES)})"
    return cpu_build.load()[1] or None


SUPPORTS = {"aten_int4": supports_int4, "aten_int8": supports_int8, "c_lowbit": supports_c}


def select(meta: PackedMeta, mode_kind: str, dtype: torch.dtype, g_idx=None) -> tuple[str | None, str]:
    """(first kernel in KERNELS that can run this layer, '') or (None, every kernel's reason)."""
    reasons = []
    for k in KERNELS:
        why = SUPPORTS[k](meta, mode_kind, dtype, g_idx)
        if why is None:
            return k, ""
        reasons.append(f"{k}: {why}")
    return None, "; ".join(reasons)


def _codes(meta: PackedMeta, qweight: torch.Tensor, g_idx) -> torch.Tensor:
    """Unsigned codes [out, in] with act-order columns made contiguous."""
    codes = unpack_rows(qweight, meta.bits, meta.in_features)  # [out, in] uint8
    perm = act_order_perm(g_idx, meta)[0]
    return codes if perm is None else codes[:, perm.to(codes.device)]


def _x_in(x: torch.Tensor, perm: torch.Tensor | None, k_pad: int) -> torch.Tensor:
    x = x if perm is None else x[:, perm]
    return F.pad(x, (0, k_pad - x.shape[1])) if k_pad != x.shape[1] else x  # padded columns meet zero codes


# --- aten int4 ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Prepared:
    weight: torch.Tensor  # uint8 [n_pad, k_pad / 2], the op's layout
    scale_zero: torch.Tensor  # [k_pad / op_group, n_pad, 2] in the activation dtype: (scale, (8 - z) * scale)
    op_group: int
    out_features: int
    perm: torch.Tensor | None


def prepare_int4(meta: PackedMeta, qweight, scales, qzeros, g_idx, dtype: torch.dtype) -> Int4Prepared:
    gs_op = int4_op_group(meta)
    n, k = meta.out_features, meta.in_features
    n_pad, k_pad = -(-n // 16) * 16, -(-k // gs_op) * gs_op  # the op wants out % 16 == 0, in % group == 0
    codes, z = _codes(meta, qweight, g_idx).to(torch.int32), weight_zeros(meta, qzeros).to(qweight.device)
    if meta.bits <= 3:  # q - z + 8 lies in [1, 15]: the op's own offset is the zero point, exactly
        codes = codes + 8 - z.to(torch.int32)[:, torch.arange(k) // meta.group]  # [out, in]
        z = torch.full_like(z, 8.0)
    codes = F.pad(codes, (0, k_pad - k, 0, n_pad - n), value=8)  # [n_pad, k_pad]
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)  # innerKTiles: unused by the CPU op
    col_group = torch.clamp(torch.arange(0, k_pad, gs_op) // meta.group, max=meta.n_groups - 1)  # [k_pad/gs_op]
    s = scales.float()[:, col_group]  # [out, k_pad / gs_op]
    zero = (8.0 - z[:, col_group]) * s  # exact in fp32 (small int x 16-bit scale); 0 for sym 4-bit and bits <= 3
    sz = F.pad(torch.stack([s.t(), zero.t()], dim=-1), (0, 0, 0, n_pad - n))  # [k_pad / gs_op, n_pad, 2]
    return Int4Prepared(weight, sz.to(dtype).contiguous(), gs_op, n, act_order_perm(g_idx, meta)[0])


def int4_linear(x: torch.Tensor, p: Int4Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    xin = _x_in(x, p.perm, p.scale_zero.shape[0] * p.op_group).contiguous()  # [M, k_pad]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xin, p.weight, p.op_group, p.scale_zero)  # [M, n_pad]
    y = y[:, :p.out_features]
    return y if bias is None else y + bias.to(y.dtype)


# --- aten int8 ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Prepared:
    weight: torch.Tensor  # int8 [out, in]: code - 2^(bits-1)
    scale: torch.Tensor  # [out] in the activation dtype
    shift: torch.Tensor | None  # fp32 [out]: (2^(bits-1) - z) * scale; None for symmetric layers
    perm: torch.Tensor | None


def prepare_int8(meta: PackedMeta, qweight, scales, qzeros, g_idx, dtype: torch.dtype) -> Int8Prepared:
    mid, k = 2 ** (meta.bits - 1), meta.in_features
    weight = (_codes(meta, qweight, g_idx).to(torch.int16) - mid).to(torch.int8)  # [out, in]
    weight = F.pad(weight, (0, -k % INT8_K_MULTIPLE))  # [out, k_pad]: zero columns meet zero activations
    s = scales.float()[:, 0]  # [out]
    shift = None if meta.sym else (mid - weight_zeros(meta, qzeros)[:, 0]) * s
    return Int8Prepared(weight.contiguous(), s.to(dtype), shift, act_order_perm(g_idx, meta)[0])


def int8_linear(x: torch.Tensor, p: Int8Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    xin = _x_in(x, p.perm, p.weight.shape[1]).contiguous()  # [M, k_pad]
    y = torch.ops.aten._weight_int8pack_mm(xin, p.weight, p.scale)  # [M, out]
    if p.shift is not None:
        y = (y.float() + xin.float().sum(dim=1, keepdim=True) * p.shift).to(x.dtype)  # [M, out]
    return y if bias is None else y + bias.to(y.dtype)


# --- our C kernel ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowbitPrepared:
    codes: torch.Tensor  # uint8 [out, n_groups, gp / 2] (nibbles, bits <= 4) or [out, n_groups, gp]
    scale: torch.Tensor  # fp32 [out, n_groups]
    zero: torch.Tensor  # fp32 [out, n_groups]
    zero_scale: torch.Tensor  # fp32 [out, n_groups]: zero * scale, exact (integer zero x 16-bit scale)
    group: int  # our group length (columns of x per group before padding)
    gp: int  # padded group length, a multiple of 32
    nibbles: bool
    perm: torch.Tensor | None


def prepare_lowbit(meta: PackedMeta, qweight, scales, qzeros, g_idx, dtype: torch.dtype = torch.float32):
    n, k, ng, gs = meta.out_features, meta.in_features, meta.n_groups, meta.group
    gs = min(gs, k)
    gp = -(-gs // 32) * 32
    codes = F.pad(_codes(meta, qweight, g_idx), (0, ng * gs - k)).view(n, ng, gs)  # [out, n_groups, group]
    codes = F.pad(codes, (0, gp - gs))  # [out, n_groups, gp]
    nib = meta.bits <= 4
    if nib:  # 32-code chunk -> 16 bytes: low nibble = code i, high nibble = code 16 + i
        c = codes.view(n, ng, gp // 32, 2, 16)  # [out, n_groups, chunks, half, 16]
        codes = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(n, ng, gp // 2)  # [out, n_groups, gp / 2]
    s, z = scales.float().contiguous(), weight_zeros(meta, qzeros).to(scales.device).contiguous()
    return LowbitPrepared(codes.contiguous(), s, z, z * s, gs, gp, nib, act_order_perm(g_idx, meta)[0])


def _lowbit_x(x: torch.Tensor, p: LowbitPrepared) -> torch.Tensor:
    """x [M, in] -> fp32 [M, n_groups * gp]: each group's columns padded with zeros to gp."""
    m, ng = x.shape[0], p.codes.shape[1]
    x = x if p.perm is None else x[:, p.perm]
    x = x.float()
    if x.shape[1] == ng * p.gp:
        return x.contiguous()
    x = F.pad(x, (0, ng * p.group - x.shape[1])).view(m, ng, p.group)  # [M, n_groups, group]
    return F.pad(x, (0, p.gp - p.group)).reshape(m, ng * p.gp)  # [M, n_groups * gp]


def lowbit_dequant(p: LowbitPrepared) -> torch.Tensor:
    """The whole weight as fp32 [out, n_groups * gp] (padded columns are multiplied by zero activations)."""
    lib = cpu_build.load()[0]
    n, ng = p.codes.shape[:2]
    w = torch.empty(n, ng * p.gp, dtype=torch.float32)
    lib.qr_lowbit_dequant(p.codes.data_ptr(), n, ng, p.gp, int(p.nibbles), p.scale.data_ptr(), p.zero.data_ptr(),
                          w.data_ptr(), torch.get_num_threads())
    return w


def lowbit_linear(x: torch.Tensor, p: LowbitPrepared, bias: torch.Tensor | None) -> torch.Tensor:
    lib, why = cpu_build.load()
    if lib is None:
        raise RuntimeError(f"c_lowbit kernel unavailable: {why}")
    xin = _lowbit_x(x, p)  # [M, n_groups * gp] fp32
    b = None if bias is None else bias.float().contiguous()
    if xin.shape[0] >= C_LARGE_M:  # compute-bound: one dequantization, then the dense fp32 matmul
        return F.linear(xin, lowbit_dequant(p), b).to(x.dtype)
    n, ng = p.codes.shape[:2]
    y = torch.empty(xin.shape[0], n, dtype=torch.float32)
    failed = lib.qr_lowbit_mm(xin.data_ptr(), xin.shape[0], xin.shape[1], p.codes.data_ptr(), n, ng, p.gp,
                              int(p.nibbles), p.scale.data_ptr(), p.zero.data_ptr(), p.zero_scale.data_ptr(),
                              None if b is None else b.data_ptr(), y.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("c_lowbit kernel could not allocate its row buffers")
    return y.to(x.dtype)


PREPARE = {"aten_int4": prepare_int4, "aten_int8": prepare_int8, "c_lowbit": prepare_lowbit}
LINEAR = {"aten_int4": int4_linear, "aten_int8": int8_linear, "c_lowbit": lowbit_linear}


def run(kind: str, x: torch.Tensor, meta: PackedMeta, bufs: dict) -> torch.Tensor:
    """y [M, out] with kernel `kind`. bufs["prepared"] (a dict the layer owns, not a buffer) keeps the converted
    weights per (kernel, dtype) until a packed buffer changes; without it every call prepares afresh."""
    qw, s, z, gi = (bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx"))
    cache, stamp = bufs.get("prepared"), tuple(_stamp(t) for t in (qw, s, z, gi))
    hit = None if cache is None else cache.get((kind, x.dtype))
    if hit is None or hit[0] != stamp:
        hit = (stamp, PREPARE[kind](meta, qw, s, z, gi, x.dtype))
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
