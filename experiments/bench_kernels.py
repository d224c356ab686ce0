"""Kernel benchmark: quantized linears vs fp16 torch.matmul on Llama-2-7B layer shapes.

    python experiments/bench_kernels.py                 # CUDA if present, else CPU (reference path, labelled)
    python experiments/bench_kernels.py --m 1 16 --shapes 4096x11008

For each (out x in) weight shape and M tokens: median time of y = x @ W^T for fp16 (torch.matmul) and for
QuantLinear W4A16 g128 / W8A16 / W8A8 through whatever kernel dispatch picks (named in the table), speedup over
fp16, achieved memory bandwidth (bytes of packed weights + qparams + activations in/out per call / time) as a
fraction of the device's measured copy bandwidth, and the memory-bound limit 16 / (bits + qparam overhead).
On CUDA the times are replays of a captured CUDA graph (kernel time without the per-call host launch overhead,
which can exceed a 10 us kernel); the eager times are kept in the rows (fp16_eager_ms, q_eager_ms).
Writes results/kernels_<device>.md. CPU numbers measure the torch reference path only, never the GPU goals.
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qresearch.eval.latency import timed  # noqa: E402
from qresearch.records import ActQuant, LayerResult  # noqa: E402
from qresearch.nn.packed import QuantLinear  # noqa: E402
from qresearch.quant import QuantSpec, quantize_tensor, weight_spec  # noqa: E402

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]  # out x in: q/k/v/o, gate/up, down
MS = [1, 4, 16, 64, 256, 2048]
# name -> (bits, group, sym, activation int8?)
VARIANTS = {"w4a16_g128": (4, 128, False, False), "w8a16": (8, -1, True, False), "w8a8": (8, -1, True, True)}


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = statistics.median(timed(lambda: dst.copy_(src), device, repeats, 2))
    return 2 * src.numel() / t


def memory_bound_limit(bits: int, group: int, in_f: int, sym: bool) -> float:
    """16 / (bits + overhead): fp16 weight bytes over quantized weight + qparam bytes per weight."""
    g = in_f if group == -1 else group
    return 16 / (bits + (16 + (0 if sym else bits)) / g)


def build(variant: str, out_f: int, in_f: int, device, dtype) -> QuantLinear:
    bits, group, sym, a8 = VARIANTS[variant]
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    q = quantize_tensor(w.float(), weight_spec(bits, group, sym))
    act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token")) if a8 else None
    lin = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    lin.weight.data.copy_(w)
    return QuantLinear.from_result(lin, LayerResult(q, act=act))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref||_F / ||ref||_F in float64."""
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def cuda_graph(fn, device):
    """(replay, None) with fn captured in a CUDA graph, or (None, why not). Call only once fn is warm (compiled,
    autotuned): a replay then runs the same kernels without the per-call host launch overhead."""
    if device.type != "cuda":
        return None, f"no CUDA graphs on {device.type}"
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, None
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the eager timing stands
        return None, f"{type(exc).__name__}: {exc}"[:200]


def time_call(fn, device, repeats: int, warmup: int, before=None, graphs: bool = False) -> dict:
    """Median seconds of fn called eagerly (host launch overhead included) and, with `graphs`, replayed from a
    CUDA graph (graph_s None and graph_error set when capture failed)."""
    out = {"eager_s": statistics.median(timed(fn, device, repeats, warmup, before))}
    if graphs:
        replay, why = cuda_graph(fn, device)
        out["graph_s"] = statistics.median(timed(replay, device, repeats, 1, before)) if replay else None
        out["graph_error"] = why
    return out


def _row_times(t_fp: dict, t_q: dict) -> dict:
    """Times of a row: graph replays when both captured, else eager (named in `timing`)."""
    graph = t_fp.get("graph_s") is not None and t_q.get("graph_s") is not None
    fp, q = (t_fp["graph_s"], t_q["graph_s"]) if graph else (t_fp["eager_s"], t_q["eager_s"])
    return {"timing": "cuda_graph" if graph else "eager", "fp16_ms": fp * 1e3, "q_ms": q * 1e3, "speedup": fp / q,
            "fp16_eager_ms": t_fp["eager_s"] * 1e3, "q_eager_ms": t_q["eager_s"] * 1e3,
            "eager_speedup": t_fp["eager_s"] / t_q["eager_s"],
            "graph_error": t_fp.get("graph_error") or t_q.get("graph_error")}


