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
from qresearch.quant import QTensor, QuantSpec
from qresearch.quant.codebook import finetune_lut
from qresearch.quant.format_base import LayerParams
from qresearch.quant.primitives import decode, encode, fit_qparams, group_weights, saturated, to_groups

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


GroupQP = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # scale [out | 1], zero, lut [out | 1, K]


def _fit_cols(cols: torch.Tensor, spec: QuantSpec, weight: torch.Tensor | None, layer: LayerParams) -> GroupQP:
    """(scale, zero, lut) of one group from its columns cols [out, k] by the format's fit (weight [k] or None)."""
    qp = spec.format.fit(cols[:, None, :], spec, None if weight is None else weight[None, None, :], layer)
    return qp.scale[:, 0], qp.zero[:, 0], None if qp.lut is None else qp.lut[:, 0]  # [out], [out], [out | 1, K]


def _fixed_groups(W: torch.Tensor, spec: QuantSpec, wdiag: torch.Tensor | None, layer: LayerParams,
                  qparams, static_groups: bool) -> list[GroupQP] | None:
    """Per-group qparams fixed before the column loop: given ones (an earlier step's), static groups from the
    unquantized weights, or one set for the whole tensor (granularity tensor); None = fitted as the loop goes."""
    out, cols = W.shape
    g, n_groups = spec.group_for(cols), spec.n_groups(cols)
    if qparams is not None:
        scale, zero = (qparams.scale, qparams.zero) if isinstance(qparams, QTensor) else qparams
        scale, zero = scale.float().to(W.device), zero.float().to(W.device)
        lut = qparams.lut.to(W.device) if isinstance(qparams, QTensor) and qparams.lut is not None else None
        if scale.shape != (out, n_groups) or zero.shape != (out, n_groups):
            raise ValueError(f"qparams shapes {tuple(scale.shape)} / {tuple(zero.shape)} do not fit W "
                             f"{tuple(W.shape)} with group {g}: expected {(out, n_groups)}")
        return [(scale[:, k], zero[:, k], None if lut is None else lut[:, min(k, lut.shape[1] - 1)])
                for k in range(n_groups)]
    if spec.granularity == "tensor":  # one grid for the whole matrix, from the unquantized weights
        qp, _ = fit_qparams(W, spec, None if wdiag is None else wdiag.expand_as(W), layer=layer)
        return [(qp.scale[0], qp.zero[0], None if qp.lut is None else qp.lut[0])]
    if static_groups:
        return [_fit_cols(W[:, k * g:(k + 1) * g], spec, None if wdiag is None else wdiag[k * g:(k + 1) * g], layer)
                for k in range(n_groups)]
    return None


