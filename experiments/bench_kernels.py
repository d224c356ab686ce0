"""Kernel benchmark: quantized linears vs fp16 torch.matmul on Llama-2-7B layer shapes.

    python experiments/bench_kernels.py                 # CUDA if present, else CPU (reference path, labelled)
    python experiments/bench_kernels.py --m 1 16 --shapes 4096x11008

For each (out x in) weight shape and M tokens: median time of y = x @ W^T for fp16 (torch.matmul) and for
QuantLinear W4A16 g128 / W8A16 / W8A8 through whatever kernel dispatch picks (named in the table), speedup over
fp16, achieved memory bandwidth (bytes of packed weights + qparams + activations in/out per call / time) as a
fraction of the device's measured copy bandwidth, and the memory-bound limit 16 / (bits + qparam overhead).
On CUDA the times are replays of a captured CUDA graph (kernel time without the per-call host launch overhead,
which can exceed a 10 us kernel); the eager times are kept in the rows (fp16_eager_ms, q_eager_ms).
On CPU the dense baseline is fp32, and a second table (--candidates SHAPE) times every CPU low-bit kernel of
qresearch/kernels/cpu_packed.py per bit width with fp32 and bf16 activations, forced, next to dense fp32 and bf16
and the torch reference, and marks the fastest and the one dispatch picks; a third (--cold-mib) times dispatch's
kernel with the weights streaming from DRAM. Writes results/kernels_<device>.md. CPU numbers never measure the
GPU goals.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
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
from qresearch.kernels import cpu_packed, cpu_panels, dispatch  # noqa: E402
from qresearch.kernels.reference import wa16_ref  # noqa: E402
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


def build(variant: str, out_f: int, in_f: int, device, dtype, act_order: bool = False) -> QuantLinear:
    """A packed layer of `variant` for a random weight; act_order: input columns assigned to groups by a random
    permutation (every group `group` columns, as GPTQ act-order writes g_idx)."""
    bits, group, sym, a8 = VARIANTS[variant]
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    q = quantize_tensor(w.float(), weight_spec(bits, group, sym))
    if act_order:
        g = torch.arange(in_f, device=device) // q.spec.group_for(in_f)
        q.g_idx = g[torch.randperm(in_f, device=device)].to(torch.int32)
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
            row = {"shape": shape, "M": m, "variant": v, "kernel": _kernel_label(mod, m), **t,
                   "bw_frac": moved / (t["q_ms"] / 1e3) / copy_bw,
                   "fp16_bw_frac": fp_moved / (t["fp16_ms"] / 1e3) / copy_bw,
                   "limit": memory_bound_limit(bits, group, in_f, sym)}
            if reference is not None:
                row["ref_rel_err"] = rel_err(mod(x), reference(mod, x))
            rows.append(row)
    return rows


def _kernel_label(mod: QuantLinear, m: int) -> str:
    """Dispatch's kernel for `mod`; for our C kernel also the loop that runs `m` rows (fused / many / panels)."""
    name = mod.kernel_name
    return f"{name} ({cpu_packed.cpu_lowbit.kernel_loop(m)})" if name.startswith("c_lowbit") else name


# CPU candidates: name -> (bits, group, sym); the torch reference is timed for the REF_VARIANTS at M=1 only (slow)
CPU_VARIANTS = {"w2_g128": (2, 128, False), "w3_g128": (3, 128, False), "w4_g128": (4, 128, False),
                "w4_g32": (4, 32, False), "w4_perchannel": (4, -1, True), "w5_g128": (5, 128, False),
                "w6_perchannel": (6, -1, False), "w8_perchannel": (8, -1, True), "w8_g128": (8, 128, False)}
REF_VARIANTS = ("w4_g128", "w8_perchannel")
PANELS = "panels"  # cpu_panels.py: dequantized weight panels + the dense matmul (many rows)
ACT_DTYPES = (torch.float32, torch.bfloat16)


def _can_time(kind: str, bits: int, group: int) -> bool:
    """Kernels that can compute the layer at all (dispatch may still refuse them, e.g. aten ops in fp32)."""
    return {"aten_int4": bits <= 4, "aten_int8": group == -1}.get(kind, True)