@torch.no_grad()
def bench_shape(shape: str, ms: list[int], device, dtype, repeats: int, warmup: int, copy_bw: float,
                before=None, reference=None, graphs: bool = False) -> list[dict]:
    """Rows of (M, variant) timings for one weight shape. `before` runs ahead of every timed call, untimed (an L2
    flush for cold-cache timing); `reference(mod, x)`, when given, is the torch-reference output of `mod` that the
    timed kernel's output is compared with (ref_rel_err); `graphs`: also time CUDA-graph replays (time_call)."""
    out_f, in_f = map(int, shape.split("x"))
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    mods = {v: build(v, out_f, in_f, device, dtype) for v in VARIANTS}
    rows = []
    for m in ms:
        x = torch.randn(m, in_f, device=device, dtype=dtype)
        t_fp = time_call(lambda: torch.matmul(x, w.t()), device, repeats, warmup, before, graphs)
        io = (m * in_f + m * out_f) * x.element_size()
        fp_moved = w.numel() * w.element_size() + io
        for v, mod in mods.items():
            t = _row_times(t_fp, time_call(lambda: mod(x), device, repeats, warmup, before, graphs))
            bits, group, sym, _ = VARIANTS[v]
            moved = mod.weight_bytes() + io
            row = {"shape": shape, "M": m, "variant": v, "kernel": mod.kernel_name, **t,
                   "bw_frac": moved / (t["q_ms"] / 1e3) / copy_bw,
                   "fp16_bw_frac": fp_moved / (t["fp16_ms"] / 1e3) / copy_bw,
                   "limit": memory_bound_limit(bits, group, in_f, sym)}
            if reference is not None:
                row["ref_rel_err"] = rel_err(mod(x), reference(mod, x))
            rows.append(row)
    return rows


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def write_markdown(rows: list[dict], device, dtype, copy_bw: float, args) -> Path:
    """The table + protocol as markdown in results/kernels_<device>.md (or --out)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name()}"
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    lines = [f"# Kernel benchmark on {name}", ""]
    if device.type != "cuda":
        lines += ["**CPU run: the torch reference path (dequantize + matmul), not the Triton kernels. These numbers",
                  "prove the script works; they are not the goal measurement. The GPU goals (W4A16 g128 >= 3x fp16 at",
                  "M=1 and >= 2.5x at M=16 on 4096x11008, W8A8 >= 1.5x at M=2048) were NOT measured: no GPU was",
                  "lent to this session.** CPU timings on a shared machine are noisy.", ""]
    import triton  # noqa: F401  (version only)

    lines += [f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}, commit {_sh(['git', 'rev-parse', '--short', 'HEAD'])}",
              f"- torch {torch.__version__}, triton {sys.modules['triton'].__version__}, activations {dtype}",
              f"- timing: median of {args.repeats} after {args.warmup} warm-up "
              f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'}); measured copy bandwidth "
              f"{copy_bw / 1e9:.1f} GB/s (read + write); times: {', '.join(sorted({r['timing'] for r in rows}))} "
              "(cuda_graph = replays of a captured call, host launch overhead excluded)",
              "- bw = (packed weight + qparam bytes + activations in/out) / time / copy bandwidth; "
              "limit = 16 / (bits + qparam bits per weight), the memory-bound speedup ceiling", "",
              "| shape (out x in) | M | variant | kernel | dense ms (torch.matmul) | quant ms | speedup | bw / copy bw | limit |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['M']} | {r['variant']} | {r['kernel']} | {r['fp16_ms']:.4f} | "
                     f"{r['q_ms']:.4f} | {r['speedup']:.2f}x | {r['bw_frac']:.2f} | {r['limit']:.2f}x |")
    out = Path(args.out) if args.out else ROOT / "results" / f"kernels_{slug}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", nargs="+", default=SHAPES)
    ap.add_argument("--m", nargs="+", type=int, default=None, help="token counts (default: all on GPU, 1 4 16 on CPU)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (default 1024 GPU, 256 CPU)")
    ap.add_argument("--out", default=None, help="markdown path (default results/kernels_<device>.md)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32  # CPU fp16 matmul is not a meaningful baseline
    ms = args.m or (MS if gpu else [1, 4, 16])
    args.repeats = args.repeats or (20 if gpu else 3)
    args.warmup = args.warmup or (5 if gpu else 1)
    copy_bw = copy_bandwidth(device, args.copy_mib or (1024 if gpu else 256), args.repeats)
    rows = [r for s in args.shapes
            for r in bench_shape(s, ms, device, dtype, args.repeats, args.warmup, copy_bw, graphs=gpu)]
    out = write_markdown(rows, device, dtype, copy_bw, args)
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
