"""Prefill latency and decode throughput through whatever linears the model holds (fake or packed kernels).

Protocol (recorded with the numbers): random token ids (seeded), `warmup` untimed calls, then the median of
`repeats` timed calls; CUDA events on GPU (after a synchronize), perf_counter on CPU. Prefill = one forward over
[1, L] tokens. Decode = `decode_tokens` single-token steps with a KV cache after a short prompt, batch B;
tokens/s = B * decode_tokens / time. Peak memory is the CUDA allocator peak over the whole measurement.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ConfigError
from .footprint import peak_memory, reset_peak_memory

DECODE_PROMPT = 16  # prompt tokens before decoding starts


@dataclass
class LatencyConfig:
    enabled: bool = False
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 2048])
    decode_tokens: int = 32
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    repeats: int = 5
    warmup: int = 2


def check_latency(lat: dict) -> None:
    """The eval.latency block as LatencyConfig takes it, or a one-line ConfigError (before any model loads)."""
    unknown = sorted(set(lat) - set(LatencyConfig.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"eval.latency.{unknown[0]} is not an option; allowed: "
                          f"{', '.join(LatencyConfig.__dataclass_fields__)}")
    for key in ("prompt_lengths", "batch_sizes"):
        v = lat.get(key, [])
        if not isinstance(v, list) or not v or not all(type(n) is int and n >= 1 for n in v):
            raise ConfigError(f"eval.latency.{key}={v} is invalid; allowed: a non-empty list of positive ints "
                              f"(eval.latency.enabled=false skips latency)")
    for key, low in (("decode_tokens", 1), ("repeats", 1), ("warmup", 0)):
        v = lat.get(key, getattr(LatencyConfig, key))
        if type(v) is not int or v < low:
            raise ConfigError(f"eval.latency.{key}={v!r} is invalid; allowed: an int >= {low}")


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
          before: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of fn, `repeats` times after `warmup` untimed calls. `before` (e.g. an L2 flush) runs
    ahead of every call, outside the timed region."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def max_positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 2048))


@torch.no_grad()
def _decode(model, prompt: torch.Tensor, n_tokens: int) -> None:
    """Greedy decode n_tokens with the model's KV cache (argmax keeps the work data-independent enough)."""
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)  # [B, 1]
    for _ in range(n_tokens):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)  # [B, 1]


@torch.no_grad()
def measure_latency(model, device: torch.device, cfg: LatencyConfig, seed: int = 0) -> dict:
    """{'prefill': {L: ...}, 'decode': {B: ...}, 'peak_memory': ..., protocol facts}; lengths capped to the model."""
    limit = max_positions(model)
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    reset_peak_memory(device)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "timer": "cuda_events" if device.type == "cuda" else "perf_counter", "repeats": cfg.repeats,
           "warmup": cfg.warmup, "dtype": str(next(model.parameters()).dtype), "max_positions": limit,
           "prefill": {}, "decode": {}}
    for length in sorted({min(int(n), limit) for n in cfg.prompt_lengths}):
        ids = torch.randint(0, vocab, (1, length), generator=g).to(device)  # [1, L]
        t = timed(lambda: model(input_ids=ids, use_cache=False), device, cfg.repeats, cfg.warmup)
        med = statistics.median(t)
        res["prefill"][str(length)] = {"ms": med * 1e3, "tokens_per_s": length / med, "all_ms": [x * 1e3 for x in t]}
    prompt_len = min(DECODE_PROMPT, max(1, limit // 2))
    n = max(1, min(int(cfg.decode_tokens), limit - prompt_len))
    for b in cfg.batch_sizes:
        prompt = torch.randint(0, vocab, (int(b), prompt_len), generator=g).to(device)  # [B, P]
        t = timed(lambda: _decode(model, prompt, n), device, cfg.repeats, cfg.warmup)
        med = statistics.median(t)
        res["decode"][str(b)] = {"prompt_tokens": prompt_len, "new_tokens": n, "seconds": med,
                                 "tokens_per_s": int(b) * n / med, "ms_per_step": med / n * 1e3}
    res["peak_memory"] = peak_memory(device)
    return res
