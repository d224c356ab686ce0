"""Decode throughput (and prefill time) of packed models on CPU vs the dense model, measured by
qresearch/eval/latency.py.

    flock /tmp/qresearch-heavy.lock python experiments/bench_decode_cpu.py            # SmolLM2-135M
    python experiments/bench_decode_cpu.py --model stories260k --tokens 8 --repeats 1  # smoke run

One process, one model load; every variant gets the same seeded prompt and protocol (measure_latency: batch 1,
a 16-token prompt, then `--tokens` greedy steps with the KV cache, median of `--repeats` after `--warmup`):
  dense fp32, packed RTN w4 g128 (asym), w8 per-channel (sym) and W8A8 (w8 + per-token int8 activations) in fp32 (dispatch's CPU kernel), the same four
  in bf16, the fp32 packed ones again with q/k/v and gate/up fused (fuse=true; --no-fuse leaves them out), and
  the packed w4 g128 fp32 model on the torch reference (QRESEARCH_KERNELS=torch: the path packed CPU
  inference took before the CPU kernels) with `--ref-tokens` steps. `--prefill L` also times one forward of an
  L-token prompt without the cache (median of the same repeats; not for the reference row). Writes
  results/decode_cpu_<model>.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.bench_kernels import commit_label, cpu_detail  # noqa: E402
from methods.rtn import RTN  # noqa: E402
from qresearch.eval.latency import LatencyConfig, measure_latency  # noqa: E402
from qresearch.kernels.prepared import derived_bytes  # noqa: E402
from qresearch.method import Context  # noqa: E402
from qresearch.models.arch import arch_for  # noqa: E402
from qresearch.models.load import ModelSpec, load_model  # noqa: E402
from qresearch.nn.fused import fuse_siblings  # noqa: E402
from qresearch.nn.packed import QuantLinear, packed_weight_bytes  # noqa: E402
from qresearch.nn.swap import swap_linears  # noqa: E402

# name -> (bits, group, sym, act_bits): RTN weights; act_bits 8 = W8A8 with per-token dynamic int8 activations
QUANT = {"w4_g128": (4, 128, False, 16), "w8_perchannel": (8, -1, True, 16), "w8a8_pertoken": (8, -1, True, 8)}


def load(name: str):
    """The model as `python run.py model=<name>` composes it (fp32 on CPU), in eval mode."""
    from hydra import compose, initialize_config_dir

    import qresearch.config  # noqa: F401 - registers the config's resolvers

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        m = OmegaConf.to_container(compose(config_name="config", overrides=[f"model={name}"]).model, resolve=True)
    spec = ModelSpec(**{k: m[k] for k in ModelSpec.__dataclass_fields__ if k in m})
    return load_model(spec, torch.device("cpu"))[0], spec.weights_note


def decode(model, cfg: LatencyConfig) -> dict:
    """measure_latency's batch-1 decode entry, with its prefill entries under 'prefill'."""
    res = measure_latency(model, torch.device("cpu"), cfg)
    return {**res["decode"]["1"], "prefill": res["prefill"]}


def variants(base, results: dict, fuse: bool):
    """(label, build) in measurement order; build() -> (model, {layer: kernel}) made on demand (one in memory).
    fuse: each packed fp32 variant again with q/k/v and gate/up fused (nn/fused.py, the run's fuse=true)."""
    for dtype in (torch.float32, torch.bfloat16):
        yield f"dense {str(dtype)[6:]}", lambda d=dtype: (copy.deepcopy(base).to(d), {})
        for q in QUANT:
            for fused in (False, True) if fuse and dtype == torch.float32 else (False,):
                def build(d=dtype, q=q, fused=fused):
                    m = copy.deepcopy(base).to(d)
                    kernels = swap_linears(m, results[q], "packed")
                    if fused:
                        kernels.update(fuse_siblings(m, arch_for(m)))
                    return m, kernels
                yield f"packed {q} {str(dtype)[6:]}{' fused' if fused else ''}", build


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ref-tokens", type=int, default=4, help="decode steps for the (slow) torch-reference row")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                    help="torch thread counts; every variant is measured at each")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512], help="prompt lengths of the prefill column(s)")
    ap.add_argument("--no-fuse", dest="fuse", action="store_false",
                    help="leave out the fused-projection rows (fp32 packed variants with fuse=true)")
    ap.add_argument("--load-note", default="other processes may share the cores")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    base, args.weights_note = load(args.model)
    results = {q: RTN(b, g, s, act_bits=a).quantize(base, Context(None, arch_for(base), torch.device("cpu")))
               for q, (b, g, s, a) in QUANT.items()}
    cfg = LatencyConfig(enabled=True, prompt_lengths=args.prefill, decode_tokens=args.tokens, batch_sizes=[1],
                        repeats=args.repeats, warmup=args.warmup)
    ref_cfg = LatencyConfig(enabled=True, prompt_lengths=[], decode_tokens=args.ref_tokens, batch_sizes=[1],
                            repeats=1, warmup=1)
    rows = []
    for label, build in variants(base, results, args.fuse):  # each model built once, measured at every thread count
        model, kernels = build()
        for n in args.threads:
            torch.set_num_threads(n)
            rows.append(row(label, model, kernels, decode(model, cfg), n, args.repeats))
        del model
    ref_model = copy.deepcopy(base)
    swap_linears(ref_model, results["w4_g128"], "packed")
    os.environ["QRESEARCH_KERNELS"] = "torch"
    kernels = {n: m.kernel_name for n, m in ref_model.named_modules() if isinstance(m, QuantLinear)}
    for n in args.threads:
        torch.set_num_threads(n)
        r = decode(ref_model, ref_cfg)
        rows.append(row("packed w4_g128 float32, torch reference", ref_model, kernels, r, n, 1))
    del os.environ["QRESEARCH_KERNELS"]
    return write(rows, args, load_start)


