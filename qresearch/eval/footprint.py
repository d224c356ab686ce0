"""Bytes of weights as they would be stored, bits per weight, and peak memory."""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from ..records import LayerResult, QuantResult

GIDX_BITS = 32  # act-order group index, int32 per input column
OUTLIER_BITS = 16  # full-precision outlier columns (LLM.int8())


def layer_bits(res: LayerResult) -> dict[str, int]:
    """Storage bits of one quantized linear by its numeric format: codes, group scales, their second-level scales,
    zeros, codebook entries, extras."""
    q = res.weight
    fmt, spec = q.spec.format, q.spec
    out, inp = q.codes.shape
    n_qp = q.scale.numel()
    return {"codes": out * inp * fmt.code_bits(spec), "scales": n_qp * fmt.scale_bits(spec),
            "scale2": 0 if q.scale2 is None else q.scale2.numel() * fmt.scale2_bits(),
            "zeros": n_qp * fmt.zero_bits(spec), "lut": 0 if q.lut is None else q.lut.numel() * fmt.lut_bits(),
            "g_idx": 0 if q.g_idx is None else inp * GIDX_BITS,
            "outliers": 0 if res.outliers is None else int(res.outliers.sum()) * out * OUTLIER_BITS}


def footprint(model: nn.Module, result: QuantResult, fp_bits: int = 16) -> dict:
    """Model storage with quantized linears as stored and everything else at `fp_bits` (tied weights once)."""
    quantized = set(result.layers)
    seen, other_params = set(), 0
    for name, p in model.named_parameters(remove_duplicate=True):
        mod, _, leaf = name.rpartition(".")
        if (mod in quantized and leaf == "weight") or id(p) in seen:  # a quantized linear's bias stays fp
            continue
        seen.add(id(p))
        other_params += p.numel()
    q_bits = sum(sum(layer_bits(r).values()) for r in result.layers.values())
    q_weights = sum(r.weight.codes.numel() for r in result.layers.values())
    # packed modules the model already held (a reloaded quantized checkpoint): the bytes the checkpoint stored
    # (`stored_bytes`, set when another tool's format was converted) or else their buffer bytes
    for name, m in model.named_modules():
        if name not in quantized and hasattr(m, "weight_bytes") and hasattr(m, "in_features"):
            q_bits += 8 * (getattr(m, "stored_bytes", None) or m.weight_bytes())
            q_weights += m.in_features * m.out_features
    total_bits = q_bits + other_params * fp_bits
    fp_total_bits = (q_weights + other_params) * fp_bits
    return {"weight_bytes": total_bits / 8, "weight_bytes_fp16": fp_total_bits / 8,
            "compression": fp_total_bits / total_bits, "quantized_params": q_weights, "other_params": other_params,
            "bits_per_weight": (q_bits / q_weights) if q_weights else float(fp_bits)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """Peak accelerator memory (CUDA allocator) and the process's peak resident set size."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"peak_rss_bytes": rss}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out
