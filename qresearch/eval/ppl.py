"""Token-level perplexity, GPTQ protocol: non-overlapping chunks of `seqlen`, mean NLL over all predicted tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class NumericalError(RuntimeError):
    """NaN/inf where a number must be finite (loss, weights)."""


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
    """Summed NLL (float64) of each chunk's seqlen-1 next-token predictions: [n_chunks]."""
    out = []
    for i in tqdm(range(0, len(chunks), batch_size), desc=desc, leave=False, disable=None, mininterval=2):
        x = chunks[i:i + batch_size].to(device)  # [b, seqlen]
        logits = model(input_ids=x).logits.float()  # [b, seqlen, vocab]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        out.append(nll.view(x.shape[0], -1).double().sum(1).cpu())
    return torch.cat(out)


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
