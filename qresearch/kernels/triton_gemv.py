"""Triton GEMV for one token (M = 1) on weight-only packed layers, 2/4/8 bits, contiguous groups (no act-order).

The split-K kernel of triton_wq.py unpacks each [BLOCK_K // PER, PER, BLOCK_N] word tile into a [BLOCK_K, BLOCK_N]
code tile (a reshape that moves data between threads) and reduces over K at every step. Here a program holds a
[BLOCK_N, BLOCK_KW] tile of whole int32 words (rows n, words along K: each thread reads consecutive words of one
row) and never reshapes: code i of every word is `(word >> i * BITS) & mask`, multiplied by x at k = PER * w + i
(x is a few KiB and stays in L1; each step reads its [BLOCK_KW, PER] x tile with vector loads and splits the
columns out in registers). Partial sums stay in a [BLOCK_N, BLOCK_KW] fp32 accumulator; the one reduction
over K happens after the loop. With BLOCK_K = BLOCK_KW * PER dividing the group size, a tile lies in one group:
    sum_k x_k s_n (q_nk - z_n) = s_n (sum_k x_k q_nk - z_n sum_k x_k)
so scales and zeros are one [BLOCK_N, 1] column per tile. SPLIT_K > 1: the last K slice of a row block sums the
fp32 partials (triton_splitk: one kernel per call, no memset or cast).

The default for one-token calls (QRESEARCH_SMALL_M=auto, kernels/dispatch.py): on an H100 it beat the split-K
tiles and triton_small's wide GEMV at two of the three Llama-2-7B shapes (results/tune_small_m_*.md).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launcher import INTERPRETED, Launcher, cached
from .triton_small import F32_MAGIC, _column
from .triton_splitk import cdiv, counters, finish_tile, workspace
from .triton_wq import _codes


@triton.jit
def _code_times_x(part, src, xi, P: tl.constexpr, BITS: tl.constexpr):
    """part + q * x for the codes q at bit P of src = the float bits of 2^23 | a half word (P + BITS <= 16):
    src & (mask << P | bits of 2^23) is the float 2^23 + q 2^P, so q 2^P comes exactly from one AND and one add
    (no int-to-float conversion, 16 / clk / SM on sm_90), and against x 2^-P (exact) it is the same product as
    q * x. src [BLOCK_N, BLOCK_KW] uint32, xi [1, BLOCK_KW]."""
    qs = (src & (F32_MAGIC | (((1 << BITS) - 1) << P))).to(tl.float32, bitcast=True) - 8388608.0
    return part + qs * (xi * (2.0 ** (-P)))


@triton.jit
def _words_dot_x(words, x2, BITS: tl.constexpr, PER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 MAGIC: tl.constexpr):
    """sum_i q_i(word) * x[PER * w + i] per word: words [BLOCK_N, BLOCK_KW] uint32, x2 [BLOCK_KW, PER] fp32 ->
    [BLOCK_N, BLOCK_KW] fp32. MAGIC: codes to floats by logic and an add; else int-to-float conversions of the
    codes in place (the same products, for an A/B on GPUs)."""
    part = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    if MAGIC:  # each half word under the float bits of 2^23 (once per word): a code then takes one AND
        low = (words & 0xFFFF) | F32_MAGIC
        high = (words >> 16) | F32_MAGIC
        for i in tl.static_range(PER // 2):  # codes in the low half word, then in the high one
            part = _code_times_x(part, low, _column(x2, i, PER, BLOCK_KW)[None, :], i * BITS, BITS)
        for i in tl.static_range(PER // 2, PER):
            part = _code_times_x(part, high, _column(x2, i, PER, BLOCK_KW)[None, :], (i - PER // 2) * BITS, BITS)
    else:
        for i in tl.static_range(PER):
            qs = (words & (((1 << BITS) - 1) << (i * BITS))).to(tl.float32)
            part += qs * (_column(x2, i, PER, BLOCK_KW)[None, :] * (2.0 ** (-i * BITS)))
    return part


@triton.jit
def wq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, cnt_ptr, N, K, stride_qw, stride_s, stride_z,
                   GROUP: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                   MAGIC: tl.constexpr = True):
    """y[N] = deq(W)[N, K] @ x[K] (+ bias); SPLIT_K > 1: K slices reduced by the last one (triton_splitk).
    EVEN_K: K % (BLOCK_KW * PER) == 0, no masks along K. SASS of the main loop at the H100's pick (sm_90,
    Triton 3.6, 64 codes per thread per step): 512 instructions masked with shift-and-mask codes, 406 with EVEN_K,
    386 with EVEN_K and codes masked in place (a shift per code fewer), 332 with x read as one [BLOCK_KW, PER]
    tile split in registers (instead of a 2-byte load, a convert and a sum per code position; fewer instructions
    per code at every tile of CONFIGS, 2/4/8 bits; tests/test_kernels_compile.py), then 341 with MAGIC: codes
    become floats by logic and an add, so the int-to-float conversions (a 16 / clk / SM pipe on sm_90, one per
    code: ~12 us of the H100's 4096x11008 call at full occupancy) drop from 66 to 2 per step. MAGIC=False keeps
    the conversions, with bit-identical output, for an A/B on a GPU (experiments/sweep_gemv.py --ab-magic)."""
    PER: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_KW * PER
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kw = k0 // PER + tl.arange(0, BLOCK_KW)  # word index [BLOCK_KW]
        if EVEN_K:
            wmask = nmask[:, None]
        else:
            wmask = nmask[:, None] & (kw[None, :] * PER < K)
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qw + kw[None, :], mask=wmask, other=0)
        words = words.to(tl.uint32, bitcast=True)  # [BLOCK_N, BLOCK_KW]
        # x of the tile in one contiguous load, [BLOCK_KW, PER] (x at k = PER * w + i), then split into its PER
        # columns inside each thread (one 16-byte load per word instead of PER 2-byte loads)
        k2 = (k0 + tl.arange(0, BLOCK_KW) * PER)[:, None] + tl.arange(0, PER)[None, :]
        if EVEN_K:
            x2 = tl.load(x_ptr + k2).to(tl.float32)
        else:
            x2 = tl.load(x_ptr + k2, mask=k2 < K, other=0.0).to(tl.float32)
        part = _words_dot_x(words, x2, BITS, PER, BLOCK_N, BLOCK_KW, MAGIC)  # [BLOCK_N, BLOCK_KW]
        xsum = tl.sum(x2, axis=1)[None, :]  # [1, BLOCK_KW]
        grp = k0 // GROUP
        s = tl.load(s_ptr + offs_n[:, None] * stride_s + grp, mask=nmask[:, None], other=0.0).to(tl.float32)
        if SYM:
            acc += s * (part - (1 << (BITS - 1)) * xsum)
        else:  # qzeros [words(N), n_groups]: code n of column grp
            z = _codes(z_ptr, grp, offs_n[:, None], stride_z, nmask[:, None], BITS).to(tl.float32)  # [BLOCK_N, 1]
            acc += s * (part - z * xsum)
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    finish_tile(y[None, :], y_ptr, N, p_ptr, cnt_ptr, b_ptr, tl.arange(0, 1), offs_n, 1, N, pid_n, pid_k, SPLIT_K,
                HAS_BIAS)


_LAUNCH = Launcher(wq_gemv_kernel)


def _cfg(bn, bkw_codes, sk, warps):
    """bkw_codes: BLOCK_K in codes (BLOCK_KW = codes / PER is set per bit width at launch)."""
    return triton.Config({"BLOCK_N": bn, "BLOCK_K_CODES": bkw_codes, "SPLIT_K": sk}, num_warps=warps, num_stages=3)


CONFIGS = [_cfg(bn, bk, sk, w) for bn, w in ((32, 4), (64, 4), (128, 4), (128, 8), (256, 8)) for bk in (64, 128)
           for sk in (1, 2, 4, 8)]
# more codes per thread (fewer SASS instructions per code: ~4.9 vs 6.0 at sm_90, no spills) in thinner programs,
# with the deep K split they need to fill the GPU (a tile sweep on the H100 found the SPLIT_K <= 16 tiles within 3%)
CONFIGS += [_cfg(256, 64, sk, 2) for sk in (16, 32)] + [_cfg(512, 64, sk, 4) for sk in (16, 32)]


def supports(meta, has_gidx: bool, m: int) -> str | None:
    """None when the GEMV handles this layer and batch; else why not."""
    if m != 1:
        return f"M={m} (the GEMV takes one token)"
    if has_gidx:
        return "act-order g_idx"
    if 32 % meta.bits:
        return f"bits={meta.bits} (2, 4 or 8: whole codes per word)"
    if meta.group % 64 and meta.group != meta.in_features:
        return f"group={meta.group} (a multiple of 64, or per channel)"
    return None


def _block_kw(block_k: int, bits: int, group: int, k: int) -> int | None:
    """BLOCK_KW for a tile of block_k codes, or None when the tile would straddle a group (per channel: any)."""
    if group != k and group % block_k:
        return None
    return block_k * bits // 32


def _bind(meta, qweight, scales, qzeros, bias, cfg: dict, warps: int, device, dtype):
    """The GEMV of one layer and tile with everything but x fixed: x [1, K] -> y [1, N] in `dtype`, written by the
    kernel alone (no memset or cast kernels)."""
    bkw = _block_kw(cfg["BLOCK_K_CODES"], meta.bits, meta.group, meta.in_features)
    n, k, split = meta.out_features, meta.in_features, cfg["SPLIT_K"]
    grid = (cdiv(n, cfg["BLOCK_N"]), split)
    z = qzeros if qzeros is not None else qweight
    head = (qweight, scales, z, bias if bias is not None else scales)
    tail = (n, k, qweight.stride(0), scales.stride(0), z.stride(0))
    kw = dict(GROUP=meta.group, BITS=meta.bits, SYM=meta.sym or qzeros is None, HAS_BIAS=bias is not None,
              BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=bkw, SPLIT_K=split, EVEN_K=k % cfg["BLOCK_K_CODES"] == 0,
              MAGIC=cfg["MAGIC"] if "MAGIC" in cfg else _magic(), num_warps=warps)

    grid3, entries = grid + (1,), {}  # x's 16-byte alignment -> the launcher's entry for these arguments

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(1, n, device=device, dtype=dtype)  # fresh allocations (and the counters): 16-byte aligned
        p, cnt = (workspace(split, 1, n, device), counters(device, grid[0])) if split > 1 else (y, y)
        entry = entries.get(x.data_ptr() % 16 == 0) if cached() else None
        if entry is not None:  # every other argument's key part is fixed by this binding
            entry[0][grid3](x, *head, y, p, cnt, *tail, *entry[1])
        else:
            entry = _LAUNCH(grid, x, *head, y, p, cnt, *tail, **kw)
            if entry is not None:
                entries[x.data_ptr() % 16 == 0] = entry
        return y
    return run


def _launch(x, meta, qweight, scales, qzeros, bias, cfg: dict, warps: int = 4) -> torch.Tensor:
    """One call with this tile: y [1, N] in x's dtype."""
    return _bind(meta, qweight, scales, qzeros, bias, cfg, warps, x.device, x.dtype)(x)


def _magic() -> bool:
    """Conversion-free unpacking (the default) unless QRESEARCH_GEMV_MAGIC=0 (the same output bits through
    int-to-float conversions: an A/B of the tuned tile on a GPU)."""
    return os.environ.get("QRESEARCH_GEMV_MAGIC", "1") != "0"


_BEST: dict[tuple, tuple[dict, int]] = {}


def _tune(x, meta, qweight, scales, qzeros, bias) -> tuple[dict, int]:
    """Fastest config for this layer shape (timed once per (N, K, group, bits, sym, dtype); CUDA only)."""
    key = (meta.out_features, meta.in_features, meta.group, meta.bits, meta.sym, x.dtype)
    if key not in _BEST:
        best = None
        for c in CONFIGS:
            cfg = dict(c.kwargs)
            if _block_kw(cfg["BLOCK_K_CODES"], meta.bits, meta.group, meta.in_features) is None:
                continue
            ms = triton.testing.do_bench(lambda cfg=cfg, w=c.num_warps: _launch(
                x, meta, qweight, scales, qzeros, bias, cfg, w), warmup=5, rep=20)  # ms, median
            if best is None or ms < best[0]:
                best = (ms, cfg, c.num_warps)
        if best is None:
            raise ValueError(f"no GEMV tile fits group={meta.group}, in={meta.in_features}")
        _BEST[key] = best[1:]
    return _BEST[key]


def wq_gemv(x, meta, qweight, scales, qzeros, bias, block: dict | None = None) -> torch.Tensor:
    """x [1, K] fp16/bf16 (fp32 under the interpreter) -> y [1, N] in x's dtype.

    `block` = {"BLOCK_N", "BLOCK_K_CODES", "SPLIT_K"} fixes the tile (tests, interpreter); else tuned per shape.
    """
    assert x.shape == (1, meta.in_features), f"x {tuple(x.shape)}: the GEMV takes [1, {meta.in_features}]"
    x = x.contiguous()
    return plan(x, meta, qweight, scales, qzeros, bias, block)(x)


def plan(x, meta, qweight, scales, qzeros, bias, block: dict | None = None):
    """wq_gemv for calls like x (one token, its device and dtype) with the tile chosen once: a function of x alone
    (QuantLinear keeps it per layer for decode: kernels/dispatch.py plans)."""
    if block is None and INTERPRETED:
        block = {"BLOCK_N": 32, "BLOCK_K_CODES": 64, "SPLIT_K": 2}
    cfg, warps = (block, 4) if block is not None else _tune(x, meta, qweight, scales, qzeros, bias)
    if _block_kw(cfg["BLOCK_K_CODES"], meta.bits, meta.group, meta.in_features) is None:
        raise ValueError(f"BLOCK_K_CODES={cfg['BLOCK_K_CODES']} straddles group={meta.group}")
    return _bind(meta, qweight, scales, qzeros, bias, cfg, warps, x.device, x.dtype)
