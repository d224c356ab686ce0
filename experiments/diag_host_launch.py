"""Where an eager packed layer's host time goes at M = 1 (GPU): the launch probe's rows, cProfile's top functions
of the W4 and W8A8 forwards, the cached launch path (kernels/launcher.py) against JIT launches (outputs identical,
host time per forward) and, with --decode, eager decode of a 7B-shaped model both ways. Printed and written as JSON.

    python experiments/diag_host_launch.py --out results/ --decode   # CUDA; on CPU: quick shapes, no Triton rows
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qresearch.kernels.launcher import jit_only  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for host_launch_<device>.json (default: print only)")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--decode", action="store_true", help="eager decode A/B of a 7B-shaped model (CUDA)")
    ap.add_argument("--decode-layers", type=int, default=32)
    ap.add_argument("--triton-cache", default=None, help="folder with a carried cache.tar.gz (gpusuite/tcache.py)")
    a = ap.parse_args()
    if a.triton_cache:
        from experiments.gpusuite import tcache

        tcache.restore(Path(a.triton_cache))  # before Triton is imported
    from experiments.gpusuite import launch
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32
    rows = launch.rows(device, dtype, quick=not cuda, calls=a.calls)
    prof = launch.profile(device, dtype, quick=not cuda, calls=a.calls)
    ab = cached_vs_jit(device, dtype, launch, calls=a.calls)
    decode = eager_decode(device, dtype, a.decode_layers) if a.decode else []
    for r in rows:
        us = "-" if r.get("us") is None else f"{r['us']:.1f}"
        print(f"{r['path']:<60} {us:>8} us  {r.get('identical', '')} {r.get('error', '')}")
    for variant, top in prof.items():
        print(f"\ncProfile {variant}: own us per call, calls per call")
        for fn, us, n in top:
            print(f"  {us:7.2f} {n:5.1f}  {fn}")
    print("\ncached launch vs JIT launch (QuantLinear forward): identical, us per call cached / jit")
    for r in ab:
        print(f"  {r['variant']:<12} M={r['m']:<3} {r['kernel']:<16} identical={r['identical']} "
              f"{r['cached_us']:.1f} / {r['jit_us']:.1f} us")
    for r in decode:
        print(f"eager decode {r['variant']:<8} b{r['batch']:<3} {r['launch']:<6} {r['ms_per_step']:.2f} ms/step "
              f"{r['tok_s']:.1f} tok/s")
    if a.out:
        name = torch.cuda.get_device_name().lower().replace(" ", "_") if cuda else "cpu"
        path = Path(a.out) / f"host_launch_{name}.json"
        path.write_text(json.dumps({"device": name, "rows": rows, "profile": prof, "cached_vs_jit": ab,
                                    "eager_decode": decode}, indent=1))
        print("wrote", path)


@torch.no_grad()
def cached_vs_jit(device, dtype, launch, calls: int) -> list[dict]:
    """Per packed variant and call size: the forward's output through cached launches equals the JIT launch's
    (same kernel, same config: bit-identical), and the host time per call both ways."""
    from experiments import bench_kernels as bk

    out_f, in_f = launch.QUICK_SHAPE if device.type != "cuda" else launch.SHAPE
    res = []
    for variant, ms in (("w4a16_g128", (1, 4, 16)), ("w8a8", (1, 4, 64))):
        layer = bk.build(variant, out_f, in_f, device, dtype)
        for m in ms:
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            layer(x), layer(x)  # tuned, then cached
            y_cached = layer(x)
            with jit_only():
                y_jit = layer(x)
                jit_us = launch.per_call_us(lambda: layer(x), device, calls)
            res.append({"variant": variant, "m": m, "kernel": layer.kernel_name,
                        "identical": bool(torch.equal(y_cached, y_jit)),
                        "cached_us": launch.per_call_us(lambda: layer(x), device, calls), "jit_us": jit_us})
    return res


def eager_decode(device, dtype, layers: int) -> list[dict]:
    """HF eager decode (qresearch.eval.latency, 16 new tokens after a 16-token prompt) of a 7B-shaped random model:
    fp16, and packed W4 g128 / W8A8 with cached launches and with JIT launches."""
    from experiments.gpusuite import e2e, lib
    from experiments.gpusuite.common import build_causal_lm, free_device_memory
    from qresearch.eval.latency import LatencyConfig, measure_latency

    cfg = dict(e2e.LLAMA2_7B, num_hidden_layers=layers) if device.type == "cuda" else e2e.QUICK["llama2_7b"]
    lc = LatencyConfig(True, prompt_lengths=[16], decode_tokens=16, batch_sizes=[1, 16], repeats=3, warmup=1)
    res = []
    for variant in ("fp16", "w4_g128", "w8a8"):
        model = build_causal_lm(cfg, dtype, device)
        if variant != "fp16":
            lib.rtn_packed(model, variant, device)
        for mode in (("cached", "jit") if variant != "fp16" else ("-",)):
            with jit_only() if mode == "jit" else contextlib.nullcontext():
                lat = measure_latency(model, device, lc)
            for b, d in lat["decode"].items():
                res.append({"variant": variant, "batch": int(b), "launch": mode, "ms_per_step": d["ms_per_step"],
                            "tok_s": d["tokens_per_s"]})
        del model
        free_device_memory(device)
    return res


if __name__ == "__main__":
    main()
