"""AdaRound's learning rate on a model's first blocks: block relative MSE of the hard rounding vs RTN on the
calibration windows, per lr (and iterations), the same settings as the learned table's cell otherwise.

    python experiments/probe_adaround_lr.py --model smollm2_135m --blocks 6 --lrs 0.3 0.1 0.03 0.01

Prints one line per (lr, block) and a summary; writes results/probe_adaround_lr_<model>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments.diag_temperature import compose  # noqa: E402


class _Stop(Exception):
    pass


def probe(model, arch, calib, bits: int, group: int, iters: int, lr: float, batch: int, blocks: int,
          keep_best: bool) -> list[dict]:
    from methods.adaround import AdaRound
    from qresearch.method import Context

    rows = []
    step = AdaRound(bits=bits, group_size=group, iters=iters, lr=lr, batch_size=batch, keep_best=keep_best)

    def progress(i, err, err_rtn):  # the method's per-block report, captured
        rows.append({"block": i, "err": err, "err_rtn": err_rtn})
        print(f"lr {lr} iters {iters} block {i}: AdaRound {err:.4g} RTN {err_rtn:.4g}", flush=True)
        if i + 1 >= blocks:
            raise _Stop

    step._progress = progress
    try:
        step.quantize(copy.deepcopy(model), Context(calib=calib, arch=arch, device=torch.device("cpu"), seed=0))
    except _Stop:
        pass
    return rows


def main() -> None:
    from qresearch.config import plan
    from qresearch.data.tokens import calibration_ids
    from qresearch.models.arch import arch_for
    from qresearch.models.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.3, 0.1, 0.03, 0.01])
    ap.add_argument("--keep-best", action="store_true", help="AdaRound's keep_best on (default off: raw AdaRound)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = plan(compose([f"model={args.model}", "method=adaround", "data=c4", "data.n_samples=64", "data.seqlen=256"]))
    model, tok = load_model(p.model, p.device, 0)
    c = p.calib
    calib, prov = calibration_ids(c["name"], tok, c["n_samples"], c["seqlen"], 0, c["root"], c["source"])
    out = {"model": args.model, "calibration": {k: prov[k] for k in ("dataset", "n_samples", "seqlen", "hash")},
           "args": vars(args), "runs": []}
    for lr in args.lrs:
        t0 = time.perf_counter()
        rows = probe(model, arch_for(model), calib, args.bits, args.group, args.iters, lr, args.batch, args.blocks,
                     args.keep_best)
        out["runs"].append({"lr": lr, "seconds": time.perf_counter() - t0, "blocks": rows})
    for r in out["runs"]:
        worse = sum(b["err"] > b["err_rtn"] for b in r["blocks"])
        ratio = sum(b["err"] / b["err_rtn"] for b in r["blocks"]) / len(r["blocks"])
        print(f"lr {r['lr']}: mean AdaRound / RTN block error {ratio:.3f}, worse than RTN in {worse} of "
              f"{len(r['blocks'])} blocks, {r['seconds']:.0f} s")
    (REPO / "results" / f"probe_adaround_lr_{args.model}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
