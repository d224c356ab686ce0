"""A wider tile sweep of triton_gemv's wq_gemv_kernel (M = 1, W4 g128) on a GPU: ncu showed the tuned tiles leave
the H100 under one wave (results/profile_small_m_*.md). Prints every tile's do_bench time (as the
tuner times it: a whole call) per Llama-2-7B shape, and the best, as JSON lines into --out. --ab-magic also times
every tile with MAGIC=False (codes through int-to-float conversions; the same output bits): an A/B of the kernel's
conversion-free unpacking in one run.

    PYTHONUNBUFFERED=1 python3 experiments/sweep_gemv.py --out $OUT [--ab-magic] [--tiles tuned]
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
TUNED = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K_CODES"], c.kwargs["SPLIT_K"], c.num_warps) for c in G.CONFIGS]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096", "4096x4096"])
    ap.add_argument("--ab-magic", action="store_true", help="also time each tile with MAGIC=False")
    ap.add_argument("--tiles", choices=["wide", "tuned"], default="wide", help="this sweep's grid, or the tuner's CONFIGS")
    args = ap.parse_args()
    tiles = TILES if args.tiles == "wide" else TUNED
    magics = (True, False) if args.ab_magic else (True,)
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
        for (bn, bkc, sk, w), magic in ((t, m) for t in tiles for m in magics):
            cfg = {"BLOCK_N": bn, "BLOCK_K_CODES": bkc, "SPLIT_K": sk, "MAGIC": magic}
            try:
                y = G._launch(x, meta, qw, sc, qz, None, cfg, w)
                err = float((y.double() - ref).norm() / ref.norm())
                ms = triton.testing.do_bench(lambda: G._launch(x, meta, qw, sc, qz, None, cfg, w),  # noqa: B023
                                             warmup=5, rep=20)
            except Exception as exc:  # noqa: BLE001
                ms, err = float("nan"), repr(exc)[:100]
            rows.append({"shape": shape, "BN": bn, "BKC": bkc, "SK": sk, "warps": w, "magic": magic, "us": ms * 1e3,
                         "err": err, "grid": triton.cdiv(out_f, bn) * sk})
        best = sorted((r for r in rows if r["shape"] == shape and r["us"] == r["us"]), key=lambda r: r["us"])[:8]
        print(shape, f"{time.perf_counter() - t0:.0f} s", *[json.dumps(r) for r in best], sep="\n", flush=True)
        for magic in magics:  # the A/B: best tile of each unpacking
            mine = [r["us"] for r in rows if r["shape"] == shape and r["magic"] == magic and r["us"] == r["us"]]
            print(f"{shape} best with MAGIC={magic}: {min(mine):.1f} us" if mine else f"{shape} MAGIC={magic}: none ran")
        (Path(args.out) / "sweep_gemv.json").write_text(json.dumps(rows, indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
