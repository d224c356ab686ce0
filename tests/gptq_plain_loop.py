"""The GPTQ solve written as the paper's plain column loop: main's `gptq_quantize` before the solve was arranged for
speed (format fits per group incl. palettes and second-level scales, weighted fits, fixed / static / whole-tensor
qparams, clamp statistics), every column through the format's encode/decode, the rank-1 feedback on the block's
remaining columns, the lazy batch update after each block. Tests compare the fast solver to it bit for bit."""
from __future__ import annotations

import torch

from methods.gptq_qparams import GroupQP, fit_cols, fixed_groups, layer_params, stack_qparams
from methods.gptq_solver import inverse_hessian_cholesky
from qresearch.quant import QTensor, QuantSpec
from qresearch.quant.primitives import decode, encode, saturated


def plain_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
               act_order: bool = False, static_groups: bool = False, qparams=None, stats: dict | None = None,
               weighted_fit: bool = True) -> tuple[QTensor, float]:
    W = W.detach().float().clone()  # [out, in]
    H = H.detach().float().to(W.device).clone()
    out, cols = W.shape
    g = spec.group_for(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    wdiag = torch.diag(H).clone() if weighted_fit and spec.format.fitted else None
    layer = layer_params(W, spec, wdiag, qparams)
    fixed = fixed_groups(W, spec, wdiag, layer, qparams, static_groups)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        wdiag = None if wdiag is None else wdiag[perm]
    Hinv = inverse_hessian_cholesky(H, percdamp)
    codes = torch.zeros(out, cols, dtype=torch.uint8)
    fitted: list[GroupQP] = []
    loss = clamped = clamped_loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if fixed is not None:
                s, z, lut = fixed[min(int(perm[c] if perm is not None else c) // g, len(fixed) - 1)]
            elif c % g == 0:  # qparams from the group's current weights, pending in-block updates included
                ahead = W[:, i2:c + g] - Err1[:, :i] @ Hinv[i1:c, i2:c + g]
                fitted.append(fit_cols(torch.cat([W1[:, i:i + g], ahead], dim=1), spec,
                                       None if wdiag is None else wdiag[c:c + g], layer))
                s, z, lut = fitted[-1]
            w, d = W1[:, i], Hinv1[i, i]
            q = encode(w, s, z, spec, lut)
            codes[:, c] = q
            dq = decode(q, s, z, spec, lut)
            col_loss = (w - dq) ** 2 / d**2 / 2  # the paper's loss
            loss += float(col_loss.sum())
            off = saturated(w, s, z, spec, lut)
            clamped += float(off.sum())
            clamped_loss += float(col_loss[off].sum())
            err = (w - dq) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    scale, zero, luts = stack_qparams(fixed if fixed is not None else fitted, spec, out)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if fixed is None:
            g_idx = (torch.arange(cols) // g)[inv].to(torch.int32)
    if stats is not None:
        stats.update(clamped=clamped / W.numel(), clamped_loss=clamped_loss / max(loss, 1e-30))
    return QTensor(codes, scale, zero, spec, g_idx, lut=luts, scale2=layer.scale2), loss
