"""Triton W8A8: per-token dynamic int8 activation quantization + int8 GEMM with a fused rescale epilogue.

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * sx[m] * sw[n] + b[n], int32 accumulation (exact), fp32 epilogue.
Weights are 8-bit symmetric per-channel codes in the int32_k layout; viewed as bytes, a row is its codes in
order, and code ^ 0x80 reinterpreted as int8 is code - 128 (the signed value).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import INTERPRETED, Launcher, cached
from .triton_splitk import cdiv


@triton.jit
def _round_half_even(v):
    """torch.round semantics (ties to even), exact for |v| < 2^23, portable to the interpreter."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _row_scale(amax):
    """Per-token scale absmax / 127 (IEEE division, as the int format's qparams on every device); 1.0 for an
    all-zero row."""
    s = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    return tl.where(s > 0, s, 1.0)


@triton.jit
def _to_int8(x, s):
    """x / s rounded half-to-even (correctly rounded division) and clamped to int8."""
    return tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, s)), -128.0), 127.0).to(tl.int8)


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr):
    """One program per token: absmax / 127 scale (1.0 for a zero row), round-half-even, clamp to int8. BLOCK >= K:
    the row is read once and kept in registers; else two passes (max, then quantize)."""
    row = tl.program_id(0)
    if BLOCK >= K:
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        s = _row_scale(tl.max(tl.abs(x), axis=0))
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + row * stride_qm + offs, _to_int8(x, s), mask=offs < K)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        s = _row_scale(tl.max(amax, axis=0))
        tl.store(s_ptr + row, s)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + row * stride_qm + offs, _to_int8(x, s), mask=offs < K)


@triton.jit
def _load_k(ptrs, in_k, EVEN_K: tl.constexpr):
    """A tile of int8 / uint8 bytes: unmasked when EVEN_K, else zero past K (in_k)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=in_k, other=0)


@triton.jit
def _dot_x_w(xq_ptr, w_ptr, rows_m, rows_n, K, stride_xm, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """sum_k xq[m, k] (code[n, k] - 128) as int32 [BLOCK_M, BLOCK_N]: activations the A operand, weights (xor'ed in
    registers) the B operand. rows_m / rows_n: the tile's rows wrapped into range (row % M), so loads need no row
    mask (a wrapped row's sums land in an unstored output). Past K (not EVEN_K) both tiles read zeros: the weight
    byte's value then never reaches y, and a zero fill costs no per-byte select after the asynchronous copy
    (other=128 cost ~190 PRMT/SEL per step at 128x128x128 on sm_90)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_ptrs = xq_ptr + rows_m[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K] int8
        w_ptrs = w_ptr + rows_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] uint8
        a, wb = _load_k(a_ptrs, offs_k[None, :] < K, EVEN_K), _load_k(w_ptrs, offs_k[:, None] < K, EVEN_K)
        acc = tl.dot(a, (wb ^ 0x80).to(tl.int8, bitcast=True), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _dot_w_x(xq_ptr, w_ptr, rows_m, rows_n, K, stride_xm, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The same sums transposed, int32 [BLOCK_N, BLOCK_M]: the xor'ed weight tile is the A operand (an MMA may
    take A from registers; B must come from shared memory), the activations the B operand."""
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K] uint8
        x_ptrs = xq_ptr + rows_m[None, :] * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M] int8
        wb, xt = _load_k(w_ptrs, offs_k[None, :] < K, EVEN_K), _load_k(x_ptrs, offs_k[:, None] < K, EVEN_K)
        acc = tl.dot((wb ^ 0x80).to(tl.int8, bitcast=True), xt, acc, out_dtype=tl.int32)
    return acc


@triton.jit
def int8_matmul_kernel(xq_ptr, w_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       M_BUCKET, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_AS_A: tl.constexpr,
                       EVEN_K: tl.constexpr):
    """y[M, N] tile = int32 dot * sx[m] * sw[n] (+ b[n]); W_AS_A: computed as its transpose (_dot_w_x).
    EVEN_K: K % BLOCK_K == 0, the main loop's loads unmasked."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if W_AS_A:
        acc = _dot_w_x(xq_ptr, w_ptr, offs_m % M, offs_n % N, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        y = acc.to(tl.float32) * sw[:, None] * sx[None, :] + b[:, None]  # [BLOCK_N, BLOCK_M]
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))
    else:
        acc = _dot_x_w(xq_ptr, w_ptr, offs_m % M, offs_n % N, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        y = acc.to(tl.float32) * sx[:, None] * sw[None, :] + b[None, :]  # [BLOCK_M, BLOCK_N]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _cfg(bm, bn, bk, warps, stages, w_as_a=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "W_AS_A": w_as_a}, num_warps=warps,
                         num_stages=stages)


