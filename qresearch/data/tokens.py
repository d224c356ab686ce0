"""Tokenized eval streams (cached on disk) and seeded calibration windows."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from pathlib import Path

import torch

from ..errors import ConfigError
from .text import C4_CALIB_DOCS, CALIB_SETS, Source, eval_text, read_documents

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("QRESEARCH_CACHE", Path.home() / ".cache" / "qresearch"))


def tokenizer_fingerprint(tok) -> str:
    """Stable hash of a tokenizer's vocabulary and BOS/EOS behaviour."""
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    extra = f"{tok.bos_token_id}|{tok.eos_token_id}|{tok('a').input_ids}"
    return hashlib.sha256((vocab + extra).encode()).hexdigest()[:16]


def hash_ids(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _tokenize(tok, text: str) -> torch.Tensor:
    """[1, n_tokens] ids of one string, tokenized once (BOS as the tokenizer adds it)."""
    return torch.tensor([tok(text).input_ids], dtype=torch.long)


def eval_tokens(dataset: str, split: str, root: str, tok, source: str = "auto",
                max_tokens: int | None = None) -> tuple[torch.Tensor, Source]:
    """Token ids [1, N] of an eval split under the GPTQ protocol, cached by (text hash, tokenizer)."""
    text, src = eval_text(dataset, split, root, source)
    key = f"{dataset}-{split}-{src.sha256[:16]}-{tokenizer_fingerprint(tok)}"
    path = cache_dir() / "tokens" / f"{key}.pt"
    if path.is_file():
        ids = torch.load(path, weights_only=True)
    else:
        log.info("tokenizing %s/%s (%d chars)", dataset, split, len(text))
        ids = _tokenize(tok, text)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(ids, tmp)
        os.replace(tmp, path)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    return ids, src


def calibration_ids(dataset: str, tok, n_samples: int, seqlen: int, seed: int, root: str,
                    source: str = "auto") -> tuple[torch.Tensor, dict]:
    """[n_samples, seqlen] random windows, GPTQ style: pick a document longer than seqlen, then a random offset.

    Returns the ids and a provenance dict (dataset, documents used, eligible count, hash of the ids).
    """
    if dataset not in CALIB_SETS:
        raise ConfigError(f"calibration dataset={dataset!r} is unknown; allowed: {', '.join(CALIB_SETS)}")
    rng = random.Random(seed)
    if dataset == "random":
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, len(tok), (n_samples, seqlen), generator=g)
        return ids, {"dataset": "random", "n_samples": n_samples, "seqlen": seqlen, "seed": seed, "hash": hash_ids(ids)}
    if dataset == "c4":
        docs, origin = read_documents("c4", "validation", root, source)
        lo, hi = C4_CALIB_DOCS
        docs, doc_range = docs[lo:hi], [lo, hi]
    else:  # wikitext2: only its train split is fair to calibrate on
        if source == "local" or (source == "auto" and not _hub_allowed()):
            raise ConfigError("calibration on wikitext2 needs its train split, which is not available offline; "
                              "use data=c4 (calibration) or data=random")
        docs, origin = read_documents("wikitext2", "train", root, "hub")
        docs, doc_range = ["\n\n".join(docs)], None
    encoded = [t for t in tok(docs).input_ids if len(t) > seqlen]
    if not encoded:
        raise ConfigError(f"no {dataset} calibration document has more than data.seqlen={seqlen} tokens; "
                          f"lower data.seqlen")
    windows = []
    for _ in range(n_samples):
        t = encoded[rng.randrange(len(encoded))]
        i = rng.randrange(len(t) - seqlen)
        windows.append(t[i:i + seqlen])
    ids = torch.tensor(windows, dtype=torch.long)  # [n_samples, seqlen]
    prov = {"dataset": dataset, "origin": origin, "doc_range": doc_range, "eligible_docs": len(encoded),
            "n_samples": n_samples, "seqlen": seqlen, "seed": seed, "hash": hash_ids(ids)}
    return ids, prov


def _hub_allowed() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") != "1" and os.environ.get("HF_HUB_OFFLINE") != "1"
