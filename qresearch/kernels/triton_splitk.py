"""One-kernel split-K for the small-M kernels: the last K slice to finish an output tile reduces it.

Split-K with fp32 atomics needs a zeroed fp32 output (a memset kernel) and a cast to the activation dtype after it
(another kernel); on an H100 those two and their launch gaps cost ~4 us of a ~35 us M = 1 call
(results/profile_small_m_nvidia_h100_80gb_hbm3.md). Here each program of a (tile, K slice) grid writes its fp32
partial to a workspace p [SPLIT_K, M, N] (uninitialised), then bumps a per-tile arrival counter; the program that
arrives last sums the SPLIT_K partials in slice order (so the result is deterministic, unlike atomics), adds the
bias, stores y in its dtype and resets the counter to 0, which leaves the counters ready for the next call without
a memset (also inside CUDA graphs).

Ordering: every thread's partial store precedes a CTA barrier; the counter update is one acq_rel atomic (gpu
scope) by one thread, a release cumulative over the barrier (the pattern of a CUTLASS semaphore); the reducing
program reads the partials after its acquire, through L2 (.cg).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

COUNTERS_MIN = 1 << 16  # tiles per launch the first counter buffer covers (256 KiB of int32)
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers stay alive: a captured CUDA graph may still point at them


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for `tiles` output tiles on `device`, shared by every launch on it (the
    kernels leave them at 0). Launches that overlap in time (several streams) must not share them."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(tiles, COUNTERS_MIN), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def cdiv(a: int, b: int) -> int:
    """Ceil division for launch grids on the host (triton.cdiv is a constexpr function: ~1.5 us per Python call,
    paid per launch on the decode path)."""
    return -(-a // b)


def workspace(split_k: int, m: int, n: int, device) -> torch.Tensor:
    """fp32 partials [SPLIT_K, M, N] (uninitialised: every program writes its slice before it is read)."""
    return torch.empty(split_k, m, n, dtype=torch.float32, device=device)


@triton.jit
def finish_tile(acc, y_ptr, stride_ym, p_ptr, cnt_ptr, b_ptr, offs_m, offs_n, M, N, tile, pid_k,
                SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store acc [BM, BN] (fp32, this program's K slice of rows offs_m, columns offs_n) into y [M, N] (+ bias).

    SPLIT_K == 1: y = acc + bias directly. Else acc goes to p [SPLIT_K, M, N]; the last of the SPLIT_K programs of
    output tile `tile` (counter cnt[tile]) writes y = p[0] + ... + p[SPLIT_K - 1] + bias and resets the counter.
    """
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += bias
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        pp = p_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(pp + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last slice of this tile: reduce in slice order
            tot = tl.load(pp, mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                tot += tl.load(pp + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += bias
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)
