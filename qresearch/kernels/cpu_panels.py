"""Many activation rows on CPU: the weight dequantized from the layer's stored buffers a panel of rows at a time,
cast to the activation dtype, then the dense matmul (torch's, which is bf16-native on CPUs with AVX512-BF16).

For bf16 activations at M >= PANEL_M the low-bit ops lose to that: on 4096x4096 w4 g128 (AMD EPYC, 2 threads)
at M = 16 / 32 / 64 / 256 / 1024, aten's int4 op takes 1.6 / 3.2 / 6.3 / 24.8 / 98 ms, panels 2.4 / 2.9 / 3.9
/ 10.2 / 37.9 ms, the dense bf16 matmul 1.3 / 1.9 / 3.0 / 9.3 / 37.9 ms (decoding all 16M weights to bf16:
0.8 ms; 1 thread, M = 24: aten 4.5, panels 4.3 ms).
The panel is decoded exactly as the torch reference decodes (csrc qr_stream_dequant: fp32 (code - z) * s,
column j in group g_idx[j]; 16 codes per AVX-512 step where codes do not straddle words and groups are
contiguous) and rounded to bf16 as torch rounds (in the same pass), so the weights are the reference's bit for
bit.
One buffer of PANEL_BYTES per thread is reused, so no call pays page faults for a whole fresh fp32 weight.
fp32 activations take this path only on builds without AVX-512 (cpu_lowbit.kernel_loop).
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..quant.packing import PackedMeta
from . import cpu_lowbit
from .prepared import cached
from .reference import weight_scales, weight_zeros

PANEL_M = {torch.bfloat16: 32, torch.float32: cpu_lowbit.PANEL_M}  # from this many rows, by activation dtype
PANEL_BYTES = 4 << 20  # fp32 weight rows dequantized at a time
_BUF = threading.local()  # .panel: this thread's panel buffer, reused across calls


def _buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = getattr(_BUF, name, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:  # one dtype at a time
        buf = torch.empty(numel, dtype=dtype)
        setattr(_BUF, name, buf)
    return buf[:numel]


def use_panels(kind: str, m: int, dtype: torch.dtype) -> bool:
    """Whether a call of kernel `kind` with `m` rows of `dtype` activations runs as dequantized panels."""
    if dtype == torch.float32:
        return kind == "c_lowbit" and cpu_lowbit.kernel_loop(m) == "panels"
    return m >= PANEL_M.get(dtype, 1 << 62)


def _qparams(meta: PackedMeta, bufs: dict) -> tuple:
    """(scales, zeros) fp32 [out, n_groups] and g_idx int32 [in] | None as qr_stream_dequant reads them (made once
    per layer: unpacking the zeros costs 0.6 ms on 11008x4096 g128, 2-8% of a 32-256-row call)."""
    g_idx = bufs["g_idx"]
    return (weight_scales(meta, bufs["scales"], None).float().contiguous(),
            weight_zeros(meta, bufs["qzeros"]).float().contiguous(),
            None if g_idx is None else g_idx.to(torch.int32).contiguous())


def linear(x: torch.Tensor, meta: PackedMeta, bufs: dict) -> torch.Tensor:
    """y [M, out] = x [M, in] @ dequant(W)^T + b in x's dtype, W decoded PANEL_BYTES of rows at a time."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"dequantized panels take float32 / bfloat16 activations, not {x.dtype}")
    lib, why = cpu_lowbit.load()
    if lib is None:
        raise RuntimeError(f"dequantized panels unavailable: {why}")
    qw, bias = bufs["qweight"], bufs.get("bias")
    n, k, wpr = meta.out_features, meta.in_features, qw.shape[1]
    s, z, gi = cached("panels", bufs, lambda: _qparams(meta, bufs))
    rows = max(1, min(n, PANEL_BYTES // (4 * k)))
    bf16 = x.dtype == torch.bfloat16
    wbuf = _buffer("panel", rows * k, x.dtype).view(rows, k)  # [rows, in]
    y = torch.empty(x.shape[0], n, dtype=x.dtype)  # [M, out]
    ng = meta.n_groups
    for n0 in range(0, n, rows):
        r = min(rows, n - n0)
        lib.qr_stream_dequant(qw.data_ptr() + 4 * n0 * wpr, wpr, r, k, meta.bits, s.data_ptr() + 4 * n0 * ng,
                              z.data_ptr() + 4 * n0 * ng, ng, meta.group, None if gi is None else gi.data_ptr(),
                              wbuf.data_ptr(), int(bf16), torch.get_num_threads())
        y[:, n0:n0 + r] = F.linear(x, wbuf[:r], None if bias is None else bias[n0:n0 + r].to(x.dtype))
    return y