def _stack_qparams(fixed: list[GroupQP], spec: QuantSpec, out: int) -> tuple[torch.Tensor, ...]:
    """The QTensor's scale, zero [out | 1, n_groups] and lut [out | 1, n_groups | 1, K] from per-group qparams."""
    rows = 1 if spec.granularity == "tensor" else out
    scale = torch.stack([f[0].expand(rows) for f in fixed], dim=1)
    zero = torch.stack([f[1].expand(rows) for f in fixed], dim=1)
    lut = None if fixed[0][2] is None else torch.stack([f[2] for f in fixed], dim=1)
    return scale, zero, lut


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False,
                  qparams: "tuple[torch.Tensor, torch.Tensor] | QTensor | None" = None, stats: dict | None = None,
                  weighted_fit: bool = True) -> tuple[QTensor, float]:
    """Quantize W [out, in] given the input Hessian H [in, in]. Returns (codes + qparams, loss).

    Rounding and per-group qparams go through the spec's numeric format (any entry of the format table): each
    group's qparams are fitted (format.fit) to its current columns, pending updates included; what the whole
    tensor shares (second-level scales, a per-layer codebook) is fixed first from the unquantized W. Fitted formats
    (k-means, binary, ternary) weight values by diag(H) when `weighted_fit`.
    Without act_order, or with static_groups, groups are contiguous in the original column order (g_idx None).
    With act_order alone, group k holds the k-th g columns in processing order: scale/zero are stored in that
    order and the QTensor's g_idx[j] is the group of original column j. Granularity tensor: one grid for W.
    loss = sum (w - q)^2 / (2 [H^-1]_jj^2), as in the paper.
    `qparams` = fixed (scale, zero) [out, n_groups] of contiguous groups, or an earlier step's QTensor (e.g.
    AWQ's clipped ranges when stacking): they are used as static groups, and only the rounding is GPTQ's.
    `stats`, when given, receives "clamped": the fraction of weights that error feedback pushed off their group's
    grid (beyond its range, so their rounding error exceeds rounding), and "clamped_loss": their
    share of `loss`.
    """
    W = W.detach().float().clone()  # [out, in]
    H = H.detach().float().to(W.device).clone()
    out, cols = W.shape
    g, n_groups = spec.group_for(cols), spec.n_groups(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    wdiag = torch.diag(H).clone() if weighted_fit and spec.format.fitted else None  # [in] value importance
    if isinstance(qparams, QTensor):
        layer = LayerParams(qparams.scale2, None)
    else:
        layer = spec.format.prepare_layer(to_groups(W, g), spec, group_weights(wdiag, out, cols, g))
    fixed = _fixed_groups(W, spec, wdiag, layer, qparams, static_groups)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        wdiag = None if wdiag is None else wdiag[perm]
    Hinv = inverse_hessian_cholesky(H, percdamp)
    codes = torch.zeros(out, cols, dtype=torch.uint8, device=W.device)
    fitted: list[GroupQP] = []
    losses = torch.zeros(out, device=W.device)
    clamped = clamped_loss = 0.0
    s = z = lut = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]  # [out, b], [b, b]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if fixed is not None:
                s, z, lut = fixed[min(int(perm[c] if perm is not None else c) // g, len(fixed) - 1)]
            elif c % g == 0:  # new group: qparams from its current weights, pending in-block updates included
                ahead = W[:, i2:c + g] - Err1[:, :i] @ Hinv[i1:c, i2:c + g]  # [out, cols past this block]
                fitted.append(_fit_cols(torch.cat([W1[:, i:i + g], ahead], dim=1), spec,
                                        None if wdiag is None else wdiag[c:c + g], layer))
                s, z, lut = fitted[-1]
            w, d = W1[:, i], Hinv1[i, i]
            q = encode(w, s, z, spec, lut)  # [out] uint8
            dq = decode(q, s, z, spec, lut)
            codes[:, c] = q
            col_loss = (w - dq) ** 2 / d**2 / 2
            losses += col_loss
            if stats is not None:
                off = saturated(w, s, z, spec, lut)
                clamped += float(off.sum())
                clamped_loss += float(col_loss[off].sum())
            err = (w - dq) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # [out, b - i]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the remaining columns
    g_idx = None
    scale, zero, luts = _stack_qparams(fixed if fixed is not None else fitted, spec, out)
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]  # back to the original column order
        if fixed is None:
            g_idx = (torch.arange(cols, device=W.device) // g)[inv].to(torch.int32)  # [in]
    loss = float(losses.sum())
    if stats is not None:
        stats.update(clamped=clamped / W.numel(), clamped_loss=clamped_loss / max(loss, 1e-30))
    return QTensor(codes, scale, zero, spec, g_idx, lut=luts, scale2=layer.scale2), loss


class GPTQ(BlockMethod):
    """Block-by-block GPTQ on calibration inputs. `true_sequential`: each linear group sees the quantized output of
    the groups before it inside the block; otherwise all inputs come from the FP block."""

    name = "gptq"
    tag_flags = (TagFlag("act_order", False, "ao"), TagFlag("static_groups", False, "sg"),
                 TagFlag("true_sequential", True, "nts"), TagFlag("percdamp", 0.01, "d{}"),
                 TagFlag("qparams", "minmax", "{}"), TagFlag("weighted_fit", True, "uwfit"),
                 TagFlag("lut_finetune", False, "lutft"), TagFlag("bits_map", None, "bitsmap"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 scale_bits: int | None = None, scale_level2: str = "channel", bits_map: str | None = None,
                 blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                 true_sequential: bool = True, qparams: str = "minmax", weighted_fit: bool = True,
                 lut_finetune: bool = False, propagate: str = "quantized", offload: bool = True, batch_size: int = 8):
        self.spec = require_weight_spec(self.name, bits, group_size, sym, qformat, scale_bits, scale_level2)
        self.use_bits_map(bits_map)
        if lut_finetune and self.spec.qformat != "kmeans":
            raise ConfigError(f"lut_finetune=true refits codebook entries; it needs qformat=kmeans "
                              f"(got {self.spec.qformat})")
        self.weighted_fit, self.lut_finetune = weighted_fit, lut_finetune
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
        spec, extra = self.spec_for(full), {}
        q, loss = gptq_quantize(W, H, spec, self.blocksize, self.percdamp, self.act_order, self.static_groups,
                                self._prior_qparams(full, spec), stats=extra, weighted_fit=self.weighted_fit)
        if self.lut_finetune:
            q = finetune_lut(W, H, q)
        return rec.record(full, q, W, block=blk.index, H=H, t0=t0, gptq_loss=loss, gptq_clamped=extra["clamped"],
                          gptq_clamped_loss=extra["clamped_loss"])

    def _prior_qparams(self, full: str, spec: QuantSpec) -> QTensor | None:
        """The earlier step's result for this linear when qparams=prior (its scale, zero, palette, scale2)."""
        if self._prior is None:
            return None
        prev = self._prior.layers.get(full)
        if prev is None or prev.weight.g_idx is not None or prev.weight.spec != spec:
            why = "no result" if prev is None else "act-order groups" if prev.weight.g_idx is not None else \
                f"spec {prev.weight.spec}"
            raise ConfigError(f"gptq qparams=prior: the earlier step left {why} for {full}; it needs contiguous "
                              f"groups with the same bits/group_size/sym ({spec})")
        return prev.weight
