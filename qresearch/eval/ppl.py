"""Token-level perplexity, GPTQ protocol: non-overlapping chunks of `seqlen`, mean NLL over all predicted tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NumericalError


def chunk_ids(ids: torch.Tensor, seqlen: int, max_chunks: int | None = None) -> torch.Tensor:
    """[1, N] -> [n_chunks, seqlen]; the tail shorter than seqlen is dropped (as in GPTQ)."""
    n = ids.shape[1] // seqlen
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"eval text has {ids.shape[1]} tokens, fewer than one chunk of seqlen={seqlen}")
    return ids[0, : n * seqlen].reshape(n, seqlen)  # [n_chunks, seqlen]


@torch.no_grad()
def chunk_nll(model, chunks: torch.Tensor, device, batch_size: int = 1, desc: str = "ppl") -> torch.Tensor:
    """Summed NLL (float64) of each chunk's seqlen-1 next-token predictions: [n_chunks].

    `batch_size` chunks go through the model at once; the loss is then taken one chunk at a time (a contiguous
    [seqlen - 1, vocab] view, in float32), so a batch costs one logits tensor and no flattened copy of it."""
    out = []
    for i in tqdm(range(0, len(chunks), batch_size), desc=desc, leave=False, disable=None, mininterval=2):
        x = chunks[i:i + batch_size].to(device)  # [b, seqlen]
        logits = model(input_ids=x).logits  # [b, seqlen, vocab]
        for j in range(x.shape[0]):
            nll = F.cross_entropy(logits[j, :-1].float(), x[j, 1:], reduction="none")  # [seqlen - 1]
            out.append(nll.double().sum().cpu())
    return torch.stack(out)


def perplexity(model, ids: torch.Tensor, seqlen: int, device, max_chunks: int | None = None,
               batch_size: int = 1, desc: str = "ppl") -> dict:
    """Perplexity and its protocol facts. Raises NumericalError on a non-finite loss."""
    chunks = chunk_ids(ids, seqlen, max_chunks)
    nll = chunk_nll(model, chunks, device, batch_size, desc)
    n_pred = chunks.shape[0] * (seqlen - 1)
    mean_nll = float(nll.sum() / n_pred)
    if not math.isfinite(mean_nll):
        raise NumericalError(f"perplexity ({desc}): mean NLL is {mean_nll}; the quantized model produced NaN/inf")
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "n_chunks": int(chunks.shape[0]), "seqlen": seqlen,
            "n_tokens": int(chunks.numel()), "n_predicted": n_pred, "protocol": "gptq_chunks"}


def sliding_windows(n_tokens: int, seqlen: int, stride: int, max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) windows: each token is predicted at most once; after the first window, each scores
    its last `stride` tokens with seqlen - stride tokens of extra context (stride = seqlen: GPTQ chunks)."""
    if not 1 <= stride <= seqlen:
        raise ValueError(f"eval.stride={stride} is invalid; allowed: 1..seqlen ({seqlen})")
    out, scored_until = [], 1  # token 0 has no prediction
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        out.append((begin, end, max(scored_until, begin + 1)))  # a window's first token has no context
        scored_until = end
        if end == n_tokens or (max_windows is not None and len(out) == max_windows):
            break
    return out


@torch.no_grad()
def sliding_perplexity(model, ids: torch.Tensor, seqlen: int, stride: int, device, max_windows: int | None = None,
                       desc: str = "ppl") -> dict:
    """Sliding-window perplexity (stride < seqlen gives each scored token more context than GPTQ chunks)."""
    windows = sliding_windows(ids.shape[1], seqlen, stride, max_windows)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for begin, end, score_from in tqdm(windows, desc=desc, leave=False, disable=None, mininterval=2):
        x = ids[:, begin:end].to(device)  # [1, L]
        logits = model(input_ids=x).logits.float()  # [1, L, vocab]
        first = score_from - begin  # position (in the window) of the first scored target
        nll = F.cross_entropy(logits[0, first - 1:-1], x[0, first:], reduction="sum")
        total += nll.double().cpu()
        count += end - score_from
    mean_nll = float(total / count)
    if not math.isfinite(mean_nll):
        raise NumericalError(f"perplexity ({desc}): mean NLL is {mean_nll}; the quantized model produced NaN/inf")
    return {"ppl": math.exp(mean_nll), "nll": mean_nll, "n_windows": len(windows), "seqlen": seqlen,
            "stride": stride, "n_predicted": count, "n_tokens": windows[-1][1], "protocol": "sliding_window"}
