"""How much of a SmolLM2 GPTQ perplexity is fp32 numerics, and does the calibration forward batch (8 vs 1) shift it?

Block forwards at batch 8 and batch 1 are bit-identical on CPU, and both Hessians sit ~3e-7 from the float64 one;
what differs is only the fp32 summation order of H. Permuting the same calibration windows changes nothing but that
order too, so runs over permutations give the numerics spread of the final perplexity at each batch size. A
systematic batch effect must stand out of that spread.

One process per batch list (run two side by side, one torch thread each), then merge:

    python experiments/diag_gptq_numerics.py --batches 8 --perms 0 1 2 3 --json /tmp/b8.json
    python experiments/diag_gptq_numerics.py --batches 1 --perms 0 1 2 3 --json /tmp/b1.json
    python experiments/diag_gptq_numerics.py --forward-check --json /tmp/fwd.json
    python experiments/diag_gptq_numerics.py --merge /tmp/b8.json /tmp/b1.json /tmp/fwd.json --md results/diag_gptq_numerics.md
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qresearch.report import mean_sd  # noqa: E402


def permuted(calib: torch.Tensor, perm: int) -> torch.Tensor:
    """The same windows [n, seq] in another order (perm 0: as drawn)."""
    if perm == 0:
        return calib
    g = torch.Generator().manual_seed(1000 + perm)
    return calib[torch.randperm(calib.shape[0], generator=g)]


def welch_t(a: list[float], b: list[float]) -> float:
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    return (ma - mb) / math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b) + 1e-30)


def forward_check(args) -> dict:
    """Max |difference| of every FP block's outputs computed at calibration batch 8 and 1 (the first 16 windows):
    zero means the two batch sizes feed GPTQ the same activations, bit for bit."""
    from experiments.bench_gptq_vs_reference import load_smollm2
    from qresearch.calib.blockio import BlockIO, capture_inputs, run_block
    from qresearch.models.arch import arch_for, blocks_of

    torch.set_num_threads(args.threads)
    fp, calib_for, _ = load_smollm2(args.data_root)
    arch, cpu = arch_for(fp), torch.device("cpu")
    calib, _ = calib_for(args.calib, args.seqlen, args.seed)
    io = {b: capture_inputs(fp, arch, calib[:16], cpu, b) for b in (8, 1)}
    worst = 0.0
    for blk in blocks_of(fp, arch):
        worst = max(worst, float((torch.cat(io[8].hidden) - torch.cat(io[1].hidden)).abs().max()))
        io = {b: BlockIO(run_block(blk, v), v.kwargs) for b, v in io.items()}
    worst = max(worst, float((torch.cat(io[8].hidden) - torch.cat(io[1].hidden)).abs().max()))
    return {"windows": 16, "blocks": len(blocks_of(fp, arch)), "threads": args.threads, "max_abs_diff": worst,
            "hessians": hessian_errors(fp, arch, calib, cpu)}


def hessian_errors(fp, arch, calib: torch.Tensor, device, blocks=(0, 10, 20, 29)) -> list[dict]:
    """Relative Frobenius error of the fp32 Hessian (qresearch.calib.stats, as GPTQ accumulates it) at batch 8 and
    at batch 1 against the float64 one, for the first linear of every input group of some FP blocks."""
    from qresearch.calib.blockio import BlockIO, capture_inputs, run_block
    from qresearch.calib.hooks import record_inputs
    from qresearch.calib.stats import input_stats
    from qresearch.models.arch import blocks_of, present_groups

    io8 = capture_inputs(fp, arch, calib, device, 8)
    rows = []
    for i, blk in enumerate(blocks_of(fp, arch)):
        if i in blocks:
            io1 = BlockIO([h[j:j + 1] for h in io8.hidden for j in range(h.shape[0])],
                          [kw for h, kw in zip(io8.hidden, io8.kwargs) for _ in range(h.shape[0])])
            for grp in present_groups(blk, arch):
                xs = []
                record_inputs(blk, io8, [grp[0]], lambda _n, x: xs.append(x.reshape(-1, x.shape[-1]).double()))
                X = torch.cat(xs)
                H64 = 2 * X.T @ X / X.shape[0]
                err = {b: float((input_stats(blk, io, [grp[0]])[grp[0]].hessian.double() - H64).norm() / H64.norm())
                       for b, io in ((8, io8), (1, io1))}
                rows.append({"block": i, "linear": grp[0], "batch8_rel_err": err[8], "batch1_rel_err": err[1]})
        io8 = BlockIO(run_block(blk, io8), io8.kwargs)
    return rows


def run(args) -> dict:
    from experiments.bench_gptq_vs_reference import load_smollm2, machine
    from methods.gptq import GPTQ
    from qresearch.eval.ppl import perplexity
    from qresearch.method import Context
    from qresearch.models.arch import arch_for
    from qresearch.nn.swap import swap_linears

    torch.set_num_threads(args.threads)
    fp, calib_for, ids = load_smollm2(args.data_root)
    arch, cpu = arch_for(fp), torch.device("cpu")
    calib, prov = calib_for(args.calib, args.seqlen, args.seed)
    info = machine(argparse.Namespace(reference="/nonexistent", reference_commit=""))
    info.pop("reference_commit")
    out = {"machine": info, "calibration": {"dataset": "c4", "n_samples": args.calib, "seqlen": args.seqlen,
                                                     "seed": args.seed, "hash": prov["hash"]},
           "eval": {"dataset": "wikitext2 test", "chunks": args.eval_chunks, "seqlen": args.seqlen}, "rows": []}
    for bs in args.batches:
        for perm in args.perms:
            model = copy.deepcopy(fp)
            t0 = time.perf_counter()
            res = GPTQ(bits=4, group_size=128, batch_size=bs).quantize(
                model, Context(calib=permuted(calib, perm), arch=arch, device=cpu))
            secs = time.perf_counter() - t0
            swap_linears(model, res, "fake")
            ppl = perplexity(model, ids, args.seqlen, cpu, args.eval_chunks, 1)["ppl"]
            out["rows"].append({"batch": bs, "perm": perm, "ppl": ppl, "seconds": secs})
            print(f"batch {bs} perm {perm}: ppl {ppl:.3f} ({secs:.0f} s)", flush=True)
            if args.json:  # after every row: a long run stopped early keeps what it measured
                Path(args.json).write_text(json.dumps(out, indent=1))
            del model
    out["machine"]["load_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def report(parts: list[dict]) -> str:
    fwd = next((p["forward_check"] for p in parts if "forward_check" in p), None)
    parts = [p for p in parts if "rows" in p]
    rows = [r for p in parts for r in p["rows"]]
    m0, cal, ev = parts[0]["machine"], parts[0]["calibration"], parts[0]["eval"]
    by = {}
    for r in rows:
        by.setdefault(r["batch"], {})[r["perm"]] = r["ppl"]
    batches = sorted(by)
    perms = sorted({p for b in by.values() for p in b})
    lines = ["# GPTQ on SmolLM2: numerics spread of the perplexity, calibration batch 8 vs 1", "",
             f"Machine: {m0['cpu']}, {m0['cores']} cores, torch {m0['torch']}, {m0['threads']} torch thread(s) per "
             f"process, one process per batch size side by side; commit {m0['commit']}.", "",
             f"SmolLM2-135M-Instruct (weights stored as GGUF Q4_1, dequantized to float32), our GPTQ w4 g128 asym, "
             f"true-sequential, act-order off; calibration {cal['dataset']} {cal['n_samples']} x {cal['seqlen']} "
             f"(seed {cal['seed']}, ids hash {cal['hash']}), the same windows in every run, permuted (perm 0: as "
             f"drawn); perplexity on {ev['dataset']}, first {ev['chunks']} chunks of {ev['seqlen']}.", "",
             "| perm | " + " | ".join(f"batch {b} ppl" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for p in perms:
        lines.append(f"| {p} | " + " | ".join(f"{by[b][p]:.3f}" if p in by[b] else "" for b in batches) + " |")
    lines.append("")
    for b in batches:
        m, s = mean_sd(list(by[b].values()))
        lines.append(f"- batch {b}: mean {m:.3f}, sd {s:.3f}, range {min(by[b].values()):.3f}..{max(by[b].values()):.3f} "
                     f"({len(by[b])} runs)")
    if len(batches) == 2:
        a, b = (list(by[x].values()) for x in batches)
        lines.append(f"- Welch t (batch {batches[0]} - batch {batches[1]}): {welch_t(a, b):.2f}")
    if fwd is not None:
        lines.append(f"- FP block outputs at batch 8 vs batch 1 ({fwd['windows']} windows, all {fwd['blocks']} blocks, "
                     f"{fwd['threads']} thread): max |difference| {fwd['max_abs_diff']:.1e} (--forward-check)")
        hs = fwd.get("hessians") or []
        if hs:
            e8, e1 = [r["batch8_rel_err"] for r in hs], [r["batch1_rel_err"] for r in hs]
            lines.append(f"- fp32 Hessians vs float64, {len(hs)} linears of FP blocks "
                         f"{sorted({r['block'] for r in hs})}, all windows: batch 8 {min(e8):.1e}..{max(e8):.1e} "
                         f"(mean {sum(e8) / len(e8):.1e}), batch 1 {min(e1):.1e}..{max(e1):.1e} "
                         f"(mean {sum(e1) / len(e1):.1e}) relative (--forward-check)")
    lines += ["", "Regenerate: see the docstring of `experiments/diag_gptq_numerics.py`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--perms", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-chunks", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=os.environ.get("QRESEARCH_DATA", str(Path(
        os.environ.get("QRESEARCH_SHARED", "/work/shared")) / "data")))
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge", nargs="+", default=None, help="JSON files of earlier runs: write the report only")
    ap.add_argument("--forward-check", action="store_true",
                    help="only compare FP block outputs at batch 8 and 1 (JSON to --json), no GPTQ")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    if args.merge:
        text = report([json.loads(Path(p).read_text()) for p in args.merge])
        if args.md:
            Path(args.md).write_text(text)
        print(text)
        return 0
    if args.forward_check:
        out = forward_check(args)
        print(json.dumps(out))
        if args.json:
            Path(args.json).write_text(json.dumps({"forward_check": out}, indent=1))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
