"""Python time of one packed-layer call up to the Triton launch: what eager decode pays per linear on top of the
kernel (224 linears per Llama-7B decode step). Runs on CPU: the Triton kernel is replaced by a stub that only counts
launches (Triton's own launcher, which needs a GPU, is not included), under TRITON_INTERPRET=1 so dispatch takes
the Triton path. Median of --repeats timings of --calls calls each.

    python experiments/bench_dispatch_overhead.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: dispatch then takes the Triton path on CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402


class LaunchCounter:
    """Stands in for a @triton.jit kernel behind kernels/launcher.py: the JIT call `kernel[grid](...)` counts and
    returns a stand-in CompiledKernel (`packed_metadata`, `compiled[grid](*args)`) whose launches count too, so
    the timed calls take the launcher's cached path as on a GPU (Triton's C launcher itself excluded)."""

    packed_metadata = None

    def __init__(self):
        self.launches = 0
        self.fn = None  # set to the real kernel's Python function: the launcher reads its parameters

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            return self
        return launch


def packed_layer(out_f: int, in_f: int) -> nn.Module:
    """A 4-bit g128 asymmetric packed QuantLinear from RTN codes of a random weight."""
    from qresearch.method import QuantResult
    from qresearch.nn.swap import swap_linears
    from tests._qhelpers import rtn_layer

    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    res = QuantResult()
    res.layers["0"] = rtn_layer(out_f, in_f, 4, 128, False, seed=0)
    swap_linears(model, res, "packed")
    return model[0]


def time_calls(layer: nn.Module, x: torch.Tensor, calls: int, repeats: int) -> list[float]:
    """Microseconds per call, one value per repeat."""
    for _ in range(20):
        layer(x)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(x)
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from qresearch.kernels import triton_gemv
    from qresearch.kernels.launcher import Launcher
    from qresearch.tracking.provenance import commit_label, provenance

    stub = LaunchCounter()
    stub.fn = triton_gemv.wq_gemv_kernel.fn
    triton_gemv._LAUNCH = Launcher(stub)
    out_f, in_f = map(int, args.shape.split("x"))
    layer = packed_layer(out_f, in_f)
    with torch.no_grad():
        us = time_calls(layer, torch.randn(1, in_f), args.calls, args.repeats)
    row = {"shape": args.shape, "M": 1, "path": "triton_gemv (launch stubbed, cached by kernels/launcher.py)", "us_per_call_median": statistics.median(us),
           "us_per_call_all": us, "launches": stub.launches, "commit": commit_label(provenance(torch.device("cpu"), 0)),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "load": os.getloadavg()}
    assert stub.launches == 20 + args.calls * args.repeats, "every call must reach the (stubbed) kernel launch"
    print(f"{args.shape} M=1: {row['us_per_call_median']:.1f} us per call up to the launch "
          f"(median of {args.repeats} x {args.calls}), commit {row['commit']}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
