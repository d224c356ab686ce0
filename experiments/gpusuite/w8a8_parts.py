"""Where a W8A8 prefill call's time goes: the per-token activation quantizer, our int8 GEMM with its rescale
epilogue, and, for scale, cuBLAS's int8 GEMM (torch._int_mm, int32 out, no epilogue) on the same int8 operands,
beside the fp16 matmul. One row per (shape, M); the W8A8 goal is the whole call against fp16.

`cublas_bound` = fp16 / (act quant + cuBLAS int8 GEMM): the speedup a call would reach with cuBLAS's GEMM and a
free epilogue; our GEMM's distance from cuBLAS's is `gemm_vs_cublas`.
"""
from __future__ import annotations

import torch

from experiments import bench_kernels as bk


def signed_weight(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """The signed int8 weight [N, K] of a sym 8-bit layer's int32_k words (code - 128 = code ^ 0x80 as int8)."""
    from qresearch.kernels.reference import int8_from_codes  # LIBRARY: code - 128 as int8

    return int8_from_codes(qweight.view(torch.uint8)[:, :in_features]).contiguous()


ACT_QUANT_BLOCKS = (1024, 2048, 4096, 8192)  # two-pass row blocks tried beside the default (one pass up to ONE_PASS_MAX)


def act_quant_blocks(x, xq, sx, us) -> list[dict]:
    """The activation quantizer at each row block of ACT_QUANT_BLOCKS smaller than the row (two passes over x: max,
    then quantize) beside the default's `xq`, `sx`: us and whether codes and scales are the default's bits."""
    from qresearch.kernels.triton_w8a8 import act_quant  # LIBRARY: the W8A8 activation quantizer

    out = []
    for b in (b for b in ACT_QUANT_BLOCKS if b < x.shape[1]):
        q, s = act_quant(x, b)
        out.append({"block": b, "us": us(lambda b=b: act_quant(x, b))[0] * 1e6,
                    "identical": bool(torch.equal(q, xq) and torch.equal(s, sx))})
    return out


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_operands(x: torch.Tensor, w: torch.Tensor):
    """e4m3 x [M, K], w [N, K] with fp32 row scales absmax / 448 (sa [M, 1], sb [1, N]): a row-wise scaled GEMM's
    operands, as per-token x per-channel W8A8 would hold them in fp8."""
    sa = (x.float().abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [M, 1]
    sb = (w.float().abs().amax(1, keepdim=True) / FP8_MAX).clamp_min(1e-12)  # [N, 1]
    e4m3 = torch.float8_e4m3fn
    return (x.float() / sa).to(e4m3), sa, (w.float() / sb).to(e4m3), sb.t().contiguous()


def fp8_parts(x, w, us, fp16_us: float, act_quant_us: float) -> dict:
    """cuBLAS's fp8 GEMM (torch._scaled_mm, e4m3, row-wise scales, bf16 out) on the same shapes: a second yardstick
    for the W8A8 goal (Hopper runs fp8 and int8 MMAs at the same peak rate). fp8 bound = fp16 / (our int8 act
    quant + fp8 GEMM): the act quant stands in for an fp8 quantizer, one pass over x either way."""
    try:
        xf, sa, wf, sb = fp8_operands(x, w)
        gemm = lambda: torch._scaled_mm(xf, wf.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
        y = gemm()  # [M, N]
        want = (xf.double() * sa.double()) @ (wf.double() * sb.double().t()).t()
        t = us(gemm)[0] * 1e6
    except Exception as exc:  # noqa: BLE001 - a yardstick: its failure is recorded, the row kept
        return {"fp8_us": None, "fp8_bound": None, "fp8_rel_err": None, "fp8_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"fp8_us": t, "fp8_bound": fp16_us / (act_quant_us + t), "fp8_rel_err": bk.rel_err(y, want)}


@torch.no_grad()
def parts_row(shape: str, m: int, device, dtype, flush, repeats: int, warmup: int, graphs: bool) -> dict:
    """Times (us, CUDA-graph replays where they captured, else eager) of one W8A8 call and its parts."""
    from qresearch.kernels.triton_w8a8 import act_quant, int8_gemm  # LIBRARY: the W8A8 Triton kernels

    out_f, in_f = map(int, shape.split("x"))
    mod = bk.build("w8a8", out_f, in_f, device, dtype)
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    x = torch.randn(m, in_f, device=device, dtype=dtype)
    xq, sx = act_quant(x)
    wq_t = signed_weight(mod.qweight, in_f).t()  # [K, N] view of the row-major [N, K]: the layout _int_mm takes

    def us(fn) -> tuple[float, str]:
        t = bk.time_call(fn, device, repeats, warmup, flush, graphs)
        return (t["graph_s"], "cuda_graph") if t.get("graph_s") else (t["eager_s"], "eager")

    parts = {"fp16": lambda: torch.matmul(x, w.t()), "call": lambda: mod(x), "act_quant": lambda: act_quant(x),
             "gemm": lambda: int8_gemm(xq, sx, mod.qweight, mod.scales, None, dtype)}
    times = {k: us(fn) for k, fn in parts.items()}
    row = {"shape": shape, "M": m, **{f"{k}_us": s * 1e6 for k, (s, _) in times.items()},
           "timing": sorted({t for _, t in times.values()}), "repeats": repeats, "kernel": mod.kernel_name,
           "speedup": times["fp16"][0] / times["call"][0]}
    row["act_quant_blocks"] = act_quant_blocks(x, xq, sx, us)
    row.update(fp8_parts(x, w, us, row["fp16_us"], row["act_quant_us"]))
    try:  # cuBLAS int8 is the yardstick, not the code under test: its failure is recorded, the row kept
        acc = torch._int_mm(xq, wq_t)  # [M, N] int32
        row["cublas_int8_us"] = us(lambda: torch._int_mm(xq, wq_t))[0] * 1e6
    except RuntimeError as exc:
        row.update(cublas_int8_us=None, gemm_vs_cublas=None, cublas_bound=None, gemm_rel_err=None,
                   cublas_error=f"{type(exc).__name__}: {exc}"[:200])
        return row
    row["gemm_vs_cublas"] = row["cublas_int8_us"] / row["gemm_us"]
    row["cublas_bound"] = row["fp16_us"] / (row["act_quant_us"] + row["cublas_int8_us"])
    # exactness of the pieces timed: our GEMM's integer sums equal cuBLAS's (epilogue undone in float64)
    want = acc.double() * sx.double()[:, None] * mod.scales.double().reshape(1, -1)
    row["gemm_rel_err"] = bk.rel_err(int8_gemm(xq, sx, mod.qweight, mod.scales, None, dtype), want)
    return row
