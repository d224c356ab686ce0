"""LLM.int8() mixed-precision decomposition, decided per call: input columns whose magnitude reaches the threshold in
any row go through a float matmul, the rest through the layer's int8 (or fake-quant) path. Each layer counts what
it decomposed (`OutlierCounter`), so a run can report the outlier feature set it saw."""
from __future__ import annotations

import torch

from ..kernels.reference import dequant_weight
from ..quant.packing import PackedMeta


class OutlierCounter:
    """What one layer's decompositions touched: columns ever selected, columns per call, rows holding an outlier."""

    def __init__(self, in_features: int):
        self.seen = torch.zeros(in_features, dtype=torch.bool)  # [in] union over calls
        self.calls = self.calls_with_outliers = self.rows = self.rows_affected = self.columns_total = 0

    def update(self, cols: torch.Tensor, row_hit: torch.Tensor) -> None:
        self.seen |= cols.cpu()
        n_cols = int(cols.sum())
        self.calls += 1
        self.calls_with_outliers += int(n_cols > 0)
        self.columns_total += n_cols
        self.rows += row_hit.numel()
        self.rows_affected += int(row_hit.sum())

    def summary(self) -> dict:
        return {"calls": self.calls, "outlier_columns_seen": int(self.seen.sum()),
                "outlier_columns": torch.nonzero(self.seen).flatten().tolist()[:64],  # first 64 indices
                "mean_columns_per_call": self.columns_total / max(self.calls, 1),
                "fraction_calls_with_outliers": self.calls_with_outliers / max(self.calls, 1),
                "fraction_rows_affected": self.rows_affected / max(self.rows, 1), "rows": self.rows}


def outlier_columns(x2: torch.Tensor, threshold: float, counter: OutlierCounter | None = None) -> torch.Tensor:
    """[in] bool: columns of x2 [M, in] with |x| >= threshold in some row (counted in `counter`)."""
    big = x2.detach().abs() >= threshold  # [M, in]
    cols = big.any(dim=0)
    if counter is not None:
        counter.update(cols, big.any(dim=1))
    return cols


def weight_columns(meta: PackedMeta, bufs: dict, cols: torch.Tensor) -> torch.Tensor:
    """Dequantized float32 columns [out, n_cols] of a packed weight (8-bit: read the code bytes directly)."""
    if meta.bits == 8 and meta.qformat == "int" and meta.n_groups == 1 and bufs.get("g_idx") is None:
        codes = bufs["qweight"].view(torch.uint8)[:, :meta.in_features][:, cols]  # [out, n_cols] little-endian bytes
        zero = 128.0 if meta.sym else dequant_zero_column(meta, bufs)
        return (codes.float() - zero) * bufs["scales"].float()  # scales [out, 1]
    w = dequant_weight(meta, bufs["qweight"], bufs["scales"], bufs.get("qzeros"), bufs.get("g_idx"))  # [out, in]
    return w[:, cols]


def dequant_zero_column(meta: PackedMeta, bufs: dict) -> torch.Tensor:
    from ..kernels.reference import weight_zeros

    return weight_zeros(meta, bufs.get("qzeros")).to(bufs["qweight"].device)  # [out, 1]