@torch.no_grad()
def bench_cpu_candidates(shape: str, ms: list[int], repeats: int, warmup: int) -> list[dict]:
    """Every CPU kernel x activation dtype x M on one shape, prepared once, vs dense fp32 / bf16 torch.matmul."""
    out_f, in_f = map(int, shape.split("x"))
    w = torch.randn(out_f, in_f) * 0.02
    rows = []
    for m in ms:
        x32 = torch.randn(m, in_f)
        dense = {dt: _median_ms(lambda xd=x32.to(dt), wd=w.to(dt): torch.matmul(xd, wd.t()), repeats, warmup)
                 for dt in ACT_DTYPES}
        for name, (bits, group, sym) in CPU_VARIANTS.items():
            mod = build_cpu(w, bits, group, sym)
            args = (mod.meta, mod.qweight, mod.scales, mod.qzeros, None)
            bufs = dict(zip(("qweight", "scales", "qzeros", "g_idx", "bias"), (*args[1:], None)))
            for kind in (*cpu_packed.KERNELS, PANELS, "torch_ref"):
                if not _can_time(kind, bits, group) or (kind == "torch_ref" and (name not in REF_VARIANTS or m > 1)):
                    continue
                for dt in ACT_DTYPES:
                    x = x32.to(dt)
                    pick = dispatch.choose(_cpu_key(mod, dt))[0].name
                    panels = cpu_panels.use_panels(pick, m, dt)
                    if kind == "torch_ref":
                        fn, refused = (lambda: wa16_ref(x, *args, None)), ""
                    elif kind == PANELS:
                        fn = lambda: cpu_panels.linear(x, mod.meta, bufs)  # noqa: E731
                        refused = "" if panels else f"{pick} runs these rows itself"
                    else:
                        refused = cpu_packed.WHY_NOT[kind](_cpu_key(mod, dt)) or ""
                        if refused and m > 16:  # refused kernels are slow on many rows: timed up to M = 16 only
                            continue
                        prep = cpu_packed.prepare(kind, *args, dt)
                        fn = lambda: cpu_packed.LINEAR[kind](x, prep, None)  # noqa: E731
                    ts = _times_ms(fn, repeats, warmup)
                    t = statistics.median(ts)
                    rows.append({"variant": name, "M": m, "kernel": kind, "dtype": str(dt)[6:], "ms": t,
                                 "min_ms": min(ts),
                                 "vs_fp32": dense[torch.float32] / t, "vs_bf16": dense[torch.bfloat16] / t,
                                 "dense_fp32_ms": dense[torch.float32], "dense_bf16_ms": dense[torch.bfloat16],
                                 "refused": refused,
                                 "chosen": panels if kind == PANELS else (kind == pick and not panels)})
    return rows


def _cpu_key(mod: QuantLinear, dt: torch.dtype) -> dispatch.LayerKey:
    """What the kernel registry sees of `mod` called on CPU with `dt` activations."""
    return dispatch.LayerKey(mod.meta, mod.mode, torch.device("cpu"), dt, mod.g_idx is not None)


COLD_VARIANTS = ("w4_g128", "w8_perchannel")
COLD_MAX_M = 16  # the cold table times decode-sized calls (the kernel alone, as a decode step runs it)


@torch.no_grad()
def bench_cpu_cold(shape: str, ms: list[int], repeats: int, warmup: int, cold_mib: int) -> list[dict]:
    """Dispatch's kernel and the dense matmul, each call on the next of n copies of the layer (n x bytes >=
    cold_mib), so the weights stream from DRAM as in a model's decode step instead of staying in the L3 cache."""
    out_f, in_f = map(int, shape.split("x"))
    w = torch.randn(out_f, in_f) * 0.02
    rows = []
    for dt in ACT_DTYPES:
        dense = _copies(w.to(dt), cold_mib)
        for name in COLD_VARIANTS:
            mod = build_cpu(w, *CPU_VARIANTS[name])
            kind = dispatch.choose(_cpu_key(mod, dt))[0].name
            if kind not in cpu_packed.KERNELS:
                raise RuntimeError(f"cold table: dispatch picks {kind} for {name} {dt}, not a CPU kernel "
                                   "(QRESEARCH_KERNELS set?); pass --cold-mib 0 to skip the table")
            preps = _copies(cpu_packed.prepare(kind, mod.meta, mod.qweight, mod.scales, mod.qzeros, None, dt),
                            cold_mib)
            for m in ms:
                x = torch.randn(m, in_f).to(dt)
                t_q = _median_ms(_cycle([lambda p=p: cpu_packed.LINEAR[kind](x, p, None) for p in preps]),
                                 repeats, warmup)
                t_d = _median_ms(_cycle([lambda wd=wd: torch.matmul(x, wd.t()) for wd in dense]), repeats, warmup)
                rows.append({"variant": name, "M": m, "dtype": str(dt)[6:], "kernel": kind, "copies": len(preps),
                             "ms": t_q, "dense_copies": len(dense), "dense_ms": t_d, "speedup": t_d / t_q})
    return rows


