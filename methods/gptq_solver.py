"""The GPTQ solve (Frantar et al. 2022) for one weight given its input Hessian: column-by-column rounding with
inverse-Hessian error feedback and lazy batch updates, act-order, static groups and fixed qparams, every numeric
format: group qparams are fitted by the format (methods/gptq_qparams.py), codes go through its encode / decode.

Arithmetic is that of the plain column loop (and of the reference implementation where both define the same
thing), operation for operation, so codes and qparams are bit-identical to it on the same inputs and threads; only
the work around it is arranged for speed:
- inside a block, columns are rows of a transposed copy (contiguous vectors) and the feedback goes only to the
  columns still to come; codes, dequantized values, losses and clamp statistics are computed once per block;
- group qparams are fitted once per group (fixed ones once per layer), clamp statistics once per group segment;
- for the int format with float scales on CPU the column loop runs on numpy views of the same memory (a numpy
  ufunc costs a fraction of a torch op's dispatch; both round IEEE-exactly: x / s, round half to even, + z, clamp,
  (q - z) s, (w - dq) / d, w - e h), in C (kernels/cpu_gptq.py); on CUDA it is one Triton kernel per group
  segment (kernels/triton_gptq.py, the same float32 operations); other formats (two-level scales, palettes,
  grids) go through the format's encode / decode with torch;
- the lazy batch update is one in-place addmm on CPU where a probe shows it gives the same bits as the product
  then the subtraction (fused_update_exact), else it writes its product into a reused buffer;
- the exact inverse factor runs the reference's LAPACK routines in place on one buffer on CPU (kernels/cpu_lapack.py:
  no copies or masks between them; checked once per thread count to give torch's chain's bits).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

from qresearch.errors import NumericalError
from qresearch.kernels import cpu_gptq, cpu_lapack
from qresearch.quant import QTensor, QuantSpec
from qresearch.quant.format_base import LayerParams
from qresearch.quant.formats import IntFormat
from qresearch.quant.primitives import decode, encode, saturated
from qresearch.quant.scales import ScaleCoding

from .gptq_qparams import GroupQP, fit_cols, fixed_groups, layer_params, stack_qparams


INVERSES = ("exact", "fast")
USE_C_LOOP = True  # the int fast path's column loop in C (kernels/cpu_gptq.py); False: numpy (same output)
INT_LOOP = True  # the int format's own column loop (C / numpy on CPU, the Triton kernel on CUDA); False: the
# format path's torch ops on every device (same output; the GPU suite times both)
FUSED_UPDATE = True  # the lazy batch update as one addmm where a probe shows it exact (fused_update_exact)
TRITON_MAX_BLOCK = 256  # the Triton loop holds a block of columns in registers: larger blocksizes take torch ops


def _lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """L^-1 of a lower-triangular L [n, n]: LAPACK trtri on CPU (n^3 / 3 flops), a triangular solve elsewhere."""
    if L.device.type == "cpu":
        from scipy.linalg import lapack

        fn = lapack.strtri if L.dtype == torch.float32 else lapack.dtrtri
        inv, info = fn(L.numpy(), lower=1)
        if info != 0:
            raise torch.linalg.LinAlgError(f"GPTQ: trtri failed (info={info})")
        return torch.from_numpy(inv).tril()
    return torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False)


def transposed_copy(H: torch.Tensor) -> torch.Tensor:
    """H^T as a new contiguous tensor, always a copy (H.T.contiguous() is H's own memory when H is column-major)."""
    return H.T.clone(memory_format=torch.contiguous_format)


def inverse_factor_exact(H: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Upper U with U^T U = H^-1 as the reference computes it (Cholesky, Cholesky inverse, upper Cholesky:
    4 n^3 / 3 flops): bit-identical to it on the same LAPACK and threads. On CPU in float32 the same LAPACK
    routines run in place without torch's copies (kernels/cpu_lapack.py; checked to give torch's bits).
    transposed=True: `H` holds H^T (H's column-major form) and is the caller's scratch (it may become U)."""
    if H.device.type == "cpu" and H.dtype == torch.float32 and cpu_lapack.available():
        return cpu_lapack.factor_inplace(H if transposed else transposed_copy(H))
    L, info = torch.linalg.cholesky_ex(H.T if transposed else H)
    if info != 0:
        raise torch.linalg.LinAlgError("not positive definite")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def inverse_factor_fast(H: torch.Tensor) -> torch.Tensor:
    """The same U with half the flops: with J the reversal, J H J = R R^T (lower R) gives H^-1 = (J R^-1 J)^T
    (J R^-1 J), and J R^-1 J is upper triangular. Same matrix in exact arithmetic, not the same last bits (measured
    closer to the float64 factor than the exact path's, experiments/bench_gptq_vs_reference.py)."""
    R, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info != 0:
        raise torch.linalg.LinAlgError("not positive definite")
    return _lower_inverse(R).flip(0, 1)  # [n, n] upper (flip copies: contiguous)


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float, inverse: str = "exact",
                             copy: bool = True, transposed: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of (H + percdamp * mean(diag H) * I)^-1, the form GPTQ's updates use. `inverse`:
    exact (the reference's arithmetic) | fast (inverse_factor_fast). copy=False: H is the caller's scratch (damped
    in place; 485 MB per copy at 11008 inputs). transposed=True: H holds H^T (the exact path reads it in place)."""
    if inverse not in INVERSES:
        raise ValueError(f"GPTQ inverse={inverse!r} is unknown; allowed: {', '.join(INVERSES)}")
    if copy:
        H, transposed = transposed_copy(H), not transposed  # the copy the exact path needs anyway
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.diag(H).mean()
    try:
        if inverse == "exact":
            return inverse_factor_exact(H, transposed)
        return inverse_factor_fast(H.T if transposed else H)
    except torch.linalg.LinAlgError as e:
        raise torch.linalg.LinAlgError(f"GPTQ: dampened Hessian is not positive definite (percdamp={percdamp}); "
                                       f"raise percdamp") from e


@dataclass
class PreparedHessian:
    """What the solve needs from an input Hessian, shared by every weight that reads that input (q/k/v, gate/up):
    the dead input columns, H's diagonal, the act-order permutation and the factor of the dampened inverse, in
    processing order."""

    dead: torch.Tensor  # [in] bool: channels that never saw a non-zero input
    diag: torch.Tensor  # [in] diag(H) with dead channels at 1, original order (fitted formats' value weights)
    perm: torch.Tensor | None  # [in] processing order (act_order), None = natural order
    Hinv: torch.Tensor  # [in, in] upper Cholesky factor of (H + damp I)^-1, permuted
    percdamp: float
    act_order: bool
    inverse: str = "exact"


def prepare_hessian(H: torch.Tensor, percdamp: float = 0.01, act_order: bool = False,
                    inverse: str = "exact") -> PreparedHessian:
    """Dead channels get H_jj = 1 (their weights are zeroed by the solve), then the order and the inverse factor.
    A non-finite diagonal (NaN / inf among the calibration inputs: for H = X^T X every non-finite input value reaches
    its channel's H_jj, and a finite diagonal bounds every other entry) raises NumericalError naming the channels."""
    bad = ~torch.isfinite(torch.diagonal(H))
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise NumericalError(f"GPTQ: the input Hessian is NaN/inf on {len(idx)} channel(s) (first: {idx[:5]}); the "
                             f"calibration activations reaching this layer are not finite")
    H = transposed_copy(H.detach().float())  # [in, in] H^T: H's column-major form, which the exact factor reads
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    diag = torch.diag(H).clone()
    perm = torch.argsort(diag, descending=True) if act_order else None
    if perm is not None:
        H = take_cols(H, perm, rows=perm)  # P H^T P^T = (P H P^T)^T: still H's column-major form
    Hinv = inverse_hessian_cholesky(H, percdamp, inverse, copy=False, transposed=True)
    return PreparedHessian(dead, diag, perm, Hinv, percdamp, act_order, inverse)


@dataclass
class Solve:
    """The inputs of one solve in processing order: W [out, in] (columns updated as the loop goes), the inverse
    factor, the spec, group length g, value weights wdiag [in] (fitted formats) and what the tensor shares."""

    W: torch.Tensor
    Hinv: torch.Tensor
    spec: QuantSpec
    g: int
    wdiag: torch.Tensor | None
    layer: LayerParams
    dynamic: bool  # group qparams fitted as the loop reaches each group (else all fixed beforehand)


@dataclass
class Block:
    """One block of columns [i1, i2) in processing order, transposed: row i of WT is column i1 + i of W."""

    i1: int
    i2: int
    WT: torch.Tensor  # [b, out] weights, updated in place by the feedback of earlier columns
    H1: torch.Tensor  # [b, b] the block's part of the inverse-Hessian factor
    d: list  # [b] its diagonal as 0-dim tensors (true division on every device; a Python float is not on CUDA)
    QT: torch.Tensor  # [b, out] codes (float32 for the int fast path, uint8 otherwise)
    ET: torch.Tensor  # [b, out] scaled errors (w - dq) / d
    tmp: torch.Tensor  # [b, out] scratch for one rank-1 update


def take_cols(t: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """t[rows][:, idx] (rows None: t[:, idx]) as a new tensor. On CPU a C gather that reads each source row once
    into a buffer from torch's allocator (kernels/cpu_gptq.take2d: 0.16 s for 11008x11008 float32 on one thread
    against 0.22 + 0.19 s for rows then numpy's take, whose output is also only 16-byte aligned for the GEMMs and
    LAPACK that read it next), numpy's take without the C library; index_select elsewhere. Same values either way."""
    if t.device.type == "cpu":
        out = cpu_gptq.take2d(t, rows, idx)
        if out is not None:
            return out
        t = t if rows is None else t[rows]
        return torch.from_numpy(np.take(t.numpy(), idx.numpy(), axis=1))
    return (t if rows is None else t.index_select(0, rows)).index_select(1, idx)


def int_fast_path(spec: QuantSpec, device: torch.device, blocksize: int = 128) -> bool:
    """Whether the int format's own column loop serves this solve: the int format with plain float scales, on CPU
    (numpy / C) or on CUDA (the Triton kernel, blocks up to TRITON_MAX_BLOCK columns). It is exactly the format's
    arithmetic, so the choice changes speed only."""
    fmt = spec.format
    if not INT_LOOP or type(fmt) is not IntFormat or fmt.scale_coding(spec) != ScaleCoding():
        return False
    if device.type == "cuda":
        return blocksize <= TRITON_MAX_BLOCK and importlib.util.find_spec("triton") is not None
    return device.type == "cpu"


def _columns_int(blk: Block, a: int, e: int, s: torch.Tensor, z: torch.Tensor, maxq: float) -> None:
    """Quantize columns a..e-1 of the block with qparams s, z [out | 1] (int format): on CUDA the Triton kernel,
    on CPU the C loop (kernels/cpu_gptq.py), else the numpy loop; all do the same float32 operations in order."""
    if blk.WT.is_cuda:
        from qresearch.kernels import triton_gptq

        triton_gptq.columns(blk.WT, blk.QT, blk.ET, blk.H1, s, z, a, e, maxq)
    elif not USE_C_LOOP or not cpu_gptq.columns(blk.WT, blk.QT, blk.ET, blk.H1, s, z, a, e, maxq):
        _columns_int_numpy(blk, a, e, s, z, maxq)


def _columns_int_numpy(blk: Block, a: int, e: int, s: torch.Tensor, z: torch.Tensor, maxq: float) -> None:
    """Quantize columns a..e-1 of the block with qparams s, z [out | 1] (int format, CPU): numpy on the same
    memory."""
    WT, QT, ET, H1, tmp = (t.numpy() for t in (blk.WT, blk.QT, blk.ET, blk.H1, blk.tmp))
    s, z, b, d = s.contiguous().numpy(), z.contiguous().numpy(), WT.shape[0], np.diagonal(H1)
    for i in range(a, e):
        w, q, err = WT[i], QT[i], ET[i]
        np.divide(w, s, out=q)
        np.rint(q, out=q)  # round half to even, as torch.round
        np.add(q, z, out=q)
        np.maximum(q, 0, out=q)
        np.minimum(q, maxq, out=q)
        np.subtract(q, z, out=err)
        np.multiply(err, s, out=err)  # dq
        np.subtract(w, err, out=err)
        np.divide(err, d[i], out=err)
        if i + 1 < b:
            n = b - i - 1
            np.multiply(H1[i, i + 1:, None], err, out=tmp[:n])  # [n, out]
            np.subtract(WT[i + 1:], tmp[:n], out=WT[i + 1:])


def _columns_format(blk: Block, a: int, e: int, qp: GroupQP, spec: QuantSpec) -> None:
    """Quantize columns a..e-1 of the block with qparams qp through the spec's format (any format/device)."""
    s, z, lut = qp
    b = blk.WT.shape[0]
    for i in range(a, e):
        w = blk.WT[i]
        q = encode(w, s, z, spec, lut)  # [out] uint8
        blk.QT[i] = q
        err = torch.div(w - decode(q, s, z, spec, lut), blk.d[i], out=blk.ET[i])
        if i + 1 < b:
            n = b - i - 1
            torch.mul(blk.H1[i, i + 1:, None], err, out=blk.tmp[:n])  # [n, out]
            blk.WT[i + 1:].sub_(blk.tmp[:n])


def _group_fit(sv: Solve, blk: Block, i: int) -> GroupQP:
    """Qparams of the dynamic group starting at column c = blk.i1 + i, fitted by the format to its current weights:
    the block's rows i..i+g-1, plus the columns past the block with the pending in-block updates applied."""
    c, i1, i2, g = blk.i1 + i, blk.i1, blk.i2, sv.g
    parts = [blk.WT[i:i + g].T]  # [out, <= g]
    if c + g > i2 and i2 < sv.W.shape[1]:
        err = blk.ET[:i2 - i1].T.contiguous()  # [out, b], the layout the plain loop multiplies
        parts.append(sv.W[:, i2:c + g] - err[:, :i] @ sv.Hinv[i1:c, i2:c + g])  # [out, cols past this block]
    cols = torch.cat(parts, dim=1)  # [out, min(g, in - c)]
    return fit_cols(cols, sv.spec, None if sv.wdiag is None else sv.wdiag[c:c + g], sv.layer)


@dataclass
class Tally:
    """Per-row loss sum [out], and clamp counts when asked for (`clamp`), accumulated block by block."""

    losses: torch.Tensor
    clamp: bool
    clamped: float = 0.0
    clamped_loss: float = 0.0


def _tally_clamped(blk: Block, a: int, e: int, qp: GroupQP, spec: QuantSpec, tally: Tally) -> None:
    """Which weights of columns a..e-1 (one group, as they were when rounded) lay beyond the grid, and their loss."""
    if not tally.clamp:
        return
    s, z, lut = qp
    off = saturated(blk.WT[a:e].T, s[:, None], z[:, None], spec, lut)  # [out, n]; lut [out | 1, K]: one per row
    tally.clamped += float(off.sum())
    tally.clamped_loss += float((blk.ET[a:e].T ** 2 / 2 * off).sum())


def _finish_block(blk: Block, codes: torch.Tensor, tally: Tally) -> None:
    """Codes of the block into codes[:, i1:i2]; per-column losses (w - dq)^2 / d^2 / 2 = err^2 / 2 from the scaled
    errors of the loop."""
    b = blk.i2 - blk.i1
    codes[:, blk.i1:blk.i2] = blk.QT[:b].T.contiguous()  # float codes of the int fast path: exact small integers
    tally.losses += (blk.ET[:b] ** 2 / 2).sum(0)


def _column_groups(cols: int, g: int, perm: torch.Tensor | None, n_fixed: int | None) -> list[int]:
    """Group of each column in processing order: fixed groups by original column (one for a whole-tensor grid),
    dynamic ones by position."""
    if n_fixed is None:
        return [c // g for c in range(cols)]
    orig = perm.tolist() if perm is not None else range(cols)
    return [min(j // g, n_fixed - 1) for j in orig]


def gptq_quantize(W: torch.Tensor, H: "torch.Tensor | PreparedHessian", spec: QuantSpec, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False,
                  qparams: "tuple[torch.Tensor, torch.Tensor] | QTensor | None" = None, stats: dict | None = None,
                  weighted_fit: bool = True, inverse: str = "exact") -> tuple[QTensor, float]:
    """Quantize W [out, in] given the input Hessian H [in, in] (or its `prepare_hessian`, computed once for all
    weights that share the input). Returns (codes + qparams, loss).

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
    `inverse`: how the inverse-Hessian factor is computed when H is a plain tensor (inverse_hessian_cholesky).
    `stats`, when given, receives "clamped": the fraction of weights that error feedback pushed off their group's
    grid (beyond its range, so their rounding error exceeds rounding), and "clamped_loss": their
    share of `loss`.
    """
    W = W.detach().float().clone()  # [out, in]
    out, cols = W.shape
    g, dev = spec.group_for(cols), W.device
    prep = H if isinstance(H, PreparedHessian) else prepare_hessian(H.to(dev), percdamp, act_order, inverse)
    if (prep.percdamp, prep.act_order) != (percdamp, act_order) or prep.Hinv.shape != (cols, cols):
        raise ValueError(f"prepared Hessian (percdamp={prep.percdamp}, act_order={prep.act_order}, "
                         f"{tuple(prep.Hinv.shape)}) does not fit this solve (percdamp={percdamp}, "
                         f"act_order={act_order}, W {tuple(W.shape)})")
    W[:, prep.dead] = 0
    wdiag = prep.diag.to(dev).clone() if weighted_fit and spec.format.fitted else None  # [in] value importance
    layer = layer_params(W, spec, wdiag, qparams)
    fixed = fixed_groups(W, spec, wdiag, layer, qparams, static_groups)
    perm = prep.perm
    if perm is not None:
        W = take_cols(W, perm)
        wdiag = None if wdiag is None else wdiag[perm]
    groups = _column_groups(cols, g, perm, None if fixed is None else len(fixed))
    codes = torch.empty(out, cols, dtype=torch.uint8, device=dev)
    tally = Tally(torch.zeros(out, device=dev), clamp=stats is not None)
    qps = list(fixed) if fixed is not None else []  # dynamic groups are appended as the loop reaches them
    sv = Solve(W, prep.Hinv, spec, g, wdiag, layer, fixed is None)
    _solve(sv, blocksize, groups, qps, codes, tally, int_fast_path(spec, dev, blocksize))
    scale, zero, luts = stack_qparams(qps, spec, out)
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = take_cols(codes, inv)  # back to the original column order
        if fixed is None:
            g_idx = (torch.arange(cols, device=dev) // g)[inv].to(torch.int32)  # [in]
    loss = float(tally.losses.sum())
    if stats is not None:
        stats.update(clamped=tally.clamped / W.numel(), clamped_loss=tally.clamped_loss / max(loss, 1e-30))
    return QTensor(codes, scale, zero, spec, g_idx, lut=luts, scale2=layer.scale2), loss


def fused_update_exact(k: int, device: torch.device) -> bool:
    """Whether W.addmm_(E, H, alpha=-1) equals W - E @ H bit for bit for an inner dimension of `k` here (CPU,
    this BLAS and thread count): the lazy batch update then runs as one GEMM instead of a GEMM, a stored product
    and a subtraction. MKL on AMD EPYC gives equal bits up to k = 192 (its product finished in registers, then
    C - product rounded once) and differs from k = 200 (partial sums added to C), at every shape tried (out 300 to
    4096, 1536 to 4096 columns); probed once per (k, threads) on random data, since the bound is the BLAS's own.
    Off with FUSED_UPDATE = False, and on CUDA."""
    return FUSED_UPDATE and device.type == "cpu" and _fused_probe(k, torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _fused_probe(k: int, threads: int) -> bool:
    g = torch.Generator().manual_seed(k)
    W, E, H = (torch.randn(*shape, generator=g) for shape in ((96, 200), (96, k), (k, 200)))
    return bool(torch.equal(W - torch.matmul(E, H), W.clone().addmm_(E, H, alpha=-1)))


def _solve(sv: Solve, blocksize: int, groups: list[int], qps: list[GroupQP], codes: torch.Tensor, tally: Tally,
           fast: bool) -> None:
    """The block loop: round each block's columns (segments of one group), then the lazy batch update of the rest."""
    W, Hinv, spec = sv.W, sv.Hinv, sv.spec
    out, cols = W.shape
    bmax, dev = min(blocksize, cols), W.device
    WT, ET, tmp = (torch.empty(bmax, out, device=dev) for _ in range(3))
    QT = torch.empty(bmax, out, dtype=torch.float32 if fast else torch.uint8, device=dev)
    gbuf = torch.empty(out * max(cols - bmax, 0), device=dev)  # the lazy update's product, reused
    maxq = float(2**spec.bits - 1)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        b = i2 - i1
        WT[:b].copy_(W[:, i1:i2].contiguous().T)  # slab copy, then a contiguous transpose: 6x the strided one
        blk = Block(i1, i2, WT[:b], Hinv[i1:i2, i1:i2], [], QT[:b], ET[:b], tmp[:b])
        blk.d = list(torch.diagonal(blk.H1).unbind()) if not fast else []
        i = 0
        while i < b:
            k = groups[i1 + i]
            if sv.dynamic and (i1 + i) % sv.g == 0:
                qps.append(_group_fit(sv, blk, i))
            e = i + 1
            while e < b and groups[i1 + e] == k:
                e += 1
            if fast:
                _columns_int(blk, i, e, qps[k][0], qps[k][1], maxq)
            else:
                _columns_format(blk, i, e, qps[k], spec)
            _tally_clamped(blk, i, e, qps[k], spec, tally)
            i = e
        _finish_block(blk, codes, tally)
        if i2 < cols:
            n = cols - i2
            if fused_update_exact(b, dev):  # W - E^T H in one GEMM: the same bits, one pass over W less
                W[:, i2:].addmm_(ET[:b].T.contiguous(), Hinv[i1:i2, i2:], alpha=-1)
            else:
                prod = torch.matmul(ET[:b].T.contiguous(), Hinv[i1:i2, i2:], out=gbuf[:out * n].view(out, n))
                W[:, i2:] -= prod
