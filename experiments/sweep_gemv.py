"""A wider tile sweep of triton_gemv's wq_gemv_kernel (M = 1, W4 g128) on a GPU: ncu showed the tuned tiles leave
the H100 under one wave (results/profile_small_m_*.md). Prints every tile's do_bench time (as the
tuner times it: a whole call) per Llama-2-7B shape, and the best, as JSON lines into --out.

    PYTHONUNBUFFERED=1 python3 experiments/sweep_gemv.py --out $OUT
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.gpusuite import lib  # noqa: E402
from qresearch.kernels import triton_gemv as G  # noqa: E402

TILES = [(bn, 128, sk, w) for bn in (16, 32, 64, 128) for sk in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096", "4096x4096"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for shape in args.shapes:
        out_f, in_f = map(int, shape.split("x"))
        meta, bufs = lib.pack_random_layer(out_f, in_f, 4, 128, False, False, torch.float16,
                                           torch.Generator().manual_seed(0))
        bufs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in bufs.items()}
        qw, sc, qz = bufs["qweight"], bufs["scales"], bufs["qzeros"]
        x = torch.randn(1, in_f, device=dev, dtype=torch.float16)
        ref = x.double() @ lib.dequant_weight64(meta, bufs).t()
        t0 = time.perf_counter()
        for bn, bkc, sk, w in TILES:
            cfg = {"BLOCK_N": bn, "BLOCK_K_CODES": bkc, "SPLIT_K": sk}
            try:
                y = G._launch(x, meta, qw, sc, qz, None, cfg, w)
                err = float((y.double() - ref).norm() / ref.norm())
                ms = triton.testing.do_bench(lambda: G._launch(x, meta, qw, sc, qz, None, cfg, w),  # noqa: B023
                                             warmup=5, rep=20)
            except Exception as exc:  # noqa: BLE001
                ms, err = float("nan"), repr(exc)[:100]
            rows.append({"shape": shape, "BN": bn, "BKC": bkc, "SK": sk, "warps": w, "us": ms * 1e3, "err": err,
                         "grid": triton.cdiv(out_f, bn) * sk})
        best = sorted((r for r in rows if r["shape"] == shape and r["us"] == r["us"]), key=lambda r: r["us"])[:8]
        print(shape, f"{time.perf_counter() - t0:.0f} s", *[json.dumps(r) for r in best], sep="\n", flush=True)
        (Path(args.out) / "sweep_gemv.json").write_text(json.dumps(rows, indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