def _nbytes(obj) -> int:
    """Bytes of a tensor, or of the tensors a prepared-layer dataclass holds."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return sum(_nbytes(v) for f in dataclasses.fields(obj) if isinstance(v := getattr(obj, f.name), torch.Tensor))


def _copies(obj, total_mib: int) -> list:
    """At least two, and enough independent copies of a tensor / prepared layer to fill total_mib."""
    n = max(2, -(-total_mib * 2**20 // _nbytes(obj)))
    if isinstance(obj, torch.Tensor):
        return [obj.clone() for _ in range(n)]
    return [dataclasses.replace(obj, **{f.name: getattr(obj, f.name).clone() for f in dataclasses.fields(obj)
                                        if isinstance(getattr(obj, f.name), torch.Tensor)}) for _ in range(n)]


def _cycle(fns: list):
    it = itertools.cycle(fns)
    return lambda: next(it)()


def cold_markdown(rows: list[dict], shape: str, cold_mib: int) -> list[str]:
    lines = ["", f"## Cold weights on {shape}: every call on the next of n layer copies (>= {cold_mib} MiB in all)",
             "", f"A layer's int4 / int8 weights can stay in the L3 cache ({_l3()}) across the repeats of the table "
             "above while its fp32 copy may not (4096x4096: 8 / 16 vs 64 MiB); here both stream from DRAM, as in a "
             "model's decode step.", "",
             "| variant | M | act dtype | kernel (dispatch) | copies | ms | dense copies | dense ms | speedup |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['M']} | {r['dtype']} | {r['kernel']} | {r['copies']} | {r['ms']:.3f} | "
                     f"{r['dense_copies']} | {r['dense_ms']:.3f} | {r['speedup']:.2f}x |")
    return lines


def _l3() -> str:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return "size unknown"


def _times_ms(fn, repeats: int, warmup: int) -> list[float]:
    return [t * 1e3 for t in timed(fn, torch.device("cpu"), repeats, warmup)]


def _median_ms(fn, repeats: int, warmup: int) -> float:
    return statistics.median(_times_ms(fn, repeats, warmup))


def build_cpu(w: torch.Tensor, bits: int, group: int, sym: bool) -> QuantLinear:
    q = quantize_tensor(w, weight_spec(bits, group, sym))
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return QuantLinear.from_result(lin, LayerResult(q))


def candidates_markdown(rows: list[dict], shape: str) -> list[str]:
    """Per (variant, M, activation dtype): each kernel's time, the fastest (bold) and dispatch's pick."""
    lines = ["", f"## CPU kernel candidates on {shape} (each kernel forced, weights prepared once)", "",
             "Speedups are over the dense torch.matmul of the same M in fp32 and in bf16. `refused`: why dispatch "
             "does not pick that kernel for that activation dtype (it still computes the layer correctly). "
             "**bold** = fastest kernel for that variant, M and activation dtype; `<- dispatch` = what a packed "
             "layer runs (dispatch's kernel, or `panels`: dequantized weight panels + the dense matmul, which "
             "cpu_packed.run takes for many rows where that is faster). Refused kernels are timed up to M = 16.",
             "ms = median (min) of the repeats; on a shared machine a parallel region can wait a whole scheduler "
             "slice for a preempted thread (the ~8 ms steps), so the min shows the uncontended time.",
             "", "| variant | M | act dtype | kernel | ms (min) | vs dense fp32 | vs dense bf16 | note |",
             "|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        key = (r["variant"], r["M"], r["dtype"])
        best[key] = min(best.get(key, float("inf")), r["ms"])
    for r in rows:
        win = r["ms"] == best[(r["variant"], r["M"], r["dtype"])]
        name = f"**{r['kernel']}**" if win else r["kernel"]
        note = "<- dispatch" if r["chosen"] else (f"refused: {r['refused']}" if r["refused"] else "")
        lines.append(f"| {r['variant']} | {r['M']} | {r['dtype']} | {name} | {r['ms']:.3f} ({r['min_ms']:.3f}) | "
                     f"{r['vs_fp32']:.2f}x | {r['vs_bf16']:.2f}x | {note} |")
    dense = {(r["M"]): (r["dense_fp32_ms"], r["dense_bf16_ms"]) for r in rows}
    lines += ["", "Dense torch.matmul on this shape: " + "; ".join(
        f"M={m}: fp32 {f:.3f} ms, bf16 {b:.3f} ms" for m, (f, b) in sorted(dense.items()))]
    return lines


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def commit_label() -> str:
    """Short HEAD commit, with ' +dirty' when tracked files outside results/ differ from it."""
    dirty = _sh(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"])
    return _sh(["git", "rev-parse", "--short", "HEAD"]) + (" +dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def cpu_detail() -> str:
    """cpu_name() with what tells such CPUs apart when the model name is generic ('AMD EPYC' on a VM): family and
    model numbers and the vector extensions the kernels use (tables from different sessions may come from
    different CPUs under one name)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
    except OSError:
        return cpu_name()
    flags = set(info.get("flags", "").split())
    ext = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    ident = ", ".join(f"{k} {info[k]}" for k in ("cpu family", "model") if k in info)
    return f"{cpu_name()} ({'; '.join(x for x in (ident, ' '.join(ext)) if x)})"


