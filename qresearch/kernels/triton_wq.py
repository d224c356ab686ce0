"""Triton weight-only group-quant GEMM (W2-W8 A16): dequantize in registers, fp32 accumulate.

One kernel, two launch shapes:
  prefill  (M > 16): 2-D tiles over (M, N), tensor-core tl.dot, autotuned BLOCK_M/N/K (dispatch sends calls of
           128+ tokens to triton_dequant's dequantize-then-GEMM instead unless QRESEARCH_PREFILL=fused);
  decode   (M <= 16): split-K over a grid of (N blocks, K slices), the last slice of a tile reducing the fp32
           partials (triton_splitk: one kernel per call), BLOCK_M = 1 (GEMV, no tensor cores) or 16 (tl.dot on a
           padded tile), autotuned BLOCK_N/K and SPLIT_K.
Weights are read in the int32_k layout (quant/packing.py) as whole words only: 32 codes fill exactly `bits` words.
Contiguous groups that hold whole K tiles (GROUP % BLOCK_K == 0, e.g. g128 with BLOCK_K 64/128) load one row of
scales/zeros per tile; act-order g_idx or smaller groups gather them per element. GROUP is a compile-time constant.
experiments/compile_kernels.py compiles every config for sm_80 / sm_90 without a GPU (registers, spills, smem).
Import only when a kernel is needed: importing triton is slow and CUDA-specific.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .launcher import INTERPRETED, Launcher, cached
from .triton_splitk import cdiv, counters, finish_tile, workspace


@triton.jit
def _codes(ptr, base, idx, word_stride, mask, BITS: tl.constexpr):
    """Codes number `idx` of bit streams starting at ptr + base, whose words are word_stride apart."""
    bit = idx * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    lo = tl.load(ptr + base + word * word_stride, mask=mask, other=0).to(tl.uint32, bitcast=True)
    q = lo >> shift
    if 32 % BITS != 0:  # a code may straddle two words
        spill = mask & ((bit & 31) + BITS > 32)
        hi = tl.load(ptr + base + (word + 1) * word_stride, mask=spill, other=0).to(tl.uint32, bitcast=True)
        q = q | tl.where(spill, hi << (32 - shift), 0)
    return (q & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _code_tile(qw_ptr, k0, offs_n, nmask, K, stride_qw, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Codes [BLOCK_K, BLOCK_N] of rows k0.. from whole int32 words (BLOCK_K % 32 == 0; 0 past K).

    32 codes fill exactly BITS words. 32 % BITS == 0: each word holds PER codes, split with shifts. Otherwise
    (3, 5, 6, 7 bits) the BITS words of each 32-code chunk are loaded once and every code picks its word (and the
    next one where it straddles) with selects: no per-code gathers, so no per-element loads to stage.
    """
    if 32 % BITS == 0:
        PER: tl.constexpr = 32 // BITS
        kw = k0 // PER + tl.arange(0, BLOCK_K // PER)  # word index [BLOCK_K // PER]
        wmask = (kw[:, None] * PER < K) & nmask[None, :]
        words = tl.load(qw_ptr + offs_n[None, :] * stride_qw + kw[:, None], mask=wmask, other=0)
        words = words.to(tl.uint32, bitcast=True)  # [BLOCK_K // PER, BLOCK_N]
        shifts = (tl.arange(0, PER) * BITS).to(tl.uint32)
        q3 = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BLOCK_K // PER, PER, BLOCK_N]
    else:
        C: tl.constexpr = BLOCK_K // 32
        kc = k0 // 32 + tl.arange(0, C)  # 32-code chunk index [C]
        bit = tl.arange(0, 32) * BITS  # first bit of code j within its chunk [32]
        wi = (bit >> 5)[None, :, None]  # its word within the chunk
        sh = (bit & 31).to(tl.uint32)[None, :, None]
        lo = tl.zeros((C, 32, BLOCK_N), dtype=tl.uint32)
        hi = tl.zeros((C, 32, BLOCK_N), dtype=tl.uint32)
        for b in tl.static_range(BITS):
            wmask = ((kc * 32 + b * 32 // BITS) < K)[:, None] & nmask[None, :]  # word b holds codes >= 32b/BITS
            w = tl.load(qw_ptr + offs_n[None, :] * stride_qw + (kc * BITS + b)[:, None], mask=wmask, other=0)
            w = w.to(tl.uint32, bitcast=True)[:, None, :]  # [C, 1, BLOCK_N]
            lo = tl.where(wi == b, w, lo)
            hi = tl.where(wi + 1 == b, w, hi)
        q3 = ((lo >> sh) | tl.where(sh + BITS > 32, hi << (32 - sh), 0)) & ((1 << BITS) - 1)  # [C, 32, BLOCK_N]
    return tl.reshape(q3, (BLOCK_K, BLOCK_N)).to(tl.int32)  # row k = chunk/word * codes-per + j


@triton.jit
def _row_qparams(s_ptr, z_ptr, grp, offs_n, nmask, stride_s, stride_z, BITS: tl.constexpr, SYM: tl.constexpr):
    """Scale and zero [1, BLOCK_N] (fp32) of group `grp` for output columns offs_n."""
    s = tl.load(s_ptr + offs_n[None, :] * stride_s + grp, mask=nmask[None, :], other=0.0).to(tl.float32)
    if SYM:
        z = tl.full((1, offs_n.shape[0]), 1 << (BITS - 1), tl.float32)
    else:  # qzeros [words(N), n_groups]: code n of column grp
        z = _codes(z_ptr, grp, offs_n[None, :], stride_z, nmask[None, :], BITS).to(tl.float32)
    return s, z


@triton.jit
def _weight_tile(qw_ptr, s_ptr, z_ptr, gidx_ptr, k0, offs_k, offs_n, K, N, stride_qw, stride_s, stride_z,
                 GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, HAS_GIDX: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dequantized fp32 weight tile [BLOCK_K, BLOCK_N] = (q - zero) * scale (0 past N; see below for rows past K).

    Contiguous groups with GROUP % BLOCK_K == 0: the tile lies in one group, so scales and zeros are one row
    [1, BLOCK_N] each. Otherwise (act-order g_idx, groups smaller than the tile) they are gathered per element.
    Rows past K hold finite values; they meet x = 0.
    """
    nmask = offs_n < N
    q = _code_tile(qw_ptr, k0, offs_n, nmask, K, stride_qw, BITS, BLOCK_K, BLOCK_N)
    if (not HAS_GIDX) and (GROUP % BLOCK_K == 0):
        s, z = _row_qparams(s_ptr, z_ptr, k0 // GROUP, offs_n, nmask, stride_s, stride_z, BITS, SYM)
        return (q.to(tl.float32) - z) * s
    kmask = offs_k < K
    if HAS_GIDX:
        g = tl.load(gidx_ptr + offs_k, mask=kmask, other=0)
    else:
        g = offs_k // GROUP
    m2 = kmask[:, None] & nmask[None, :]
    s = tl.load(s_ptr + offs_n[None, :] * stride_s + g[:, None], mask=m2, other=0.0).to(tl.float32)
    if SYM:
        z = 1 << (BITS - 1)
    else:
        z = _codes(z_ptr, g[:, None], offs_n[None, :], stride_z, m2, BITS)  # qzeros [words(N), n_groups]
    return (q - z).to(tl.float32) * s


@triton.jit
def wq_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, K, stride_xm,
                     stride_qw, stride_s, stride_z, stride_ym, M_BUCKET, GROUP: tl.constexpr,
                     BITS: tl.constexpr, SYM: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """y[M, N] = x[M, K] @ deq(W)[N, K]^T (+ bias). SPLIT_K > 1: the last K slice of a tile reduces the partials
    p [SPLIT_K, M, N] (triton_splitk; counters cnt, one per (M, N) tile)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mmask[:, None] & (offs_k[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        if BLOCK_M == 1 and (not HAS_GIDX) and (GROUP % BLOCK_K == 0):
            # GEMV in one group: sum_k x_k (q_kn - z_n) s_n = s_n (sum_k x_k q_kn - z_n sum_k x_k)
            q = _code_tile(qw_ptr, k0, offs_n, offs_n < N, K, stride_qw, BITS, BLOCK_K, BLOCK_N)
            s, z = _row_qparams(s_ptr, z_ptr, k0 // GROUP, offs_n, offs_n < N, stride_s, stride_z, BITS, SYM)
            xf = tl.trans(x.to(tl.float32))  # [BLOCK_K, 1]
            acc += s * (tl.sum(xf * q.to(tl.float32), axis=0)[None, :] - z * tl.sum(xf))
        elif BLOCK_M == 1:  # GEMV: a broadcast multiply-reduce, no tensor cores to waste
            w = _weight_tile(qw_ptr, s_ptr, z_ptr, gidx_ptr, k0, offs_k, offs_n, K, N, stride_qw, stride_s,
                             stride_z, GROUP, BITS, SYM, HAS_GIDX, BLOCK_K, BLOCK_N)
            acc += tl.sum(tl.trans(x.to(tl.float32)) * w.to(x.dtype).to(tl.float32), axis=0)[None, :]
        else:
            w = _weight_tile(qw_ptr, s_ptr, z_ptr, gidx_ptr, k0, offs_k, offs_n, K, N, stride_qw, stride_s,
                             stride_z, GROUP, BITS, SYM, HAS_GIDX, BLOCK_K, BLOCK_N)
            acc = tl.dot(x, w.to(x.dtype), acc)
    finish_tile(acc, y_ptr, stride_ym, p_ptr, cnt_ptr, b_ptr, offs_m, offs_n, M, N,
                pid_m * tl.num_programs(1) + pid_n, pid_k, SPLIT_K, HAS_BIAS)


def _cfg(bm, bn, bk, sk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=warps,
                         num_stages=stages)


PREFILL_CONFIGS = [_cfg(64, 128, 64, 1, 4, 4), _cfg(128, 128, 64, 1, 8, 3), _cfg(128, 256, 64, 1, 8, 3),
                   _cfg(64, 64, 128, 1, 4, 4), _cfg(32, 128, 128, 1, 4, 4), _cfg(128, 64, 64, 1, 4, 4)]
# (BLOCK_N, BLOCK_K, warps); BLOCK_K <= 128 keeps g128 tiles inside one group (one scale row per tile). These serve
# the layers triton_gemv / triton_small do not take (3/5/6/7 bits, act-order). Under Triton 3.6 (the GPU image) on
# sm_90, BLOCK_K = 256 tiles spilled at both BLOCK_M (64x256: 152-1592 B of stack for 3/4/8 bits) and BLOCK_M = 1
# tiles above 64 codes per thread did (64x128 at 4 warps: 648 B); these do not for 3/4/8 bits without act-order
# (act-order's per-element scale and zero gathers spill at every tile: experiments/compile_kernels.py)
_GEMV_TILES = ((64, 64, 4), (64, 128, 8), (128, 64, 4), (128, 64, 8), (256, 64, 8))
_TILE16 = ((32, 128, 4), (64, 128, 4), (64, 64, 4), (128, 128, 8), (128, 64, 4))
DECODE_CONFIGS = [_cfg(bm, bn, bk, sk, w, 3) for bm, tiles in ((1, _GEMV_TILES), (16, _TILE16))
                  for bn, bk, w in tiles for sk in (1, 2, 4, 8)]
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in DECODE_CONFIGS)  # workspace slices an autotuned call may use
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in DECODE_CONFIGS)  # counters: at most M x cdiv(N, this) tiles
_TUNED: dict[str, object] = {}
_BEST: dict[tuple, triton.Config] = {}  # the autotuner's pick per key, launched through _LAUNCH after the first call
_LAUNCH = Launcher(wq_matmul_kernel)


def _prune_decode(configs, named_args, **kw):
    """BLOCK_M = 1 only for M = 1; M in 2..16 uses the padded tensor-core tile."""
    want = 1 if named_args["M"] == 1 else 16
    return [c for c in configs if c.kwargs["BLOCK_M"] == want]


def _tuned(kind: str):
    if kind not in _TUNED:
        prune = {"early_config_prune": _prune_decode} if kind == "decode" else {}
        configs = DECODE_CONFIGS if kind == "decode" else PREFILL_CONFIGS
        _TUNED[kind] = triton.autotune(configs, key=["M_BUCKET", "N", "K", "GROUP", "BITS", "SYM", "HAS_GIDX"],
                                       prune_configs_by=prune or None)(wq_matmul_kernel)
    return _TUNED[kind]


def _grid(M: int, N: int, tile: dict) -> tuple[int, int, int]:
    """wq_matmul_kernel's grid for a tile {BLOCK_M, BLOCK_N, SPLIT_K, ...}: (M blocks, N blocks, K slices)."""
    return cdiv(M, tile["BLOCK_M"]), cdiv(N, tile["BLOCK_N"]), tile["SPLIT_K"]


def wq_linear(x, meta, qweight, scales, qzeros, g_idx, bias, block: dict | None = None):
    """Launch: x [M, K] fp16/bf16 (fp32 under the interpreter) -> y [M, N] in x's dtype.

    `block` fixes BLOCK_M/N/K/SPLIT_K (tests, interpreter; BLOCK_K a multiple of 32); otherwise the autotuned
    kernels are used.
    """
    M, K = x.shape
    N = meta.out_features
    assert K == meta.in_features, f"x has {K} features, layer expects {meta.in_features}"
    x = x.contiguous()
    if block is not None and block["BLOCK_K"] % 32:
        raise ValueError(f"BLOCK_K={block['BLOCK_K']} must be a multiple of 32 (32 codes fill whole words)")
    if block is None and INTERPRETED:  # no autotuning without a GPU driver
        block = dict(BLOCK_M=1 if M == 1 else 16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2 if M <= 16 else 1)
    decode = M <= 16 if block is None else block.get("SPLIT_K", 1) > 1 or block.get("BLOCK_M") == 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    # the tuner may pick any decode config: room for the most slices and the most tiles
    split, bn = (MAX_SPLIT_K, MIN_BLOCK_N) if block is None else (block.get("SPLIT_K", 1), block["BLOCK_N"])
    p, cnt = (workspace(split, M, N, x.device), counters(x.device, M * cdiv(N, bn))) if decode and split > 1 \
        else (y, y)
    z = qzeros if qzeros is not None else qweight  # dummy pointer when SYM
    args = (x, qweight, scales, z, g_idx if g_idx is not None else qweight, bias if bias is not None else scales, y,
            p, cnt, M, N, K, x.stride(0), qweight.stride(0), scales.stride(0), z.stride(0), y.stride(0),
            min(triton.next_power_of_2(M), 4096))
    flags = dict(GROUP=meta.group, BITS=meta.bits, SYM=meta.sym or qzeros is None, HAS_GIDX=g_idx is not None,
                 HAS_BIAS=bias is not None)
    if block is not None:
        tile = {"SPLIT_K": 1, **block}
        _LAUNCH(_grid(M, N, tile), *args, **flags, **tile)
        return y
    kind = "decode" if decode else "prefill"
    # the autotuner's key: its key arguments and the dtype of every tensor argument
    key = (kind, args[-1], N, K, *flags.values(), *[a.dtype for a in args if isinstance(a, torch.Tensor)])
    cfg = _BEST.get(key) if cached() else None
    if cfg is None:  # first call of this key (or jit_only()): the autotuner times the configs and launches the best
        kern = _tuned(kind)
        kern[lambda a: _grid(M, N, a)](*args, **flags)
        _BEST[key] = kern.best_config
        return y
    # later calls: the chosen config launched directly (the autotuner's per-call host time skipped)
    tile = cfg.kwargs
    _LAUNCH(_grid(M, N, tile), *args, **flags, **tile,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
