"""Codebook fine-tuning: with the codes fixed, the palette entries that minimise the layer's output error
tr((W - C[codes]) H (W - C[codes])^T) solve a small linear system per palette owner (GPTVQ-style codebook update).

Palette owners: each row (per-row / per-group palettes: one system of n_groups * K unknowns per row) or the whole
layer (one palette: one system of K unknowns). A tiny ridge towards the current entries keeps unused entries in
place. The result is rounded to fp16 (as stored) and re-sorted with the codes remapped, so palettes stay sorted.
"""
from __future__ import annotations

import torch

from .primitives import QTensor

CHUNK_VALUES = 4_000_000  # float64 values of A^T H held at once (rows per chunk = this / (P * in))
RIDGE = 1e-6


def _palette_index(q: QTensor) -> tuple[torch.Tensor, int]:
    """Index of each weight's palette entry [out, in] (group * K + code) and entries per owner."""
    out, cols = q.codes.shape
    k = q.lut.shape[-1]
    if q.lut.shape[1] == 1:
        return q.codes.long(), k
    groups = q.g_idx.long() if q.g_idx is not None else torch.arange(cols, device=q.codes.device) // q.spec.group_for(cols)
    return groups[None, :] * k + q.codes.long(), q.lut.shape[1] * k  # [out, in], n_groups * K


def _normal_equations(W: torch.Tensor, H: torch.Tensor, p: torch.Tensor, n_p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: M = A^T H A [out, P, P] and b = A^T H w [out, P], A = one-hot(p) [in, P]."""
    out, cols = W.shape
    M = torch.zeros(out, n_p, n_p, dtype=torch.float64, device=W.device)
    b = torch.zeros(out, n_p, dtype=torch.float64, device=W.device)
    Hd = H.double()
    step = max(1, CHUNK_VALUES // (n_p * cols))
    for r0 in range(0, out, step):
        pr = p[r0:r0 + step]  # [rows, in]
        rows = pr.shape[0]
        T = torch.zeros(rows, n_p, cols, dtype=torch.float64, device=W.device)  # A^T H, [rows, P, in]
        T.scatter_add_(1, pr[:, :, None].expand(rows, cols, cols), Hd[None].expand(rows, cols, cols))
        M[r0:r0 + rows].scatter_add_(2, pr[:, None, :].expand(rows, n_p, cols), T)
        b[r0:r0 + rows] = torch.einsum("rpj,rj->rp", T, W[r0:r0 + rows].double())
    return M, b


def _solve(M: torch.Tensor, b: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(M + lam I) c = b + lam old, lam = RIDGE * mean diag (unused entries stay at `old`)."""
    lam = RIDGE * M.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-30)  # [.., 1]
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return torch.linalg.solve(M + lam[..., None] * eye, b + lam * old)


def _resort(q: QTensor, lut: torch.Tensor) -> QTensor:
    """Sort each palette and remap the codes accordingly."""
    vals, order = lut.sort(dim=-1)
    inv = torch.argsort(order, dim=-1)  # old entry -> new position, [rows | 1, n_groups | 1, K]
    out, cols = q.codes.shape
    if lut.shape[1] == 1:
        new = torch.gather(inv[:, 0].expand(out, -1), 1, q.codes.long())
    else:
        g = q.g_idx.long() if q.g_idx is not None else torch.arange(cols, device=q.codes.device) // q.spec.group_for(cols)
        new = torch.gather(inv.expand(out, -1, -1)[:, g], 2, q.codes.long()[..., None]).squeeze(-1)
    return QTensor(new.to(torch.uint8), q.scale, q.zero, q.spec, q.g_idx, lut=vals, scale2=q.scale2)


def finetune_lut(W: torch.Tensor, H: torch.Tensor, q: QTensor) -> QTensor:
    """Palette entries minimising the output error for q's fixed codes (W [out, in] the unquantized weight,
    H [in, in] its input Hessian); per-row palettes [out, n_groups, K] or one per layer [1, 1, K]."""
    p, n_p = _palette_index(q)
    M, b = _normal_equations(W.float(), H.float(), p, n_p)
    if q.lut.shape[0] == 1 and W.shape[0] > 1:  # one palette shared by every row
        c = _solve(M.sum(0), b.sum(0), q.lut.double().reshape(-1)).reshape(1, 1, -1)
    else:
        c = _solve(M, b, q.lut.double().reshape(W.shape[0], -1)).reshape(q.lut.shape)
    return _resort(q, c.half().float())