def _cpu_lines(args) -> list[str]:
    """What a CPU number depends on: cores, threads, load, the kernels' own build."""
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    return ["**CPU run: the packed layers run the CPU low-bit kernels of qresearch/kernels/cpu_packed.py (named per "
            "row), not the Triton kernels. The GPU goals (W4A16 g128 >= 3.5x fp16 at M=1 and >= 2.5x at M=16 on "
            "4096x11008, W8A8 >= 1.5x at M=2048) were NOT measured here: no GPU.** The CPU goal is packed W4 g128 at "
            "M=1 on 4096x4096 at least as fast as the dense fp32 matmul.", "",
            f"- machine: {os.cpu_count()} CPU cores ({cpu_detail()}), torch threads {torch.get_num_threads()}; "
            f"load average at start (1/5/15 min) {load}; {args.load_note}",
            f"- command: python experiments/bench_kernels.py {' '.join(sys.argv[1:])}",
            f"- C kernel: {cpu_packed.cpu_lowbit.SRC.name} built with {os.environ.get('CC', 'cc')} "
            f"{' '.join(cpu_packed.cpu_lowbit.flags())}; {cpu_packed.cpu_lowbit.load()[1] or 'loaded'}; its loop per "
            f"call (in brackets): fused tiles below M = {cpu_packed.cpu_lowbit.MANY_M}, from there the many-row loop "
            "(AVX-512 builds; panels + dense matmul on others)"]


def write_markdown(rows: list[dict], device, dtype, copy_bw: float, args, cand_rows=(), cold_rows=()) -> Path:
    """The table + protocol as markdown in results/kernels_<device>.md (or --out)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_name()}"
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    lines = [f"# Kernel benchmark on {name}", ""]
    if device.type != "cuda":
        lines += _cpu_lines(args)
    import triton  # noqa: F401  (version only)

    lines += [f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}, commit {commit_label()}",
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
    if cand_rows:
        lines += candidates_markdown(list(cand_rows), args.candidates)
    if cold_rows:
        lines += cold_markdown(list(cold_rows), args.candidates, args.cold_mib)
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
    ap.add_argument("--candidates", default="4096x4096",
                    help="CPU: shape for the per-kernel candidates table ('none' skips it)")
    ap.add_argument("--candidate-m", nargs="+", type=int, default=[1, 16], help="CPU: M values of that table")
    ap.add_argument("--cold-mib", type=int, default=128, help="CPU: bytes of layer copies cycled in the cold table "
                    "(0 skips it)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    ap.add_argument("--load-note", default="other processes may share the cores",
                    help="CPU: what else ran on the machine (written under the table)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
    cand = [] if gpu or args.candidates == "none" else \
        bench_cpu_candidates(args.candidates, args.candidate_m, args.repeats, args.warmup)
    cold = [] if gpu or args.candidates == "none" or not args.cold_mib else \
        bench_cpu_cold(args.candidates, [m for m in args.candidate_m if m <= COLD_MAX_M], args.repeats, args.warmup,
                       args.cold_mib)
    out = write_markdown(rows, device, dtype, copy_bw, args, cand, cold)
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
