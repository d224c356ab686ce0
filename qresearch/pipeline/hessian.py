"""Input second moments of a linear layer (pure functions): the GPTQ Hessian H = 2/N sum x x^T and output errors."""
from __future__ import annotations

import torch


def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running H = 2/N * X^T X over all tokens seen so far (float32). x: [..., in]. Returns (H [in, in], N)."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
    t = x2.shape[0]
    if H is None:
        H = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float32, device=x2.device)
    total = n + t
    H = H * (n / total)
    x2 = x2 * (2.0 / total) ** 0.5
    H.addmm_(x2.T, x2)
    return H, total


def output_sq_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Mean over tokens of ||x (W - Wq)^T||^2 from H = 2/N X^T X: tr(D H D^T) / 2. W, Wq: [out, in]."""
    D = (W.float() - Wq.float()).to(H.device)  # [out, in]
    return float(((D @ H) * D).sum() / 2)


def output_rel_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """||X W^T - X Wq^T||_F / ||X W^T||_F on the calibration inputs summarised by H."""
    ref = output_sq_error(W, torch.zeros_like(W), H)
    return (output_sq_error(W, Wq, H) / max(ref, 1e-30)) ** 0.5