CONFIGS = [_cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(64, 128, 128, 4, 4),
           _cfg(256, 128, 128, 8, 3), _cfg(16, 64, 256, 4, 3), _cfg(32, 128, 128, 4, 4)]
# the transposed form (weights the register operand): untimed on a GPU so far; the autotuner decides
CONFIGS += [_cfg(128, 128, 128, 8, 3, True), _cfg(128, 256, 128, 8, 3, True), _cfg(256, 128, 128, 8, 3, True)]
_TUNED = {}
_BEST: dict[tuple, triton.Config] = {}  # (M_BUCKET, N, K, out dtype) -> the config the autotuner chose
INTERP_BLOCK = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)  # the GEMM's tile under the interpreter (no autotuning)


_ACT_QUANT, _GEMM = Launcher(act_quant_kernel), Launcher(int8_matmul_kernel)
# rows up to ONE_PASS_MAX features are read once (the row in registers); wider ones in two passes over TWO_PASS_BLOCK
# wide blocks. H100, 4096x11008's x (results/gpu_nvidia_h100_80gb_hbm3.md, W8A8 parts at 2803757): one pass over
# K = 11008 (a 16384 block) took 92.8 us at M = 2048 and 18.3 at M = 256, two passes over 4096-wide blocks 54.0 and
# 16.5 (1024: 60.6 and 17.9; 8192: 76.4 and 22.0); at K = 4096 one pass was the fastest (21.0 vs 23.5 us at M = 2048)
ONE_PASS_MAX, TWO_PASS_BLOCK = 8192, 4096


def act_quant(x: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scales [M]); matches reference.act_quant_ref (any block: the same bits).
    `block` None: the whole row in one block (one read of x) up to ONE_PASS_MAX features, else TWO_PASS_BLOCK-wide
    blocks in two passes."""
    M, K = x.shape
    x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    block, warps = _act_block(K, block)
    _ACT_QUANT((M,), x, q, s, K, x.stride(0), q.stride(0), BLOCK=block, num_warps=warps)
    return q, s


def _act_block(k: int, block: int | None = None) -> tuple[int, int]:
    """(row block, warps) of the activation quantizer for rows of k features (`block` None: the default)."""
    if block is None:
        block = triton.next_power_of_2(k) if k <= ONE_PASS_MAX else TWO_PASS_BLOCK
    block = min(block, triton.next_power_of_2(k))
    return block, 8 if block >= 4096 else 4


def plan(x, meta, qweight, scales, bias):
    """w8a8_linear with per-token dynamic activations for calls like x [M, K], the GEMM's config chosen once (the
    autotuner runs on this x when it has not seen the shape): a function of x alone (QuantLinear keeps it per
    layer for decode: kernels/dispatch.py plans)."""
    M, K = x.shape
    N, dev, dtype = qweight.shape[0], x.device, x.dtype
    wb, sw = qweight.view(torch.uint8), scales.reshape(-1)  # [N, 4 * words] bytes, [N]
    bucket = min(triton.next_power_of_2(M), 4096)
    if INTERPRETED:
        grid, gemm_kw = _gemm_launch(M, N, K, INTERP_BLOCK, bias is not None)
    else:
        if (bucket, N, K, dtype) not in _BEST:
            int8_gemm(*act_quant(x), qweight, scales, bias, dtype)  # the autotuner's first call of this shape
        cfg = _BEST[(bucket, N, K, dtype)]
        grid, gemm_kw = _gemm_launch(M, N, K, cfg.kwargs, bias is not None, cfg.num_warps, cfg.num_stages)
    a_block, a_warps = _act_block(K)
    b = bias if bias is not None else sw

    def run(x: torch.Tensor) -> torch.Tensor:
        q = torch.empty(M, K, dtype=torch.int8, device=dev)
        s = torch.empty(M, dtype=torch.float32, device=dev)
        _ACT_QUANT((M,), x, q, s, K, K, K, BLOCK=a_block, num_warps=a_warps)
        y = torch.empty(M, N, dtype=dtype, device=dev)
        _GEMM(grid, q, wb, s, sw, b, y, M, N, K, K, wb.stride(0), N, bucket, **gemm_kw)
        return y
    return run


def w8a8_linear(x, meta, qweight, scales, bias, static_scale=None, block: dict | None = None):
    """x [M, K] -> y [M, N] in x's dtype. Static per-tensor activation scale: quantized with torch, same math."""
    if static_scale is None:
        xq, sx = act_quant(x)
    else:
        from .reference import act_quant_ref

        xq, sx = act_quant_ref(x, static_scale)
    return int8_gemm(xq, sx, qweight, scales, bias, x.dtype, block)