def row(label: str, model, kernels: dict, r: dict, threads: int, repeats: int) -> dict:
    return {"label": label, "threads": threads, "kernels": dict(Counter(kernels.values())),
            "tok_s": r["tokens_per_s"], "ms": r["ms_per_step"], "tokens": r["new_tokens"], "repeats": repeats,
            "prefill_ms": {int(k): v["ms"] for k, v in r["prefill"].items()},
            "packed_mb": packed_weight_bytes(model) / 2**20 if kernels else None,
            "copies_mb": derived_bytes(model) / 2**20 if kernels else None}


def write(rows: list[dict], args, load_start: str) -> Path:
    dense = {(r["label"], r["threads"]): r["tok_s"] for r in rows if r["label"].startswith("dense")}
    dense_pf = {(r["label"], r["threads"]): r["prefill_ms"] for r in rows if r["label"].startswith("dense")}
    lengths = sorted({n for r in rows for n in r["prefill_ms"]})
    lines = [f"# Decode throughput on CPU: {args.model}, batch 1", "",
             "Goal: packed decode faster than the fp32 model. Linears of the decoder blocks are packed (RTN); "
             "embeddings, norms and the (tied) lm_head stay dense in the model dtype.", "",
             f"- machine: {os.cpu_count()} CPU cores ({cpu_detail()}), torch threads {args.threads} (column); "
             f"load average before the run (1/5/15 min) {load_start}, after "
             f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}; {args.load_note}",
             "- protocol: qresearch.eval.latency.measure_latency, batch 1, 16-token prompt, greedy decode with KV "
             f"cache, median of the stated repeats after {args.warmup} warm-up (perf_counter); tokens/s = steps / "
             "time (the time includes the prompt forward); prefill = one forward of an L-token prompt without "
             "the KV cache (same repeats), its ratio = dense fp32 ms / ms",
             f"- model weights: {args.weights_note or 'as published (float)'}",
             f"- command: python experiments/bench_decode_cpu.py {' '.join(sys.argv[1:])}",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}, commit {commit_label()}, "
             f"torch {torch.__version__}", "",
             "- packed MiB: the stored buffers of the packed linears; kernel copies MiB: what their kernels hold "
             "beside them (a kernel's own weight layout, fp32 scales; qresearch.kernels.prepared.derived_bytes) "
             "after the run", "",
             "| model | threads | kernels (layers) | packed MiB | kernel copies MiB | decode steps x repeats | ms / step "
             "| tokens/s | vs dense fp32 | vs dense bf16 |" + "".join(f" prefill {n} ms | vs dense fp32 |"
                                                             for n in lengths),
             "|---" * (10 + 2 * len(lengths)) + "|"]
    for r in sorted(rows, key=lambda r: r["threads"]):
        k = ", ".join(f"{n} ({c})" for n, c in r["kernels"].items()) or "dense"
        mb = "" if r["packed_mb"] is None else f"{r['packed_mb']:.1f} | {r['copies_mb']:.1f}"
        mb = mb or " | "
        fp32, bf16 = dense[("dense float32", r["threads"])], dense[("dense bfloat16", r["threads"])]
        pf = dense_pf[("dense float32", r["threads"])]
        cells = "".join(f" {r['prefill_ms'][n]:.1f} | {pf[n] / r['prefill_ms'][n]:.2f}x |" if n in r["prefill_ms"]
                        else " | |" for n in lengths)
        lines.append(f"| {r['label']} | {r['threads']} | {k} | {mb} | {r['tokens']} x {r['repeats']} | "
                     f"{r['ms']:.1f} | {r['tok_s']:.2f} | {r['tok_s'] / fp32:.2f}x | {r['tok_s'] / bf16:.2f}x |"
                     + cells)
    out = Path(args.out) if args.out else ROOT / "results" / f"decode_cpu_{args.model}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
