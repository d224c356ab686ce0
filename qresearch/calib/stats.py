"""Input statistics of linear layers (pure accumulators) and the output errors they give: the GPTQ Hessian
H = 2/N sum x x^T, per-channel mean / max of |x| (AWQ, SmoothQuant), collected with hooks over a block."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blockio import BlockIO
from .hooks import record_inputs

STATS = ("hessian", "absmean", "absmax")


GRAM_BLOCK_ROWS = (2048, 128, 256)  # (in features up to which, block rows, block rows beyond): measured fastest
# on a 2-core EPYC (MKL) for 4096 tokens a batch, 576 / 1536 / 4096 inputs, 1 and 2 threads


def add_gram_(H: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """H [n, n] += x^T x (x [tokens, n]) over the lower block triangle only, then the blocks above the diagonal
    copied from their transposes: (b + 1) / 2b of one GEMM's flops for b block rows (1.5-1.8x faster on CPU).
    Each entry is still one float32 dot over the tokens (bit for bit the full product's with MKL at 576 / 1536 /
    4096 inputs; the blocks are of even height, so no sliver of a few rows takes another GEMM kernel)."""
    n = H.shape[0]
    if H.device.type != "cpu":  # measured on CPU only: one GEMM elsewhere (a GPU's launches would not pay)
        return H.addmm_(x.T, x)
    limit, small, large = GRAM_BLOCK_ROWS
    rows = small if n <= limit else large
    step = -(-n // -(-n // rows))  # ceil(n / number of blocks): block heights differ by at most one
    for a in range(0, n, step):
        e = min(a + step, n)
        H[a:e, :e].addmm_(x[:, a:e].T, x[:, :e])  # block row a:e, left of and on the diagonal
    for a in range(step, n, step):
        H[:a, a:a + step].copy_(H[a:a + step, :a].T)  # above the diagonal = transpose of below
    return H


def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/N * X^T X over all tokens seen so far (float32; H updated in place). x: [..., in].
    Returns (H [in, in], N)."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
    t = x2.shape[0]
    if H is None:
        H = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
    total = n + t
    H.mul_(n / total)
    add_gram_(H, x2 * (2.0 / total) ** 0.5)
    return H, total


def output_sq_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Mean over tokens of ||x (W - Wq)^T||^2 from H = 2/N X^T X: tr(D H D^T) / 2. W, Wq: [out, in]."""
    D = (W.float() - Wq.float()).to(H.device)  # [out, in]
    return float(((D @ H) * D).sum() / 2)


def output_rel_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """||X W^T - X Wq^T||_F / ||X W^T||_F on the calibration inputs summarised by H."""
    ref = output_sq_error(W, torch.zeros_like(W), H)
    return (output_sq_error(W, Wq, H) / max(ref, 1e-30)) ** 0.5


@dataclass
class InputStats:
    """Running statistics of one linear's input x [..., in] over calibration tokens."""

    n: int = 0  # tokens seen
    hessian: torch.Tensor | None = None  # [in, in] float32, 2/N X^T X
    abs_sum: torch.Tensor | None = None  # [in] float64, sum |x|
    absmax: torch.Tensor | None = None  # [in] float32, max |x|

    def update(self, x: torch.Tensor, want: tuple[str, ...]) -> None:
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        if "absmean" in want:
            a = x2.abs().double().sum(0)  # [in]
            self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        if "absmax" in want:
            m = x2.abs().float().amax(0)  # [in]
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        if "hessian" in want:
            self.hessian, _ = accumulate_hessian(self.hessian, self.n, x2)
        self.n += x2.shape[0]

    @property
    def absmean(self) -> torch.Tensor:
        """[in] float32 mean |x| per input channel."""
        return (self.abs_sum / self.n).float()


def input_stats(block: nn.Module, io: BlockIO, names: list[str], want: tuple[str, ...] = ("hessian",),
                stop: bool = False) -> dict[str, InputStats]:
    """Statistics `want` (of STATS) of each named submodule's input over all calibration batches of io.
    `stop`: end each forward once every named module has been seen."""
    bad = set(want) - set(STATS)
    assert not bad, f"unknown input statistics {bad}; allowed: {STATS}"
    acc = {n: InputStats() for n in names}
    record_inputs(block, io, names, lambda name, x: acc[name].update(x, want), stop_after=stop)
    return acc
