"""FP-baseline perplexities, cached per (model weights, protocol, token stream) and validated on every read.

An entry (`<cache>/baselines/<key hash>.json`) holds the key it was computed from (model fingerprint, dtype,
device type, protocol, text sha256, tokenizer, token-ids hash and count), the result, and a checksum of the
result. On read the key, the checksum, the result's own consistency (ppl = exp(nll), finite) and the token
count the protocol implies are checked; a damaged or mismatched entry is recomputed with a warning naming the
file. A sweep still pays for the FP evaluation once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch

from ..data.tokens import cache_dir, hash_ids, tokenizer_fingerprint
from ..tracking.store import atomic_write_json
from .ppl import sliding_windows

log = logging.getLogger(__name__)
VERSION = 2
_CHUNK = 1 << 26  # bytes hashed per step (bounds the host copy of a large GPU tensor)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model config (rope, norms, ...; not its path) and every state-dict tensor's name, dtype,
    shape and bytes: what a baseline is computed from."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)  # raw bytes [numel * itemsize]
        for i in range(0, flat.numel(), _CHUNK):
            h.update(flat[i:i + _CHUNK].cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def expected_tokens(n_ids: int, protocol: dict) -> int:
    """Tokens a perplexity result over a stream of n_ids ids must report under `protocol`."""
    seqlen, limit = protocol["seqlen"], protocol["max_chunks"]
    if protocol["protocol"] == "sliding":
        return sliding_windows(n_ids, seqlen, protocol["stride"], limit)[-1][1]
    n = n_ids // seqlen
    return (n if limit is None else min(n, limit)) * seqlen


def entry_key(model_fp: str, protocol: dict, tok_fp: str, ids: torch.Tensor, text_sha256: str) -> dict:
    return {"version": VERSION, "model": model_fp, **protocol, "tokenizer": tok_fp, "text_sha256": text_sha256,
            "ids_sha256": hash_ids(ids), "n_ids": int(ids.shape[1])}


def entry_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "baselines" / f"{digest}.json"


def _checksum(result: dict) -> str:
    return hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()


def load_entry(path: Path, key: dict) -> dict | None:
    """The cached result if the entry is whole and was computed from `key`; None (after a warning) otherwise."""
    try:
        e = json.loads(path.read_text())
        result = e["result"]
        problem = _problem(e, result, key)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:  # not JSON / missing fields / unreadable
        problem = f"unreadable ({type(err).__name__})"
    if problem:
        log.warning("baseline cache %s is damaged or mismatched (%s); recomputing it", path, problem)
        return None
    return result


def _problem(e: dict, result: dict, key: dict) -> str | None:
    if e.get("key") != key:
        diff = sorted(k for k in set(key) | set(e.get("key") or {}) if (e.get("key") or {}).get(k) != key.get(k))
        return f"computed from other inputs: {', '.join(diff)}"
    if e.get("checksum") != _checksum(result):
        return "its numbers do not match their checksum (edited?)"
    ppl, nll = result.get("ppl"), result.get("nll")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (ppl, nll)) or \
            not math.isclose(ppl, math.exp(nll), rel_tol=1e-9):
        return f"ppl={ppl} is not exp(nll={nll})"
    want = expected_tokens(key["n_ids"], key)
    if result.get("n_tokens") != want:
        return f"n_tokens={result.get('n_tokens')}, the protocol gives {want}"
    return None


def store_entry(path: Path, key: dict, result: dict) -> None:
    atomic_write_json(path, {"key": key, "result": result, "checksum": _checksum(result)})


def cached_baseline(model, tok, streams: dict, protocol: dict, compute: Callable[[dict], dict]) -> dict:
    """FP results {dataset: ppl dict} for `streams` {dataset: (ids [1, N], Source)}: valid cache entries are used
    (marked cached=True), the rest are computed together by `compute(sub_streams)` and stored."""
    model_fp, tok_fp = model_fingerprint(model), tokenizer_fingerprint(tok)
    keys = {ds: entry_key(model_fp, protocol, tok_fp, ids, src.sha256) for ds, (ids, src) in streams.items()}
    out, missing = {}, {}
    for ds, key in keys.items():
        path = entry_path(key)
        hit = load_entry(path, key) if path.is_file() else None
        if hit is None:
            missing[ds] = streams[ds]
        else:
            out[ds] = {**hit, "cached": True}
    if missing:
        fresh = compute(missing)
        for ds, res in fresh.items():
            store_entry(entry_path(keys[ds]), keys[ds], res)
        out.update(fresh)
    return {ds: out[ds] for ds in streams}
