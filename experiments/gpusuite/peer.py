"""The kernel section's peer rows: torch's own int4 weight-only GEMM ("tinygemm", aten._weight_int4pack_mm: bf16
activations, w = (q - 8) * scale + zero per group) at the benchmark's shapes and decode sizes, timed as our rows are
(L2 flushed, CUDA-graph replays), beside bf16 torch.matmul on the same [out, in] weight and, at the goal shape, our
Triton W4 g128 in bf16.

Why: the W4 goals (3.5x fp16 at M = 1, 2.5x at M = 16) were missed by our Triton kernels; a production CUDA int4
kernel measured under the same protocol on the same device says how much of the gap is ours and how much is the
protocol's fixed cost per call. Its output is checked against float64 on the same codes and qparams; the CUDA op
takes two codes per byte, and the order of the two nibbles is checked rather than assumed (the first order whose
output is within tolerance is timed; none: the row is marked FAIL and not timed). On CPU (the suite's quick mode)
torch's CPU int4 op stands in, so the plumbing runs in CI; its times mean nothing for the GPU goals.
"""
from __future__ import annotations

import torch

from experiments import bench_kernels as bk

GROUP, INNER_K_TILES = 128, 8  # tinygemm: K % (16 * innerKTiles) == 0, out % 8 == 0
PEER_MS = (1, 16)
TOL = 1.6e-2  # bf16 output vs float64 truth (the suite's bf16 kernel tolerance)
NIBBLE_ORDERS = ("high_first", "low_first")  # which code of a (2k, 2k + 1) pair the CUDA op reads from bits 4..7


def qparams(out_f: int, in_f: int, seed: int = 0):
    """Random codes [out, in] int32 in 0..15, and per (group, row) bf16 scale and tinygemm zero ((8 - z) * s)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
    s = (torch.rand(in_f // GROUP, out_f, generator=g) * 0.004 + 0.001).to(torch.bfloat16)  # [K / g, out]
    z = torch.randint(0, 16, (in_f // GROUP, out_f), generator=g).float()
    zero = ((8.0 - z) * s.float()).to(torch.bfloat16)  # [K / g, out]
    return codes, s, zero


def dequantized(codes: torch.Tensor, s: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in float64 exactly as tinygemm's formula gives it from the bf16 qparams."""
    rep = lambda t: t.double().t().repeat_interleave(GROUP, dim=1)  # noqa: E731  [out, in]
    return (codes.double() - 8.0) * rep(s) + rep(zero)


def pack(codes: torch.Tensor, device: torch.device, order: str) -> torch.Tensor:
    """codes [out, in] -> the op's packed weight on `device` (CUDA: two codes per byte, then the tiled layout)."""
    if device.type != "cuda":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    hi, lo = (codes[:, ::2], codes[:, 1::2]) if order == "high_first" else (codes[:, 1::2], codes[:, ::2])
    u8 = ((hi << 4) | lo).to(torch.uint8).to(device)  # [out, in / 2]
    return torch.ops.aten._convert_weight_to_int4pack(u8, INNER_K_TILES)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """y [M, out] = x [M, in] (bf16) @ dequant(packed)^T through torch's int4 op for x's device."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz)


@torch.no_grad()
def peer_rows(shape: str, device: torch.device, flush, repeats: int, warmup: int, graphs: bool,
              ms=PEER_MS) -> list[dict]:
    """One row per M: tinygemm vs bf16 torch.matmul on the same weight (speedup = matmul / tinygemm)."""
    out_f, in_f = map(int, shape.split("x"))
    codes, s, zero = qparams(out_f, in_f)
    w64 = dequantized(codes, s, zero)  # [out, in]
    w = w64.to(device=device, dtype=torch.bfloat16)
    sz = torch.stack([s, zero], dim=-1).to(device).contiguous()  # [K / g, out, 2] bf16
    rows, packed, order, errs = [], None, None, {}
    for m in ms:
        x = torch.randn(m, in_f, generator=torch.Generator().manual_seed(m)).to(device=device, dtype=torch.bfloat16)
        truth = x.double().cpu() @ w64.t()  # [M, out]
        row = {"shape": shape, "M": m, "kernel": "aten._weight_int4pack_mm" if device.type == "cuda"
               else "aten._weight_int4pack_mm_for_cpu (stand-in)", "group": GROUP}
        if packed is None:  # the first M settles the nibble order (the CPU op takes unpacked codes)
            for o in NIBBLE_ORDERS if device.type == "cuda" else ("- (unpacked codes)",):
                p = pack(codes, device, o)
                errs[o] = bk.rel_err(int4_mm(x, p, sz).cpu(), truth)
                if errs[o] <= TOL:
                    packed, order = p, o
                    break
        if packed is None:
            rows.append({**row, "status": "FAIL", "rel_err_by_order": errs})
            continue
        err = bk.rel_err(int4_mm(x, packed, sz).cpu(), truth)
        t_fp = bk.time_call(lambda: torch.matmul(x, w.t()), device, repeats, warmup, flush, graphs)
        t_q = bk.time_call(lambda: int4_mm(x, packed, sz), device, repeats, warmup, flush, graphs)
        rows.append({**row, **bk._row_times(t_fp, t_q), "nibble_order": order, "rel_err": err,
                     "matmul_rel_err": bk.rel_err(torch.matmul(x, w.t()).cpu(), truth),
                     "status": "PASS" if err <= TOL else "FAIL", "repeats": repeats})
    return rows


@torch.no_grad()
def ours_bf16_rows(shape: str, device: torch.device, flush, repeats: int, warmup: int, graphs: bool,
                   ms=PEER_MS) -> list[dict]:
    """Our packed W4 g128 (bench_kernels' variant) in bf16 vs bf16 torch.matmul: the like-for-like of peer_rows."""
    out_f, in_f = map(int, shape.split("x"))
    mod = bk.build("w4a16_g128", out_f, in_f, device, torch.bfloat16)
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(torch.bfloat16)
    rows = []
    for m in ms:
        x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
        t_fp = bk.time_call(lambda: torch.matmul(x, w.t()), device, repeats, warmup, flush, graphs)
        t_q = bk.time_call(lambda: mod(x), device, repeats, warmup, flush, graphs)
        rows.append({"shape": shape, "M": m, "kernel": mod.kernel_name, **bk._row_times(t_fp, t_q),
                     "repeats": repeats})
    return rows
