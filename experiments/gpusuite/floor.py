"""The streaming-read floor: how fast one plain Triton kernel reads a weight's bytes on this GPU (L2 flushed, CUDA
graph), the bound under any kernel that must read them. Per shape: the W4 g128 codes and the fp16 weight."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from experiments import bench_kernels as bk

# (BLOCK words, ITERS, warps): the best of these is the floor; every shape's winner of a 36-tile sweep on an H100
# (results/profile_small_m_nvidia_h100_80gb_hbm3.md) and neighbours
TILES = [(8192, 1, 4), (4096, 1, 16), (4096, 1, 8), (2048, 2, 4), (2048, 2, 8), (2048, 2, 16), (1024, 2, 4),
         (1024, 4, 8)]


@triton.jit
def read_kernel(p, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """out[pid] = xor of BLOCK * ITERS int32 words: reads every byte once, computes nothing else."""
    base = tl.program_id(0) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(p + offs, mask=offs < n, other=0)
    tl.store(out + tl.program_id(0), tl.xor_sum(acc, 0))


def read_words(words: torch.Tensor, block: int, iters: int, warps: int = 4) -> torch.Tensor:
    """One read_kernel launch over flat int32 `words`: the xor of each program's words."""
    grid = (triton.cdiv(words.numel(), block * iters),)
    out = torch.empty(grid[0], dtype=torch.int32, device=words.device)
    read_kernel[grid](words, out, words.numel(), BLOCK=block, ITERS=iters, num_warps=warps)
    return out


def read_floor(words: torch.Tensor, flush, tiles=TILES) -> dict:
    """Best CUDA-graph time (s) of read_kernel over `words` across `tiles`, with the tile and bytes."""
    best = None
    for blk, it, w in tiles:
        t = bk.time_call(lambda: read_words(words, blk, it, w), words.device, 30, 3, flush, True)
        s = t["graph_s"] or t["eager_s"]
        if best is None or s < best["s"]:
            best = {"s": s, "tile": f"BLOCK={blk} ITERS={it} warps={w}", "bytes": words.numel() * 4}
    return best


def floor_row(shape: str, device, flush, copy_bw: float) -> dict:
    """Read floor of one weight shape: W4 g128 codes (out * in / 2 bytes) vs the fp16 weight (out * in * 2)."""
    out_f, in_f = map(int, shape.split("x"))
    rnd = lambda n: torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device=device)  # noqa: E731
    a, b = read_floor(rnd(out_f * in_f // 8), flush), read_floor(rnd(out_f * in_f // 2), flush)
    return {"shape": shape, "w4_us": a["s"] * 1e6, "w4_gbs": a["bytes"] / a["s"] / 1e9, "w4_tile": a["tile"],
            "fp16_us": b["s"] * 1e6, "fp16_gbs": b["bytes"] / b["s"] / 1e9, "fp16_tile": b["tile"],
            "ratio": b["s"] / a["s"], "w4_frac_copy": a["bytes"] / a["s"] / copy_bw}
