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
from .text import C4_CALIB_DOCS, CALIB_SETS, Source, hub_reachable, read_documents

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


TOKEN_CACHE_VERSION = "2"


def eval_tokens(dataset: str, split: str, root: str, tok, source: str = "auto",
                max_tokens: int | None = None) -> tuple[torch.Tensor, Source]:
    """Token ids [1, N] of a built-in eval split under the GPTQ protocol (cached; see set_tokens)."""
    from .sets import EvalSet

    return set_tokens(EvalSet(dataset, split, "builtin", root=root, source=source), tok, max_tokens)


def eval_streams(sets: list, tok, seqlen: int | None = None) -> dict[str, tuple[torch.Tensor, Source]]:
    """{name: (ids [1, N], Source)} for the run's EvalSets; a text shorter than one chunk of `seqlen` is a
    one-line ConfigError (before the FP baseline)."""
    out = {s.name: set_tokens(s, tok) for s in sets}
    short = {n: ids.shape[1] for n, (ids, _) in out.items() if seqlen is not None and ids.shape[1] < seqlen}
    if short:
        n, k = next(iter(short.items()))
        raise ConfigError(f"eval dataset {n!r} has {k} tokens, fewer than one chunk of eval.seqlen={seqlen}; "
                          f"give a longer text or lower eval.seqlen")
    return out


def set_tokens(s, tok, max_tokens: int | None = None) -> tuple[torch.Tensor, Source]:
    """Token ids [1, N] of an EvalSet, tokenized once and cached by (text hash, tokenizer); the cache entry records
    what it was computed from and is checked on every read (a damaged or mismatched entry is rebuilt, with a
    warning naming the file)."""
    from .sets import set_text

    text, src = set_text(s)
    tok_fp = tokenizer_fingerprint(tok)
    expect = {"version": TOKEN_CACHE_VERSION, "text_sha256": src.sha256, "tokenizer": tok_fp}
    path = cache_dir() / "tokens" / f"{s.name}-{s.split}-{src.sha256[:16]}-{tok_fp}.safetensors"
    ids = _read_token_cache(path, expect) if path.is_file() else None
    if ids is None:
        log.info("tokenizing %s/%s (%d chars)", s.name, s.split, len(text))
        ids = _tokenize(tok, text)
        _write_token_cache(path, ids, expect)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    return ids, src


def _write_token_cache(path: Path, ids: torch.Tensor, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"ids": ids.contiguous()}, str(tmp),
              metadata={**meta, "n_tokens": str(ids.shape[1]), "ids_sha256": hash_ids(ids)})
    os.replace(tmp, path)


def _read_token_cache(path: Path, expect: dict) -> torch.Tensor | None:
    """The cached ids if the entry is whole and was computed from `expect`; None (after a warning) otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, ids = f.metadata() or {}, f.get_tensor("ids")
    except Exception as e:  # SafetensorError (truncated header or data), missing tensor, OSError
        log.warning("token cache %s is damaged (%s); rebuilding it", path, str(e).splitlines()[0][:120])
        return None
    bad = [k for k, v in expect.items() if meta.get(k) != v]
    if ids.dtype != torch.long or ids.dim() != 2 or ids.shape[0] != 1:
        bad.append(f"tensor {ids.dtype} {tuple(ids.shape)}")
    elif meta.get("n_tokens") != str(ids.shape[1]) or meta.get("ids_sha256") != hash_ids(ids):
        bad.append(f"{ids.shape[1]} tokens do not match the recorded count/hash")
    if bad:
        log.warning("token cache %s does not match what it claims to be (%s); rebuilding it", path, ", ".join(bad))
        return None
    return ids


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
        if source == "local" or not hub_reachable():
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
