"""The GPTQ solve written as the paper's plain column loop (what methods/gptq_solver.py computed before it was
arranged for speed): every column through the format's encode/decode, the rank-1 feedback on the block's remaining
columns, the lazy batch update after each block. Tests compare the fast solver to it bit for bit."""
from __future__ import annotations

import torch

from methods.gptq_solver import inverse_hessian_cholesky
from qresearch.quant import QTensor, QuantSpec, qparams_from_minmax


def _minmax(cols: torch.Tensor, spec: QuantSpec):
    return qparams_from_minmax(cols.amin(dim=1), cols.amax(dim=1), spec)


def plain_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
               act_order: bool = False, static_groups: bool = False, qparams=None) -> tuple[QTensor, float]:
    W, H = W.float().clone(), H.float().clone()
    out, cols = W.shape
    g, n_groups, fmt = spec.group_for(cols), spec.n_groups(cols), spec.format
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if qparams is not None:
        static = [(qparams[0][:, k].float(), qparams[1][:, k].float()) for k in range(n_groups)]
    elif static_groups:
        static = [_minmax(W[:, k * g:(k + 1) * g], spec) for k in range(n_groups)]
    else:
        static = None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_cholesky(H, percdamp)
    codes, loss = torch.zeros(out, cols, dtype=torch.uint8), 0.0
    scale, zero = torch.zeros(out, n_groups), torch.zeros(out, n_groups)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if static is not None:
                s, z = static[int(perm[c] if perm is not None else c) // g]
            elif c % g == 0:  # qparams from the group's current weights, pending in-block updates included
                ahead = W[:, i2:c + g] - Err1[:, :i] @ Hinv[i1:c, i2:c + g]
                s, z = _minmax(torch.cat([W1[:, i:i + g], ahead], dim=1), spec)
                scale[:, c // g], zero[:, c // g] = s, z
            w, d = W1[:, i], Hinv1[i, i]
            q = fmt.encode(w, s, z, spec)
            codes[:, c] = q
            dq = fmt.decode(q, s, z, spec)
            loss += float(((w - dq) ** 2 / d**2 / 2).sum())  # the paper's loss
            err = (w - dq) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = None
    if static is not None:
        scale = torch.stack([st[0] for st in static], dim=1)
        zero = torch.stack([st[1] for st in static], dim=1)
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if static is None:
            g_idx = (torch.arange(cols) // g)[inv].to(torch.int32)
    return QTensor(codes, scale, zero, spec, g_idx), loss
