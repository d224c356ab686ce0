"""Integer-only static linear (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"), for study: modules=integer.

Real values are r = S (q - Z). With 8-bit input codes (uint8 or int8 with zero point Zx), 8-bit weight codes (zero
point Zw per tensor or per output channel) and a static output range (Sy, Zy):

    acc[m, n] = sum_k (qx[m, k] - Zx) (qw[n, k] - Zw[n]) + qb[n]            (int32; qb = round(b / (Sx Sw[n])))
              = qx.qw - Zw[n] sum_k qx[m, k] - Zx sum_k qw[n, k] + K Zx Zw[n] + qb[n]
    qy[m, n]  = clamp(Zy + round(M[n] acc[m, n]), qmin, qmax),   M[n] = Sx Sw[n] / Sy = M0[n] 2^-shift[n]

with M0 a 31-bit integer in [2^30, 2^31): round(M acc) = (acc M0 + 2^(shift-1)) >> shift in int64 (round half up).
The only float operations are quantizing the module's float input and dequantizing its output (the rest of the
model, norms and attention, stays float). Codes are stored as signed int8 (code - 128, zero - 128).
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.int_mm import int8_matmul, int_mm_why_not
from ..records import LayerResult

INT32 = 2**31


def fixed_point(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive real multipliers m [N] -> (M0 int64 [N] in [2^30, 2^31), shift int64 [N]) with m ~ M0 2^-shift."""
    m = m.double()
    if not bool((m > 0).all()):
        raise ValueError("requantization multipliers must be positive")
    e = torch.floor(torch.log2(m))  # m / 2^e in [1, 2)
    m0 = torch.round(m * torch.pow(2.0, 30 - e)).to(torch.int64)
    carry = m0 >= 2**31  # rounding reached 2^31: renormalise
    m0, e = torch.where(carry, m0 // 2, m0), torch.where(carry, e + 1, e)
    shift = (30 - e).to(torch.int64)
    if not bool(((shift >= 1) & (shift <= 62)).all()):
        raise ValueError(f"requantization multiplier out of the representable range: {m.min():.3g}..{m.max():.3g}")
    return m0, shift


def requantize(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(acc * M0 / 2^shift) in int64, round half up (acc int32 [M, N]; M0, shift [N])."""
    v = acc.to(torch.int64) * m0  # |acc| < 2^31, M0 < 2^31: fits int64
    return (v + (1 << (shift - 1))) >> shift


def integer_accumulate(qx: torch.Tensor, zx: int, qw: torch.Tensor, zw: torch.Tensor, w_colsum: torch.Tensor,
                       qb: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """int32 acc [M, N] = sum_k (qx - zx)(qw - zw) + qb from int8 qx [M, K], qw [N, K]; returns the matmul path."""
    prod, path = int8_matmul(qx, qw.t())  # [M, N] int32
    k = qx.shape[1]
    acc = prod.to(torch.int64) - zw[None, :] * qx.to(torch.int64).sum(1, keepdim=True) - zx * w_colsum[None, :] \
        + k * zx * zw[None, :]
    if qb is not None:
        acc = acc + qb[None, :]
    if bool((acc.abs() >= INT32).any()):
        raise OverflowError(f"integer linear: accumulator exceeds int32 (K={k}); this layer cannot run int32-only")
    return acc.to(torch.int32), path


class IntegerLinear(nn.Module):
    """Static integer-only linear: float in -> 8-bit codes -> int32 accumulation -> fixed-point requantization ->
    output codes -> float out. Weight zero points per tensor or per output channel."""

    def __init__(self, res: LayerResult, bias: torch.Tensor | None):
        super().__init__()
        w, act = res.weight, res.act
        _check(res)
        n, k = w.codes.shape
        self.in_features, self.out_features = k, n
        self.register_buffer("qweight", (w.codes.to(torch.int16) - 128).to(torch.int8))  # [N, K]
        zw = (w.zero.reshape(-1).round() - 128).to(torch.int64).expand(n).contiguous()  # [N]
        self.register_buffer("w_zero", zw)
        self.register_buffer("w_colsum", self.qweight.to(torch.int64).sum(1))  # [N]
        sw = w.scale.reshape(-1).double().expand(n)  # [N]
        self.x_scale, self.x_zero, self.x_range = _io_qparams(act.spec, act.static_scale, act.static_zero)
        self.y_scale, self.y_zero, self.y_range = _io_qparams(act.out_spec, act.out_scale, act.out_zero)
        qb = None if bias is None else torch.round(bias.double() / (self.x_scale * sw)).to(torch.int64)  # [N]
        self.register_buffer("qbias", qb)
        m0, shift = fixed_point(self.x_scale * sw / self.y_scale)
        self.register_buffer("m0", m0)
        self.register_buffer("shift", shift)
        why = int_mm_why_not(torch.device("cpu"), 1, k, n)
        self.path = "int_mm" if why is None else "emulated"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        lo, hi = self.x_range
        qx = torch.clamp(torch.round(x2.double() / self.x_scale) + self.x_zero, lo, hi).to(torch.int8)
        acc, self.path = integer_accumulate(qx, self.x_zero, self.qweight, self.w_zero, self.w_colsum, self.qbias)
        lo, hi = self.y_range
        qy = torch.clamp(self.y_zero + requantize(acc, self.m0, self.shift), lo, hi)  # [M, N] int64
        y = (qy - self.y_zero).double() * self.y_scale
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def kernel_name(self) -> str:
        return f"integer_{self.path.split(':')[0]}"

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, x=({self.x_scale:.3g}, {self.x_zero}), "
                f"y=({self.y_scale:.3g}, {self.y_zero}), kernel={self.kernel_name}")


def _io_qparams(spec, scale, zero) -> tuple[float, int, tuple[int, int]]:
    """(scale, signed zero point, signed code range) of a static per-tensor activation/output quantizer."""
    z = spec.format.sym_zero(spec) if zero is None else float(zero.reshape(()))
    return float(scale.reshape(())), int(round(z)) - 128, (-128, 2**spec.bits - 1 - 128)


def _check(res: LayerResult) -> None:
    """modules=integer needs 8-bit integer weights (one group per row) and static input + output qparams."""
    w, act = res.weight, res.act
    why = []
    if w.spec.qformat != "int" or w.spec.bits != 8 or w.scale.shape[1] != 1 or w.g_idx is not None:
        why.append(f"weights {w.spec.tag} (need 8-bit int, per-channel or per-tensor, no act-order)")
    if act is None or act.static_scale is None or act.spec.qformat != "int":
        why.append("no static integer input scale")
    elif act.out_scale is None or act.out_spec is None:
        why.append("no static output scale")
    if why:
        raise ValueError(f"modules=integer cannot build this layer: {'; '.join(why)}; use method=integer "
                         f"(or a recipe ending with it)")


def build_integer(lin: nn.Linear, res: LayerResult) -> nn.Module:
    """swap_linears builder for modules=integer."""
    bias = None if lin.bias is None else lin.bias.data
    return IntegerLinear(res, bias).to(lin.weight.device)
