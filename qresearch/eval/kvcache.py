"""KV-cache quantization as an evaluation option, and the cache's bytes.

Keys and values are fake-quantized inside attention through the format table: one scale (and zero point for
asymmetric int) per token and per KV head, over the head dimension. The hook is transformers' attention interface:
the model's attention function (sdpa / eager) is wrapped by one that quantizes `key` and `value` as they arrive,
which for RoPE models is after the rotary embedding (what a real cache stores) and before grouped-query heads are
repeated. Per-token quantization is a deterministic function of each cached vector, so quantizing the whole
cache at every step gives the same values a cache storing quantized entries would (perplexity, lm-eval and
generation alike); the time it takes is fake-quant overhead, not a saving (latency numbers do not show one).
The wrapped function counts its calls, so a model whose attention bypasses the interface is reported, not missed.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.primitives import choose_qparams, dequantize, quantize
from ..quant.spec import QuantSpec

IMPL = "qresearch_kv"
KV_FORMATS = {"int": (2, 3, 4, 5, 6, 7, 8), "fp8_e4m3": (8,), "fp8_e5m2": (8,)}


def kv_spec(bits: int, qformat: str = "int", sym: bool = False) -> QuantSpec | None:
    """Per-token spec of cached keys / values; bits=16 = the cache stays in the model dtype (None)."""
    if bits == 16:
        return None
    if qformat not in KV_FORMATS or bits not in KV_FORMATS[qformat]:
        allowed = "; ".join(f"{f}: {', '.join(map(str, b))}" for f, b in KV_FORMATS.items())
        raise ConfigError(f"eval.kv_cache bits={bits} qformat={qformat} is not supported; allowed: 16 (off) or {allowed}")
    return QuantSpec(bits=bits, granularity="token", sym=sym, qformat=qformat)


def check_kv_settings(kv: dict | None) -> dict | None:
    """eval.kv_cache as configured -> checked settings (bits, qformat, sym, contexts), or None when off."""
    if not kv:
        return None
    for key, typ in {"bits": int, "qformat": str, "sym": bool}.items():
        v = kv.get(key)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ConfigError(f"eval.kv_cache.{key}={v!r} is not a {typ.__name__}")
    if kv_spec(kv["bits"], kv["qformat"], kv["sym"]) is None:
        return None
    contexts = kv.get("contexts") or []
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in contexts):
        raise ConfigError(f"eval.kv_cache.contexts={contexts} invalid; allowed: a list of positive ints")
    return {"bits": kv["bits"], "qformat": kv["qformat"], "sym": kv["sym"], "contexts": list(contexts)}


def fake_quant_kv(t: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize keys or values [batch, kv_heads, tokens, head_dim]: one group per (batch, head, token)."""
    scale, zero = choose_qparams(t.detach(), spec)  # [batch * heads * tokens, 1]
    return dequantize(quantize(t, scale, zero, spec), scale, zero, spec).to(t.dtype)


def cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def cache_bytes(config, context: int, spec: QuantSpec | None, batch: int = 1, fp_bits: int = 16) -> dict:
    """Bytes of the K and V cache at `context` tokens: codes plus per-token-per-head scales (and zero points)."""
    layers, kv_heads, head_dim = cache_geometry(config)
    vectors = 2 * layers * kv_heads * context * batch  # K and V, one vector per token, head and layer
    if spec is None:
        bits = head_dim * fp_bits
    else:
        fmt = spec.format
        bits = head_dim * fmt.code_bits(spec) + fmt.scale_bits(spec) + fmt.zero_bits(spec)
    return {"context": context, "batch": batch, "bytes": vectors * bits / 8, "bits_per_value": bits / head_dim,
            "fp16_bytes": vectors * head_dim * fp_bits / 8}


@dataclass
class _KVState:
    spec: QuantSpec
    inner: str
    calls: int = 0


def _inner_fn(module: nn.Module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    st: _KVState = module._qresearch_kv
    st.calls += 1
    key, value = fake_quant_kv(key, st.spec), fake_quant_kv(value, st.spec)
    return _inner_fn(module, st.inner)(module, query, key, value, attention_mask, **kwargs)


def _register(inner: str) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(IMPL, _kv_attention)
    AttentionMaskInterface.register(IMPL, ALL_MASK_ATTENTION_FUNCTIONS[inner])


class KVCacheQuant:
    """Enable per-token KV quantization on a model; `report()` gives what was done and the cache's bytes."""

    def __init__(self, model: nn.Module, spec: QuantSpec):
        self.model, self.spec = model, spec
        self.inner = model.config._attn_implementation
        if self.inner == IMPL or self.inner not in ("sdpa", "eager"):
            raise ConfigError(f"eval.kv_cache needs the model's attention to be sdpa or eager (got {self.inner})")
        self.states = []
        _register(self.inner)
        for m in model.modules():
            if hasattr(m, "k_proj") or hasattr(m, "qkv_proj") or type(m).__name__.endswith("Attention"):
                m._qresearch_kv = _KVState(spec, self.inner)
                self.states.append(m._qresearch_kv)
        model.set_attn_implementation(IMPL)

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.states)

    def report(self, contexts: list[int]) -> dict:
        """What ran (calls through the quantized attention must be > 0) and the cache's bytes at each context."""
        if self.calls == 0:
            raise RuntimeError(f"eval.kv_cache was set but no attention call went through {IMPL}: the model's "
                               f"attention bypasses transformers' attention interface")
        cfg = self.model.config
        return {"bits": self.spec.bits, "qformat": self.spec.qformat, "sym": self.spec.sym, "granularity":
                "per token, per kv head (over head_dim)", "keys": "after RoPE (as cached)", "attention": self.inner,
                "attention_calls": self.calls, "cache": [cache_bytes(cfg, c, self.spec) for c in contexts]}


def enable_kv_cache(model: nn.Module, kv: dict | None) -> KVCacheQuant | None:
    """The runner's entry: KV quantization from the plan's eval.kv_cache settings (None = off)."""
    return None if not kv else KVCacheQuant(model, kv_spec(kv["bits"], kv["qformat"], kv["sym"]))


def kv_cache_report(handle: KVCacheQuant | None, kv: dict | None, seqlen: int, max_positions: int | None) -> dict | None:
    """What ran and the cache's bytes at the eval length, the model's max positions and any asked contexts."""
    if handle is None:
        return None
    contexts = sorted({seqlen, *(kv.get("contexts") or []), *([max_positions] if max_positions else [])})
    return handle.report(contexts)
