"""Shared test helpers: quantized layers with known codes, and the shared data folder."""
import os
from pathlib import Path

import torch

from qresearch.records import LayerResult
from qresearch.quant import quantize_tensor, weight_spec
from qresearch.quant.packing import PackedMeta, pack_rows, pack_zeros

REPO = Path(__file__).resolve().parents[1]


def cpu_w8a8_kernel() -> str:
    """The kernel packed W8A8 layers get on this CPU: our VNNI product on the stored codes where the CPU has
    AVX512-VNNI (and a compiler), else torch._int_mm."""
    from qresearch.kernels import cpu_int8

    return "c_vnni" if cpu_int8.load()[0] is not None else "torch_int_mm"


def shared_dir() -> Path:
    return Path(os.environ.get("QRESEARCH_SHARED", REPO.parent / "shared"))


def fp16_exact(res: LayerResult) -> LayerResult:
    """Round scales to fp16 so fake (fp32 scales) and packed (fp16 scales) dequantize identically."""
    res.weight.scale = res.weight.scale.half().float()
    return res


def rtn_layer(out_f, in_f, bits, group, sym, act_order=False, seed=0) -> LayerResult:
    """RTN codes for a random weight; act_order permutes which group each input column uses."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    q = quantize_tensor(w, weight_spec(bits, group, sym))
    g_idx = None
    if act_order:
        g_idx = (torch.arange(in_f) // q.spec.group_for(in_f))[torch.randperm(in_f, generator=g)].to(torch.int32)
    q.g_idx = g_idx
    return fp16_exact(LayerResult(q))


def packed_args(res: LayerResult):
    """(meta, qweight, scales fp16, qzeros|None, g_idx|None) for calling kernels directly."""
    q = res.weight
    out_f, in_f = q.codes.shape
    meta = PackedMeta(q.spec.bits, q.spec.group_for(in_f), in_f, out_f, q.spec.sym)
    qz = None if q.spec.sym else pack_zeros(q.zero, q.spec.bits)
    return meta, pack_rows(q.codes, q.spec.bits), q.scale.half(), qz, q.g_idx


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def correlated_hessian(n: int, g: torch.Generator) -> torch.Tensor:
    """H = X^T X / rows of 4n rows of n inputs with uneven channel scales and correlated neighbours (from g)."""
    X = torch.randn(4 * n, n, generator=g) * torch.linspace(0.2, 3.0, n)
    X[:, 1:] += 0.5 * X[:, :-1]  # correlated neighbours
    return X.T @ X / X.shape[0]
