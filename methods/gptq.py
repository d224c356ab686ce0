"""GPTQ (Frantar et al. 2022): column-by-column rounding with inverse-Hessian error feedback, lazy batch updates,
act-order (optionally with static groups) and true-sequential block calibration. Math: `gptq_quantize`."""
from __future__ import annotations

import time

import torch
from torch import nn

from qresearch.method import Context, LayerResult, Method, QuantResult
from qresearch.models.arch import get_module
from qresearch.nn.fake import layer_weight
from qresearch.pipeline.engine import BlockIO, EngineConfig, calibrate, record_inputs, swapped_weights
from qresearch.pipeline.hessian import accumulate_hessian, output_rel_error
from qresearch.quant import QTensor, QuantSpec, qparams_from_minmax, weight_spec
from qresearch.quant.spec import ConfigError
from qresearch.quant.stats import check_finite, rel_error

QPARAMS = ("minmax", "prior")  # prior = the previous stacked step's scale/zero (e.g. AWQ's clipped ranges)
__all__ = ["GPTQ", "gptq_quantize", "accumulate_hessian", "inverse_hessian_cholesky"]


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
                  ) -> tuple[QTensor, torch.Tensor | None, float]:
    """Quantize W [out, in] given the input Hessian H [in, in]. Returns (codes + qparams, g_idx or None, loss).

    Without act_order, or with static_groups, groups are contiguous in the original column order (g_idx None).
    With act_order alone, group k holds the k-th g columns in processing order: scale/zero are stored in that
    order and g_idx[j] is the group of original column j. loss = sum (w - q)^2 / (2 [H^-1]_jj^2), as in the paper.
    `qparams` = fixed (scale, zero) [out, n_groups] of contiguous groups (e.g. AWQ's clipped ranges when
    stacking): they are used as static groups, and only the rounding is GPTQ's.
    `stats`, when given, receives "clamped": the fraction of weights that error feedback pushed off their group's
    grid (clamped to 0 or 2^bits - 1, so their rounding error exceeds half a step), and "clamped_loss": their
    share of `loss`.
    """
    W = W.detach().float().clone()  # [out, in]
    H = H.detach().float().to(W.device).clone()
    out, cols = W.shape
    g, n_groups, qmax = spec.group_for(cols), spec.n_groups(cols), 2**spec.bits - 1
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
            q_free = torch.round(w / s) + z
            q = torch.clamp(q_free, 0, qmax)
            dq = (q - z) * s
            codes[:, c] = q.to(torch.uint8)
            col_loss = (w - dq) ** 2 / d**2 / 2
            losses += col_loss
            if stats is not None:
                off = q_free != q
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
    return QTensor(codes, scale, zero, spec), g_idx, loss