def int8_gemm(xq, sx, qweight, scales, bias, out_dtype: torch.dtype, block: dict | None = None) -> torch.Tensor:
    """xq [M, K] int8, sx [M] fp32, the layer's 8-bit sym codes (int32_k words) -> y [M, N] (out_dtype): the
    integer product with the rescale (and bias) epilogue; block None: autotuned (a fixed small tile under the
    interpreter)."""
    M, K = xq.shape
    N = qweight.shape[0]
    wb = qweight.view(torch.uint8)  # [N, 4 * words] bytes = codes in order (+ padding)
    sw = scales.reshape(-1)  # [N]
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    args = (xq, wb, sx, sw, bias if bias is not None else sw, y, M, N, K, xq.stride(0), wb.stride(0), y.stride(0),
            min(triton.next_power_of_2(M), 4096))
    if block is None and INTERPRETED:  # no autotuning without a GPU driver
        block = INTERP_BLOCK
    if block is not None:
        grid, kw = _gemm_launch(M, N, K, block, bias is not None)
        _GEMM(grid, *args, **kw)
        return y
    key = (args[-1], N, K, out_dtype)  # the autotuner's key (M_BUCKET, N, K) and the output dtype
    cfg = _BEST.get(key) if cached() else None
    if cfg is None:  # first call of this key: the autotuner times the configs and launches the best
        if "gemm" not in _TUNED:
            even_k = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(int8_matmul_kernel)
            _TUNED["gemm"] = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K"])(even_k)
        _TUNED["gemm"][lambda a: (cdiv(M, a["BLOCK_M"]), cdiv(N, a["BLOCK_N"]))](*args, HAS_BIAS=bias is not None)
        _BEST[key] = _TUNED["gemm"].best_config
        return y
    # later calls: the chosen config launched directly (the autotuner's per-call host time skipped)
    grid, kw = _gemm_launch(M, N, K, cfg.kwargs, bias is not None, cfg.num_warps, cfg.num_stages)
    _GEMM(grid, *args, **kw)
    return y


def _gemm_launch(M: int, N: int, K: int, block: dict, has_bias: bool, warps: int = 4,
                 stages: int | None = None) -> tuple[tuple, dict]:
    """(grid, constexprs and launch options) of int8_matmul_kernel with tile `block` (W_AS_A default False)."""
    kw = {"W_AS_A": False, **block}
    return (cdiv(M, kw["BLOCK_M"]), cdiv(N, kw["BLOCK_N"])), dict(
        HAS_BIAS=has_bias, EVEN_K=K % kw["BLOCK_K"] == 0, **kw, num_warps=warps, num_stages=stages)
