"""Why our SmolLM2 GPTQ job and the reference-style pipeline land at different perplexities: how far apart their
Hessians are, and how far apart the codes the reference's own solver makes from each.

On block 0 (both see the same embeddings), per input group: our Hessian (qresearch.calib.stats: 2/tokens X^T X,
batches of 8) against the reference's (its GPTQ.add_batch: 2/samples X^T X, one sample at a time), compared after
the exact power-of-two rescale (tokens / samples = seqlen); then the first linear of the group solved by the
reference's fasterquant from each Hessian: the share of codes that differ. Needs the reference folder (as
experiments/bench_gptq_vs_reference.py) and the data root.

    python experiments/diag_gptq_hessian.py --reference .reference/gptq --calib 128 --seqlen 512 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.bench_gptq_vs_reference import load_smollm2  # noqa: E402
from experiments.gptq_reference_adapter import _solver, load_reference, reference_codes  # noqa: E402
from qresearch.calib.blockio import block_forward, capture_inputs  # noqa: E402
from qresearch.calib.stats import input_stats  # noqa: E402
from qresearch.models.arch import arch_for, blocks_of, get_module, present_groups  # noqa: E402


def reference_hessian(ref, block, name: str, io) -> torch.Tensor:
    """H of linear `name` as the reference accumulates it: add_batch per sample (batch 1) through block forwards."""
    lin = get_module(block, name)
    obj = _solver(ref, lin, 4, False)
    hook = lin.register_forward_hook(lambda _m, inp, out: obj.add_batch(inp[0].data, out.data))
    with torch.no_grad():
        for h, kw in zip(io.hidden, io.kwargs):
            block_forward(block, h, kw)
    hook.remove()
    return obj.H


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=os.environ.get("QRESEARCH_DATA", str(Path(
        os.environ.get("QRESEARCH_SHARED", "/work/shared")) / "data")))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_reference(args.reference)
    model, calib_for, _ = load_smollm2(args.data_root)
    arch, cpu = arch_for(model), torch.device("cpu")
    calib, prov = calib_for(args.calib, args.seqlen, args.seed)
    block = blocks_of(model, arch)[0]
    io8 = capture_inputs(model, arch, calib, cpu, batch_size=8)
    io1 = capture_inputs(model, arch, calib, cpu, batch_size=1)
    rows = []
    for grp in present_groups(block, arch):
        name = grp[0]
        ours = input_stats(block, io8, [name])[name].hessian * args.seqlen  # 2/samples X^T X, exact rescale
        theirs = reference_hessian(ref, block, name, io1)
        W = get_module(block, name).weight.data.clone()
        _, c_ours, _, _ = reference_codes(ref, W, ours, 4, 128, False, False)
        _, c_ref, _, _ = reference_codes(ref, W, theirs, 4, 128, False, False)
        rows.append({"block": 0, "group": grp, "linear": name,
                     "hessian_rel_diff": float((ours.double() - theirs.double()).norm() / theirs.double().norm()),
                     "hessian_max_abs_rel": float(((ours - theirs).abs().max() / theirs.abs().max())),
                     "codes_differ_frac": float((c_ours != c_ref).float().mean()),
                     "codes_max_step": int((c_ours.int() - c_ref.int()).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    out = {"calib": {"n": args.calib, "seqlen": args.seqlen, "seed": args.seed, "hash": prov["hash"]},
           "threads": args.threads, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
