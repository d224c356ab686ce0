"""Where an eager packed layer's host time goes at M = 1 (GPU): the launch probe's rows, cProfile's top functions
of the W4 and W8A8 forwards, the cached launch path (kernels/launcher.py) against JIT launches (outputs identical,
host time per forward) and, with --decode, eager decode of a 7B-shaped model both ways. Printed and written as JSON.

    python experiments/diag_host_launch.py --out results/ --decode   # CUDA; on CPU: quick shapes, no Triton rows
    python experiments/diag_host_launch.py --render results/host_launch_<device>.json   # its markdown table again
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
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
    ap.add_argument("--render", default=None, help="write the .md of an existing JSON (no measurement)")
    a = ap.parse_args()
    if a.render:
        path = Path(a.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
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
        commit = os.environ.get("QRESEARCH_COMMIT") or git_commit()
        path.write_text(json.dumps({"device": name, "commit": commit, "rows": rows, "profile": prof, "cached_vs_jit": ab,
                                    "eager_decode": decode}, indent=1))
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        print("wrote", path, "and .md")


def git_commit() -> str:
    """Short HEAD (+dirty), or 'unknown' outside a git checkout (the device machine gets QRESEARCH_COMMIT)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render(d: dict) -> str:
    """Markdown of one diagnosis: the launch probe, the cached-vs-JIT A/B and the eager decode A/B."""
    from experiments.gpusuite.report import _table

    probe = [[r["path"], "-" if r.get("us") is None else f"{r['us']:.1f}",
              "-" if r.get("vs_fp16") is None else f"{r['vs_fp16']:.2f}x", r.get("identical", r.get("error", "-"))]
             for r in d["rows"]]
    ab = [[r["variant"], r["m"], r["kernel"], "yes" if r["identical"] else "NO", f"{r['cached_us']:.1f}",
           f"{r['jit_us']:.1f}", f"{r['jit_us'] / r['cached_us']:.2f}x"] for r in d["cached_vs_jit"]]
    lines = [f"# Host time of eager packed layers on {d['device']}", "",
             f"- commit: {d.get('commit', 'not recorded')}; command: `python experiments/diag_host_launch.py "
             "--out results/ --decode` (1000 calls per row)", "- M = 1 calls (and the prefill rows' M) on a 1024 x 1024 "
             "layer (GPU work of a few us: back-to-back calls are bound by the host); wall us per call, one "
             "synchronize at the end; 'vs fp16' against F.linear at the same M.", "",
             *_table(["path", "us / call", "vs fp16 F.linear", "identical"], probe), "",
             "QuantLinear forward on the default launch path of the commit measured (cached launches, "
             "kernels/launcher.py; decode plans from 581ddd0) vs `jit_only()` (Triton's JIT call and the autotuner "
             "on every call, no plans): identical = the same bits.", "",
             *_table(["variant", "M", "kernel", "identical", "cached us", "JIT us", "JIT / cached"], ab)]
    if d.get("eager_decode"):
        fp16 = {r["batch"]: r["tok_s"] for r in d["eager_decode"] if r["variant"] == "fp16"}
        pre = f"prefill_{PREFILL}_ms"
        fp16_pre = next((r[pre] for r in d["eager_decode"] if r["variant"] == "fp16" and pre in r), None)
        dec = [[r["variant"], r["batch"], r["launch"], f"{r['ms_per_step']:.2f}", f"{r['tok_s']:.1f}",
                f"{r['tok_s'] / fp16[r['batch']]:.2f}x",
                "-" if pre not in r or r["batch"] != 1 else f"{r[pre]:.1f}",
                "-" if pre not in r or r["batch"] != 1 or not fp16_pre else f"{fp16_pre / r[pre]:.2f}x"]
               for r in d["eager_decode"]]
        lines += ["", "Eager HF decode of a 7B-shaped model (32 layers, random fp16 weights, RTN-packed; 16 new tokens "
                  "after a 16-token prompt, median of 3): the same model with the default launch path of the commit "
                  "measured (cached; decode plans from 581ddd0), with `jit_only()` (Triton's JIT and autotuner on "
                  "every call, no plans: the path before kernels/launcher.py)"
                  + (", and fused (fuse=true, default path)." if any(r["launch"] == "fused" for r in d["eager_decode"])
                     else "."), "",
                  *_table(["variant", "batch", "launch", "ms / step", "tok/s", "vs fp16", f"prefill {PREFILL} ms",
                           "prefill vs fp16"], dec)]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def cached_vs_jit(device, dtype, launch, calls: int) -> list[dict]:
    """Per packed variant and call size: the forward's output through cached launches equals the JIT launch's
    (same kernel, same config: bit-identical), and the host time per call both ways."""
    from experiments import bench_kernels as bk

    out_f, in_f = launch.QUICK_SHAPE if device.type != "cuda" else launch.SHAPE
    res = []
    for variant, ms in (("w4a16_g128", (1, 4, 16, 64, 256)), ("w8a8", (1, 4, 64))):
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


PREFILL = 128  # prompt tokens of the eager prefill column (one forward without the cache, batch 1)


def eager_decode(device, dtype, layers: int) -> list[dict]:
    """HF eager decode (qresearch.eval.latency, 16 new tokens after a 16-token prompt) of a 7B-shaped random model:
    fp16, and packed W4 g128 / W8A8 with cached launches and plans, with JIT launches (jit_only: as before
    kernels/launcher.py), and fused (fuse=true, cached); and one PREFILL-token forward of each (eager prefill)."""
    from experiments.gpusuite import e2e, lib
    from experiments.gpusuite.common import build_causal_lm, free_device_memory
    from qresearch.eval.latency import LatencyConfig, measure_latency
    from qresearch.models.arch import arch_for
    from qresearch.nn.fused import fuse_siblings

    cfg = dict(e2e.LLAMA2_7B, num_hidden_layers=layers) if device.type == "cuda" else e2e.QUICK["llama2_7b"]
    lc = LatencyConfig(True, prompt_lengths=[PREFILL], decode_tokens=16, batch_sizes=[1, 16], repeats=3, warmup=1)
    res = []
    for variant in ("fp16", "w4_g128", "w8a8"):
        model = build_causal_lm(cfg, dtype, device)
        if variant != "fp16":
            lib.rtn_packed(model, variant, device)
        for mode in (("cached", "jit", "fused") if variant != "fp16" else ("-",)):
            if mode == "fused":  # the same model with q/k/v and gate/up fused (fuse=true), cached launches
                fuse_siblings(model, arch_for(model))
            with jit_only() if mode == "jit" else contextlib.nullcontext():
                lat = measure_latency(model, device, lc)
            for b, d in lat["decode"].items():
                res.append({"variant": variant, "batch": int(b), "launch": mode, "ms_per_step": d["ms_per_step"],
                            "tok_s": d["tokens_per_s"], f"prefill_{PREFILL}_ms": lat["prefill"][str(PREFILL)]["ms"]})
        del model
        free_device_memory(device)
    return res


if __name__ == "__main__":
    main()
