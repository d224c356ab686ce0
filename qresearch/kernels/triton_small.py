"""Triton kernels for few tokens (M <= 16) on weight-only packed layers: 2/4/8 bits, contiguous groups.

Both read whole int32 words of the int32_k layout as [rows n, words along K] tiles (each thread reads consecutive
words of one row) and never reshape a tile: code i of every word is `(word >> i * BITS) & mask`, paired with the
activations at k = PER * word + i (PER = 32 / BITS). Codes become floats without integer-to-float conversions
(a quarter-rate instruction on sm_80 / sm_90, which bounded the first GEMV at ~25% of the copy bandwidth):
  fp32: bits(2^23) | q is the float 2^23 + q, so q = that - 2^23 (exact, full-rate logic + add);
  fp16: bits(1024.0) | q is the half 1024 + q, so q - z = that - (1024 + z) (exact for |q - z| < 1024).

gemv_wide_kernel (M = 1, FMA): a program holds [BLOCK_N, NG, WPG] words: NG sub-chunks of SUB = WPG * PER codes
  along K, each inside one group, so a tile may span several groups (wide rows: more bytes in flight per load)
  and its scales / zeros are one [BLOCK_N, NG] load:
      sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z sum_k x_k)   per (row, sub-chunk)
  per step the fp32 partial sums are reduced over the sub-chunk's words into a [BLOCK_N, NG] accumulator (an
  accumulator per element needed ~250 registers); one reduction over NG at the end. SPLIT_K > 1: the last K
  slice of a row block sums the fp32 partials (triton_splitk: one kernel per call, no memset or cast).
skinny_dot_kernel (2 <= M <= 16, tensor cores): per step one group slice of SUB codes; for each code position i
  a tl.dot of x[:, PER * w + i] [16, WPG] with (q - z)[n, w] in fp16 [WPG, BLOCK_N], then one scale per row:
      acc[m, n] += s_n * sum_k x_mk (q_nk - z_n)
  x reaches the dots strided (XPERM 0), from a copy in code-position order (1: one more kernel per call), or as
  each step's contiguous [16, WPG, PER] tile split into code positions in registers (2: `_column`, shared with
  triton_gemv; its 16-byte reads without the copy). XPERM 2 pairs code positions h and h + PER / 2 (the two
  16-bit halves of a word) in one dot of K = 2 WPG (`_paired_dots`): one shift and one logic op or add per two
  codes, and each half-word pair is the MMA's register pair as it stands (sm_90 SASS per main-loop step at the
  H100's pick BN=64 SK=8: 355 -> 311 instructions asym, 297 -> 240 sym). The tuner times 1 and 2.

Tiles are chosen per layer shape by timing every config once (CUDA; `TUNED` keeps the times, for reports);
`block` fixes one (tests, interpreter). experiments/tune_small_m.py compares them with the other paths. Measured on
an H100 (results/tune_small_m_nvidia_h100_80gb_hbm3.md), all configs correct: the skinny kernel beats split-K at
M = 16 (1.08-1.18x fp16 vs 0.99-1.04x on the 7B MLP shapes) and is the default there; the wide GEMV did not beat
triton_gemv at M = 1 (1.21-1.54x vs 1.33-1.56x), so dispatch's `auto` keeps triton_gemv for one token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import INTERPRETED, Launcher
from .triton_splitk import cdiv, counters, finish_tile, workspace
from .triton_wq import _codes

F32_MAGIC = tl.constexpr(0x4B000000)  # float32 bits of 2^23
F16_MAGIC = tl.constexpr(0x6400)  # float16 bits of 1024.0


@triton.jit
def _halve(v, BIT: tl.constexpr, BLOCK_KW: tl.constexpr, W: tl.constexpr):
    """[BLOCK_KW, W] -> [BLOCK_KW, W // 2]: the columns whose lowest index bit is BIT (a register split)."""
    lo, hi = tl.split(tl.reshape(v, (BLOCK_KW, W // 2, 2)))
    return hi if BIT else lo


@triton.jit
def _column(x2, I: tl.constexpr, PER: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Column I of x2 [BLOCK_KW, PER] (PER = 4, 8 or 16) as [BLOCK_KW], by halving on the bits of I."""
    v = x2
    if PER == 16:
        v = _halve(v, I % 2, BLOCK_KW, 16)
        v = _halve(v, (I // 2) % 2, BLOCK_KW, 8)
        v = _halve(v, (I // 4) % 2, BLOCK_KW, 4)
        v = _halve(v, I // 8, BLOCK_KW, 2)
    elif PER == 8:
        v = _halve(v, I % 2, BLOCK_KW, 8)
        v = _halve(v, (I // 2) % 2, BLOCK_KW, 4)
        v = _halve(v, I // 4, BLOCK_KW, 2)
    else:
        v = _halve(v, I % 2, BLOCK_KW, 4)
        v = _halve(v, I // 2, BLOCK_KW, 2)
    return tl.reshape(v, (BLOCK_KW,))


@triton.jit
def _paired_dots(part, words, x2, z, z16, BITS: tl.constexpr, SYM: tl.constexpr, PER: tl.constexpr,
                 WPG: tl.constexpr, BLOCK_N: tl.constexpr):
    """part [16, BLOCK_N] + x [16, SUB] @ (q - z)^T of one step, in PER / 2 dots over code-position pairs.

    Positions h and h + PER / 2 sit 16 bits apart in a word, so one shift and one logic op (sym) or add (asym,
    512 - z folded in: each half stays below 1024, no carry) make both 16-bit halves fp16 magic floats 1024
    (+ 512 - z) + q, which are adjacent K of one dot [BLOCK_N, 2 * WPG]: the MMA's register pairs, with no
    repacking. words [BLOCK_N, WPG] uint32; x2 [16 * WPG, PER] (the step's x tile); z [BLOCK_N, 1] fp32 and z16
    = 1024 + z in fp16."""
    MASK: tl.constexpr = (1 << BITS) - 1
    if not SYM:  # per row, in both halves: fp16 bits of 1024 + 512 - z
        zc = ((-z.to(tl.int32) + (F16_MAGIC + 512)) * 0x10001).to(tl.uint32)  # [BLOCK_N, 1]
    for h in tl.static_range(PER // 2):
        codes = (words >> (h * BITS)) & (MASK | (MASK << 16))
        if SYM:
            pair = codes | (F16_MAGIC | (F16_MAGIC << 16))  # halves 1024 + q
        else:
            pair = codes + zc  # halves 1024 + 512 + q - z
        lo = pair.to(tl.uint16).to(tl.float16, bitcast=True)
        hi = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        if SYM:
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * WPG)) - z16  # q - z, exact
        else:
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, 2 * WPG)) - 1536.0  # q - z, exact
        xl = tl.reshape(_column(x2, h, PER, 16 * WPG), (16, WPG))
        xh = tl.reshape(_column(x2, h + PER // 2, PER, 16 * WPG), (16, WPG))
        xi = tl.reshape(tl.join(xl, xh), (16, 2 * WPG))  # x at the same (word, position) pairs
        part = tl.dot(xi, tl.trans(w.to(xi.dtype)), part)  # [16, BLOCK_N]
    return part


@triton.jit
def _qparams3(s_ptr, z_ptr, grp, n3, mask3, stride_s, stride_z, BITS: tl.constexpr, SYM: tl.constexpr):
    """Scale and zero (fp32) of groups `grp` for rows n3, broadcast shapes."""
    s = tl.load(s_ptr + n3 * stride_s + grp, mask=mask3, other=0.0).to(tl.float32)
    if SYM:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.float32)
    else:  # qzeros [words(N), n_groups]: code n of column grp
        z = _codes(z_ptr, grp, n3, stride_z, mask3, BITS).to(tl.float32)
    return s, z


@triton.jit
def gemv_wide_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr, N, K, stride_xp, stride_qw, stride_s,
                     stride_z,
                     GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, NG: tl.constexpr, SUB: tl.constexpr, SPLIT_K: tl.constexpr,
                     EVEN_K: tl.constexpr, XPERM: tl.constexpr):
    """y[N] = deq(W)[N, K] @ x[K] (+ bias); SPLIT_K > 1: K slices reduced by the last one (triton_splitk).

    EVEN_K: K % (NG * SUB) == 0, no masks along K (vector loads). XPERM: x_ptr is x as fp32 [PER, K / PER]
    (row i = the codes at position i of every word, rows stride_xp apart), so each code position is one
    contiguous load; else x [K] in its dtype, read with stride PER.
    """
    PER: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = SUB // PER  # words per sub-chunk
    BLOCK_K: tl.constexpr = NG * SUB  # codes per step
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n3 = offs_n[:, None, None]  # [BLOCK_N, 1, 1]
    nm3 = n3 < N
    j3 = tl.arange(0, NG)[None, :, None]  # sub-chunk [1, NG, 1]
    w3 = tl.arange(0, WPG)[None, None, :]  # word in sub-chunk [1, 1, WPG]
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kw = k0 // PER + j3 * WPG + w3  # word index [1, NG, WPG]
        if EVEN_K:
            words = tl.load(qw_ptr + n3 * stride_qw + kw, mask=nm3, other=0)
        else:
            words = tl.load(qw_ptr + n3 * stride_qw + kw, mask=nm3 & (kw * PER < K), other=0)
        words = words.to(tl.uint32, bitcast=True)  # [BLOCK_N, NG, WPG]
        part = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)
        xsum = tl.zeros((1, NG, WPG), dtype=tl.float32)
        for i in tl.static_range(PER):
            if XPERM:
                xp = x_ptr + i * stride_xp + kw
            else:
                xp = x_ptr + kw * PER + i
            if EVEN_K:
                xi = tl.load(xp).to(tl.float32)  # [1, NG, WPG]
            else:
                xi = tl.load(xp, mask=kw * PER + i < K, other=0.0).to(tl.float32)
            q = (((words >> (i * BITS)) & MASK) | F32_MAGIC).to(tl.float32, bitcast=True) - 8388608.0
            part += q * xi
            xsum += xi
        sub0 = k0 + tl.arange(0, NG)[None, :] * SUB  # first code of each sub-chunk [1, NG]
        s, z = _qparams3(s_ptr, z_ptr, sub0 // GROUP, offs_n[:, None], (offs_n < N)[:, None] & (sub0 < K),
                         stride_s, stride_z, BITS, SYM)  # [BLOCK_N, NG]
        acc += s * (tl.sum(part, axis=2) - z * tl.sum(xsum, axis=2))
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    finish_tile(y[None, :], y_ptr, N, p_ptr, cnt_ptr, b_ptr, tl.arange(0, 1), offs_n, 1, N, pid_n, pid_k, SPLIT_K,
                HAS_BIAS)


@triton.jit
def skinny_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr, M, N, K, stride_xi, stride_xm,
                      stride_qw, stride_s, stride_z, stride_ym, GROUP: tl.constexpr, BITS: tl.constexpr,
                      SYM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, SPLIT_K: tl.constexpr,
                      EVEN_K: tl.constexpr, XPERM: tl.constexpr):
    """y[M, N] = x[M, K] @ deq(W)[N, K]^T (+ bias) for M <= 16; SPLIT_K > 1: K slices reduced by the last one.

    EVEN_K: K % SUB == 0, no masks along K. XPERM 1: x_ptr is x [PER, M, K / PER] (x[m, PER * w + i] at
    [i, m, w]; stride_xi, stride_xm; a copy kernel per call), so each code position is a contiguous tile;
    0: x [M, K], read with stride PER per code position; 2: x [M, K], each step's [16, WPG, PER] tile read once,
    contiguous, and split into code positions in registers (contiguous reads without the copy kernel), its
    dots over code-position pairs (_paired_dots).
    """
    PER: tl.constexpr = 32 // BITS
    WPG: tl.constexpr = SUB // PER  # words per step (>= 16: the dot's K)
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, 16)
    mmask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    ow = tl.arange(0, WPG)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    k_span = tl.cdiv(K, SPLIT_K * SUB) * SUB
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)
    for k0 in range(k_lo, k_hi, SUB):
        kw = k0 // PER + ow  # [WPG]
        if EVEN_K:
            words = tl.load(qw_ptr + offs_n[:, None] * stride_qw + kw[None, :], mask=nmask[:, None], other=0)
        else:
            words = tl.load(qw_ptr + offs_n[:, None] * stride_qw + kw[None, :],
                            mask=nmask[:, None] & (kw * PER < K)[None, :], other=0)
        words = words.to(tl.uint32, bitcast=True)  # [BLOCK_N, WPG]
        s, z = _qparams3(s_ptr, z_ptr, k0 // GROUP, offs_n[:, None], nmask[:, None], stride_s, stride_z, BITS,
                         SYM)  # [BLOCK_N, 1]
        z16 = (z + 1024.0).to(tl.float16)  # exact
        part = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        if XPERM == 2:  # the step's x tile in one contiguous read, its code positions split out in registers
            k3 = (kw * PER)[None, :, None] + tl.arange(0, PER)[None, None, :]  # [1, WPG, PER]
            m3 = mmask[:, None, None] if EVEN_K else mmask[:, None, None] & (k3 < K)
            x3 = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + k3, mask=m3, other=0.0)  # [16, WPG, PER]
            x2 = tl.reshape(x3, (16 * WPG, PER))
        if XPERM == 2:
            part = _paired_dots(part, words, x2, z, z16, BITS, SYM, PER, WPG, BLOCK_N)
        else:
            for i in tl.static_range(PER):
                if XPERM == 1:
                    xp = x_ptr + i * stride_xi + offs_m[:, None] * stride_xm + kw[None, :]
                else:
                    xp = x_ptr + offs_m[:, None] * stride_xm + (kw * PER + i)[None, :]
                if EVEN_K:
                    xi = tl.load(xp, mask=mmask[:, None], other=0.0)  # [16, WPG]
                else:
                    xi = tl.load(xp, mask=mmask[:, None] & (kw * PER + i < K)[None, :], other=0.0)
                c = (((words >> (i * BITS)) & MASK) | F16_MAGIC).to(tl.uint16)
                w = c.to(tl.float16, bitcast=True) - z16  # q - z, exact [BLOCK_N, WPG]
                part = tl.dot(xi, tl.trans(w.to(xi.dtype)), part)  # [16, BLOCK_N]
        acc += part * tl.trans(s)
    finish_tile(acc, y_ptr, stride_ym, p_ptr, cnt_ptr, b_ptr, offs_m, offs_n, M, N, pid_n, pid_k, SPLIT_K, HAS_BIAS)


# (BLOCK_N, NG, SPLIT_K, warps, XPERM) for the GEMV; SUB = 128 codes, halved until it lies in one group
_WIDE_TILES = [(32, 4, 1, 4), (32, 4, 2, 4), (64, 2, 1, 4), (64, 2, 2, 4), (64, 4, 2, 8), (16, 8, 1, 4),
               (128, 1, 2, 4), (128, 2, 1, 8), (32, 8, 1, 8), (64, 1, 4, 4), (32, 2, 4, 4), (16, 4, 4, 4)]
WIDE_CONFIGS = [(*t, xperm) for xperm in (0, 1) for t in _WIDE_TILES]
# (BLOCK_N, SPLIT_K, warps, stages, XPERM) for M in 2..16
_DOT_TILES = [(32, 1, 4, 2), (32, 2, 4, 2), (32, 4, 4, 2), (64, 1, 4, 2), (64, 2, 4, 2), (64, 4, 4, 2),
              (128, 1, 4, 2), (128, 2, 8, 2), (16, 2, 4, 2), (16, 4, 4, 2), (64, 8, 4, 2), (32, 8, 4, 2)]
# XPERM 0 (strided x) lost to 1 at 32 of 36 (tile, shape) pairs on the H100 and at every shape's best tile
# (results/tune_small_m_*.md); 2 reads x contiguously as 1 does, without its copy kernel
DOT_CONFIGS = [(*t, xperm) for xperm in (1, 2) for t in _DOT_TILES]
TUNED: dict[tuple, dict] = {}  # (kernel, N, K, group, bits, sym, dtype) -> {"best": cfg, "ms": {cfg label: ms}}


def _sub_codes(meta, want: int) -> int | None:
    """Codes per sub-chunk: `want` halved until it lies in one group and holds whole words (None: none fits)."""
    per = 32 // meta.bits
    per_channel = meta.group == meta.in_features
    sub = want
    while sub >= per and not (per_channel or meta.group % sub == 0):
        sub //= 2
    return sub if sub >= per and sub % per == 0 else None


def supports(meta, has_gidx: bool, m: int) -> str | None:
    """None when these kernels handle this layer and batch; else why not."""
    if not 1 <= m <= 16:
        return f"M={m} (these kernels take 1..16 tokens)"
    if has_gidx:
        return "act-order g_idx"
    if 32 % meta.bits:
        return f"bits={meta.bits} (2, 4 or 8: whole codes per word)"
    if _sub_codes(meta, 128) is None:
        return f"group={meta.group} (a multiple of {32 // meta.bits} codes, or per channel)"
    sub = _sub_codes(meta, _dot_want(meta))
    if m > 1 and (sub is None or sub * meta.bits // 32 < 16):
        return f"group={meta.group} at bits={meta.bits} (the dot needs 16 words of one group per step)"
    return None


def _dot_want(meta) -> int:
    """Codes per dot step: 128, or 16 words where that is more (2 bits: 256)."""
    return max(128, 16 * 32 // meta.bits)


def _wide_args(meta, cfg: tuple) -> dict:
    bn, ng, sk, _, xperm = cfg
    sub = _sub_codes(meta, 128)
    return dict(BLOCK_N=bn, NG=ng, SUB=sub, SPLIT_K=sk, EVEN_K=meta.in_features % (ng * sub) == 0,
                XPERM=bool(xperm))


def _dot_args(meta, cfg: tuple) -> dict:
    bn, sk, _, _, xperm = cfg
    sub = _sub_codes(meta, _dot_want(meta))
    return dict(BLOCK_N=bn, SUB=sub, SPLIT_K=sk, EVEN_K=meta.in_features % sub == 0, XPERM=int(xperm))


def permute_x(x: torch.Tensor, bits: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] -> [PER, M, K / PER] in `dtype` (default x's): [i, m, w] holds x[m, PER * w + i] (XPERM; K a
    multiple of PER). One copy kernel."""
    m, k = x.shape
    per = 32 // bits
    out = torch.empty(per, m, k // per, device=x.device, dtype=dtype or x.dtype)
    return out.copy_(x.reshape(m, k // per, per).permute(2, 0, 1))


_WIDE, _DOT = Launcher(gemv_wide_kernel), Launcher(skinny_dot_kernel)


def _launch_wide(x, meta, qweight, scales, qzeros, bias, y, p, cnt, cfg: tuple) -> None:
    a = _wide_args(meta, cfg)
    grid = (cdiv(meta.out_features, a["BLOCK_N"]), a["SPLIT_K"])
    z = qzeros if qzeros is not None else qweight
    xk = permute_x(x, meta.bits, torch.float32)[:, 0] if a["XPERM"] else x  # fp32 [PER, K / PER]
    _WIDE(grid, xk, qweight, scales, z, bias if bias is not None else scales, y, p, cnt, meta.out_features,
          meta.in_features, xk.stride(0), qweight.stride(0), scales.stride(0), z.stride(0), GROUP=meta.group,
          BITS=meta.bits, SYM=meta.sym or qzeros is None, HAS_BIAS=bias is not None, **a, num_warps=cfg[3])


def _launch_dot(x, meta, qweight, scales, qzeros, bias, y, p, cnt, cfg: tuple) -> None:
    a = _dot_args(meta, cfg)
    grid = (cdiv(meta.out_features, a["BLOCK_N"]), a["SPLIT_K"])
    z = qzeros if qzeros is not None else qweight
    xk, sxi, sxm = (x, 0, x.stride(0)) if a["XPERM"] != 1 else (lambda p: (p, p.stride(0), p.stride(1)))(
        permute_x(x, meta.bits))
    _DOT(grid, xk, qweight, scales, z, bias if bias is not None else scales, y, p, cnt, x.shape[0], meta.out_features,
         meta.in_features, sxi, sxm, qweight.stride(0), scales.stride(0), z.stride(0), y.stride(0), GROUP=meta.group,
         BITS=meta.bits, SYM=meta.sym or qzeros is None, HAS_BIAS=bias is not None, **a, num_warps=cfg[2],
         num_stages=cfg[3])


def label(cfg: tuple, kernel: str) -> str:
    names = ("BN", "NG", "SK", "w", "xperm") if kernel == "wide" else ("BN", "SK", "w", "s", "xperm")
    return " ".join(f"{n}={v}" for n, v in zip(names, cfg))


def tune_key(kernel: str, meta, x: torch.Tensor) -> tuple:
    """What a tuned config is kept under in TUNED."""
    return kernel, meta.out_features, meta.in_features, meta.group, meta.bits, meta.sym, x.dtype, x.shape[0] > 1


def _tune(kernel: str, x, meta, run) -> tuple:
    """Fastest config for this layer shape: every config timed once as a whole call (output allocation and cast
    included; triton.testing.do_bench: L2 cleared per call, median) and the times kept in TUNED."""
    key = tune_key(kernel, meta, x)
    if key not in TUNED:
        times = {}
        for cfg in configs(kernel, meta):
            times[cfg] = triton.testing.do_bench(lambda c=cfg: run(c), warmup=5, rep=20)
        best = min(times, key=times.get)
        TUNED[key] = {"best": best, "ms": {label(c, kernel): t for c, t in times.items()}}
    return TUNED[key]["best"]


def configs(kernel: str, meta) -> list[tuple]:
    """The configs tuned for this layer (XPERM 1, the copied x, needs K a multiple of the codes per word)."""
    whole = meta.in_features % (32 // meta.bits) == 0
    return [c for c in (WIDE_CONFIGS if kernel == "wide" else DOT_CONFIGS) if c[4] != 1 or whole]


def _interp_block(kernel: str) -> tuple:
    return (16, 2, 2, 4, 0) if kernel == "wide" else (16, 2, 4, 2, 0)


def small_m_linear(x, meta, qweight, scales, qzeros, bias, block: tuple | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) fp16/bf16 (fp32 under the interpreter, GEMV only) -> y [M, N] in x's dtype.

    M = 1 runs gemv_wide_kernel, M in 2..16 skinny_dot_kernel. `block` fixes the tile (a WIDE_CONFIGS /
    DOT_CONFIGS tuple: tests, interpreter); else tuned per layer shape.
    """
    m, k = x.shape
    assert k == meta.in_features, f"x has {k} features, layer expects {meta.in_features}"
    x = x.contiguous()
    return plan(x, meta, qweight, scales, qzeros, bias, block)(x)


def plan(x, meta, qweight, scales, qzeros, bias, block: tuple | None = None):
    """small_m_linear for calls like x (its M, device and dtype) with the tile chosen once: a function of x alone
    (QuantLinear keeps it per layer for decode: kernels/dispatch.py plans)."""
    m = x.shape[0]
    why = supports(meta, False, m)
    if why is not None:
        raise ValueError(f"small-M kernel cannot take this layer: {why}")
    kernel = "wide" if m == 1 else "dot"
    if block is None and INTERPRETED:
        block = _interp_block(kernel)
    if block is None:
        block = _tune(kernel, x, meta, lambda cfg: _bind(kernel, meta, qweight, scales, qzeros, bias, cfg, m,
                                                          x.device, x.dtype)(x))
    return _bind(kernel, meta, qweight, scales, qzeros, bias, block, m, x.device, x.dtype)


def _bind(kernel: str, meta, qweight, scales, qzeros, bias, cfg: tuple, m: int, device, dtype):
    """One call of `kernel` with tile `cfg` for x [m, K]: y in `dtype` (split-K partials in a workspace, reduced by
    the last slice)."""
    launch = _launch_wide if kernel == "wide" else _launch_dot
    split, n = (cfg[2] if kernel == "wide" else cfg[1]), meta.out_features
    tiles = cdiv(n, cfg[0])

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(m, n, device=device, dtype=dtype)
        p, cnt = (workspace(split, m, n, device), counters(device, tiles)) if split > 1 else (y, y)
        launch(x, meta, qweight, scales, qzeros, bias, y, p, cnt, cfg)
        return y
    return run