class GPTQ(Method):
    """Block-by-block GPTQ on calibration inputs. `true_sequential`: each linear group sees the quantized output of
    the groups before it inside the block; otherwise all inputs come from the FP block."""

    name = "gptq"
    needs_calibration = True

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, blocksize: int = 128,
                 percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                 true_sequential: bool = True, qparams: str = "minmax", propagate: str = "quantized",
                 offload: bool = True, batch_size: int = 8):
        self.spec = weight_spec(bits, group_size, sym)
        if self.spec is None:
            raise ConfigError("gptq with bits=16 quantizes nothing; allowed bits: 2..8 (use method=fp16 instead)")
        if blocksize < 1 or not 0 <= percdamp < 1:
            raise ConfigError(f"blocksize={blocksize} / percdamp={percdamp} invalid; allowed: blocksize >= 1, "
                              f"0 <= percdamp < 1")
        self.blocksize, self.percdamp = int(blocksize), float(percdamp)
        self.act_order, self.static_groups, self.true_sequential = bool(act_order), bool(static_groups), \
            bool(true_sequential)
        if qparams not in QPARAMS:
            raise ConfigError(f"gptq qparams={qparams!r} is unknown; allowed: {', '.join(QPARAMS)}")
        self.qparams, self._prior = qparams, None
        self.engine = EngineConfig(int(batch_size), bool(offload), propagate)
        self.engine_stats: dict = {}

    def quantize(self, model: nn.Module, ctx: Context) -> QuantResult:
        if ctx.calib is None:
            raise ConfigError("gptq needs calibration data; set data=c4 (or data=random)")
        if self.qparams == "prior" and not (ctx.prior and ctx.prior.layers):
            raise ConfigError("gptq qparams=prior needs an earlier step that quantized the linears (e.g. awq in "
                              "method=awq_gptq); use qparams=minmax on its own")
        self._prior = ctx.prior if self.qparams == "prior" else None
        result = QuantResult()

        def process(i: int, block: nn.Module, io: BlockIO) -> dict[str, torch.Tensor]:
            groups = [[n for n in grp if isinstance(get_module(block, n), nn.Linear)] for grp in ctx.arch.sequential]
            groups = [grp for grp in groups if grp]
            qweights: dict[str, torch.Tensor] = {}
            if self.true_sequential:
                for grp in groups:
                    with swapped_weights(block, qweights):
                        H = hessians(block, io, [grp[0]], stop=True)[grp[0]]
                    for name in grp:
                        qweights[name] = self._layer(f"{ctx.arch.blocks}.{i}.{name}", i, block, name, H, result)
            else:
                Hs = hessians(block, io, [grp[0] for grp in groups], stop=False)
                for grp in groups:
                    for name in grp:
                        qweights[name] = self._layer(f"{ctx.arch.blocks}.{i}.{name}", i, block, name, Hs[grp[0]],
                                                     result)
            return qweights

        self.engine_stats = calibrate(model, ctx.arch, ctx.calib, ctx.device, process, self.engine).as_dict()
        return result

    def _layer(self, full: str, i: int, block: nn.Module, name: str, H: torch.Tensor, result: QuantResult):
        t0 = time.perf_counter()
        W = get_module(block, name).weight.data
        extra: dict = {}
        q, g_idx, loss = gptq_quantize(W, H, self.spec, self.blocksize, self.percdamp, self.act_order,
                                       self.static_groups, self._prior_qparams(full, W), stats=extra)
        res = LayerResult(q, g_idx=g_idx)
        Wq = layer_weight(res, torch.float32)
        check_finite(full, Wq)
        res.stats = {"layer": full, "method": self.name, "block": i, "shape": list(W.shape),
                     "out_rel_err": output_rel_error(W, Wq, H), "weight_rel_err": rel_error(W, Wq),
                     "gptq_loss": loss, "gptq_clamped": extra["clamped"], "gptq_clamped_loss": extra["clamped_loss"],
                     "seconds": time.perf_counter() - t0}
        result.layers[full] = res
        result.stats.append(res.stats)
        return Wq


    def _prior_qparams(self, full: str, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, zero) of the earlier step's result for this linear when qparams=prior."""
        if self._prior is None:
            return None
        prev = self._prior.layers.get(full)
        if prev is None or prev.g_idx is not None or prev.weight.spec != self.spec:
            why = "no result" if prev is None else "act-order groups" if prev.g_idx is not None else \
                f"spec {prev.weight.spec}"
            raise ConfigError(f"gptq qparams=prior: the earlier step left {why} for {full}; it needs contiguous "
                              f"groups with the same bits/group_size/sym ({self.spec})")
        return prev.weight.scale, prev.weight.zero


def hessians(block: nn.Module, io: BlockIO, names: list[str], stop: bool) -> dict[str, torch.Tensor]:
    """H = 2/N X^T X of each named module's input over all calibration batches."""
    acc: dict[str, tuple] = {n: (None, 0) for n in names}

    def fn(name, x):
        acc[name] = accumulate_hessian(*acc[name], x)

    record_inputs(block, io, names, fn, stop_after=stop)
    return {n: acc[n][0] for n in names}
