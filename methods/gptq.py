"""GPTQ (Frantar et al. 2022): column-by-column rounding with inverse-Hessian error feedback, lazy batch updates,
act-order (optionally with static groups) and true-sequential block calibration. Math: `gptq_quantize`."""
from __future__ import annotations

import time

import torch

from qresearch.calib.engine import EngineConfig
from qresearch.calib.hooks import swapped_weights
from qresearch.calib.stats import input_stats
from qresearch.errors import ConfigError
from qresearch.method import Block, BlockMethod, Context, Recorder, TagFlag, require_weight_spec
from qresearch.quant import QTensor, QuantSpec, qparams_from_minmax

QPARAMS = ("minmax", "prior")  # prior = the previous stacked step's scale/zero (e.g. AWQ's clipped ranges)
__all__ = ["GPTQ", "gptq_quantize", "inverse_hessian_cholesky"]


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + percdamp * mean(diag H) * I)^-1, the form GPTQ's updates use."""
    H = H.clone()
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.diag(H).mean()
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        raise torch.linalg.LinAlgError(f"GPTQ: dampened Hessian is not positive definite (percdamp={percdamp}); "
                                       f"raise percdamp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _minmax_qparams(cols: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero [out] for the columns `cols` [out, k] of one group."""
    return qparams_from_minmax(cols.amin(dim=1), cols.amax(dim=1), spec)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False,
                  qparams: tuple[torch.Tensor, torch.Tensor] | None = None, stats: dict | None = None
                  ) -> tuple[QTensor, float]:
    """Quantize W [out, in] given the input Hessian H [in, in]. Returns (codes + qparams, loss).

    Rounding goes through the spec's numeric format (any entry of the format table).
    Without act_order, or with static_groups, groups are contiguous in the original column order (g_idx None).
    With act_order alone, group k holds the k-th g columns in processing order: scale/zero are stored in that
    order and the QTensor's g_idx[j] is the group of original column j.
    loss = sum (w - q)^2 / (2 [H^-1]_jj^2), as in the paper.
    `qparams` = fixed (scale, zero) [out, n_groups] of contiguous groups (e.g. AWQ's clipped ranges when
    stacking): they are used as static groups, and only the rounding is GPTQ's.
    `stats`, when given, receives "clamped": the fraction of weights that error feedback pushed off their group's
    grid (beyond its range, so their rounding error exceeds rounding), and "clamped_loss": their
    share of `loss`.
    """
    W = W.detach().float().clone()  # [out, in]
    H = H.detach().float().to(W.device).clone()
    out, cols = W.shape
    g, n_groups, fmt = spec.group_for(cols), spec.n_groups(cols), spec.format
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if qparams is not None:
        scale_in, zero_in = (t.float().to(W.device) for t in qparams)
        if scale_in.shape != (out, n_groups) or zero_in.shape != (out, n_groups):
            raise ValueError(f"qparams shapes {tuple(scale_in.shape)} / {tuple(zero_in.shape)} do not fit W "
                             f"{tuple(W.shape)} with group {g}: expected {(out, n_groups)}")
        static = [(scale_in[:, k], zero_in[:, k]) for k in range(n_groups)]
    elif static_groups:
        static = [_minmax_qparams(W[:, k * g:(k + 1) * g], spec) for k in range(n_groups)]
    else:
        static = None
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = inverse_hessian_cholesky(H, percdamp)
    codes = torch.zeros(out, cols, dtype=torch.uint8, device=W.device)
    scale = torch.zeros(out, n_groups, device=W.device)
    zero = torch.zeros(out, n_groups, device=W.device)
    losses = torch.zeros(out, device=W.device)
    clamped = clamped_loss = 0.0
    s = z = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # [out, b], [b, b]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if static is not None:
                s, z = static[int(perm[c] if perm is not None else c) // g]
            elif c % g == 0:  # new group: qparams from its current weights, pending in-block updates included
                ahead = W[:, i2:c + g] - Err1[:, :i] @ Hinv[i1:c, i2:c + g]  # [out, cols past this block]
                s, z = _minmax_qparams(torch.cat([W1[:, i:i + g], ahead], dim=1), spec)
                scale[:, c // g], zero[:, c // g] = s, z
            w, d = W1[:, i], Hinv1[i, i]
            q = fmt.encode(w, s, z, spec)  # [out] uint8
            dq = fmt.decode(q, s, z, spec)
            codes[:, c] = q
            col_loss = (w - dq) ** 2 / d**2 / 2
            losses += col_loss
            if stats is not None:
                off = fmt.saturated(w, s, z, spec)
                clamped += float(off.sum())
                clamped_loss += float(col_loss[off].sum())
            err = (w - dq) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # [out, b - i]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the remaining columns
    g_idx = None
    if static is not None:
        scale = torch.stack([st[0] for st in static], dim=1)  # [out, n_groups]
        zero = torch.stack([st[1] for st in static], dim=1)
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]  # back to the original column order
        if static is None:
            g_idx = (torch.arange(cols, device=W.device) // g)[inv].to(torch.int32)  # [in]
    loss = float(losses.sum())
    if stats is not None:
        stats.update(clamped=clamped / W.numel(), clamped_loss=clamped_loss / max(loss, 1e-30))
    return QTensor(codes, scale, zero, spec, g_idx), loss


class GPTQ(BlockMethod):
    """Block-by-block GPTQ on calibration inputs. `true_sequential`: each linear group sees the quantized output of
    the groups before it inside the block; otherwise all inputs come from the FP block."""

    name = "gptq"
    tag_flags = (TagFlag("act_order", False, "ao"), TagFlag("static_groups", False, "sg"),
                 TagFlag("true_sequential", True, "nts"), TagFlag("percdamp", 0.01, "d{}"),
                 TagFlag("qparams", "minmax", "{}"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                 true_sequential: bool = True, qparams: str = "minmax", propagate: str = "quantized",
                 offload: bool = True, batch_size: int = 8):
        self.spec = require_weight_spec(self.name, bits, group_size, sym, qformat)
        if blocksize < 1 or not 0 <= percdamp < 1:
            raise ConfigError(f"blocksize={blocksize} / percdamp={percdamp} invalid; allowed: blocksize >= 1, "
                              f"0 <= percdamp < 1")
        if qparams not in QPARAMS:
            raise ConfigError(f"gptq qparams={qparams!r} is unknown; allowed: {', '.join(QPARAMS)}")
        self.blocksize, self.percdamp, self.qparams = int(blocksize), float(percdamp), qparams
        self.act_order, self.static_groups, self.true_sequential = act_order, static_groups, true_sequential
        self.engine = EngineConfig(int(batch_size), offload, propagate)
        self._prior = None

    def prepare(self, model, ctx: Context) -> None:
        if self.qparams == "prior" and not (ctx.prior and ctx.prior.layers):
            raise ConfigError("gptq qparams=prior needs an earlier step that quantized the linears (e.g. awq in "
                              "method=awq_gptq); use qparams=minmax on its own")
        self._prior = ctx.prior if self.qparams == "prior" else None

    def quantize_block(self, blk: Block, rec: Recorder) -> dict[str, torch.Tensor]:
        qweights: dict[str, torch.Tensor] = {}
        firsts = [grp[0] for grp in blk.groups]
        if not self.true_sequential:
            stats = input_stats(blk.module, blk.io, firsts)
        for grp in blk.groups:
            if self.true_sequential:  # inputs after the quantized groups before this one
                with swapped_weights(blk.module, qweights):
                    stats = input_stats(blk.module, blk.io, [grp[0]], stop=True)
            for name in grp:
                qweights[name] = self._layer(blk, name, stats[grp[0]].hessian, rec)
        return qweights

    def _layer(self, blk: Block, name: str, H: torch.Tensor, rec: Recorder) -> torch.Tensor:
        t0, full = time.perf_counter(), blk.prefix + name
        W = blk.linear(name).weight.data
        extra: dict = {}
        q, loss = gptq_quantize(W, H, self.spec, self.blocksize, self.percdamp, self.act_order, self.static_groups,
                                self._prior_qparams(full), stats=extra)
        return rec.record(full, q, W, block=blk.index, H=H, t0=t0, gptq_loss=loss, gptq_clamped=extra["clamped"],
                          gptq_clamped_loss=extra["clamped_loss"])

    def _prior_qparams(self, full: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, zero) of the earlier step's result for this linear when qparams=prior."""
        if self._prior is None:
            return None
        prev = self._prior.layers.get(full)
        if prev is None or prev.weight.g_idx is not None or prev.weight.spec != self.spec:
            why = "no result" if prev is None else "act-order groups" if prev.weight.g_idx is not None else \
                f"spec {prev.weight.spec}"
            raise ConfigError(f"gptq qparams=prior: the earlier step left {why} for {full}; it needs contiguous "
                              f"groups with the same bits/group_size/sym ({self.spec})")
        return prev.weight.scale, prev.weight.zero
