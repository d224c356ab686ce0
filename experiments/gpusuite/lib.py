"""The GPU suite's calls into qresearch internals, gathered in one file (two marked imports live elsewhere).

The library is being refactored (kernel dispatch -> registry, QuantSpec format table, `format=fake|packed`
renamed); each function below is one marked call site (`# LIBRARY:`), so adapting the suite means editing this
file, plus the two other marked imports (qresearch.eval.latency in e2e.py and env.py) and the benchmark builders
in experiments/bench_kernels.py (kernels.py). Nothing here imports triton at module level (the kernels do, when
first launched).
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import Counter

import torch

import methods.gptq_solver as gptq_solver  # LIBRARY: GPTQ solve (INT_LOOP: the int column loop on or off)
from methods.gptq import GPTQ  # LIBRARY: GPTQ method
from qresearch.calib.blockio import capture_inputs  # LIBRARY: block-0 input capture
from qresearch.calib.stats import input_stats  # LIBRARY: per-linear Hessians over a block's inputs
from methods.rtn import RTN  # LIBRARY: round-to-nearest method (weights, optional int8 activations)
from qresearch.kernels import reference as ref  # LIBRARY: pure-torch reference kernels
from qresearch.method import Context  # LIBRARY: method interface
from qresearch.models.arch import arch_for, blocks_of  # LIBRARY: architecture table
from qresearch.nn.packed import QuantLinear  # LIBRARY: packed module (kernel_name, weight_bytes)
from qresearch.nn.swap import swap_linears  # LIBRARY: result -> modules
from qresearch.quant import quantize_tensor, weight_spec  # LIBRARY: RTN primitives
from qresearch.quant.packing import PackedMeta, pack_rows, pack_zeros  # LIBRARY: int32_k storage layout

PACKED_FORMAT = "packed"  # LIBRARY: swap_linears modules kind of the real-kernel modules
KERNEL_ENV = "QRESEARCH_KERNELS"  # LIBRARY: dispatch override (auto | torch | triton)
# e2e variants -> RTN settings (LIBRARY: RTN constructor arguments)
RTN_VARIANTS = {"w4_g128": dict(bits=4, group_size=128, sym=False),
                "w8a8": dict(bits=8, group_size=-1, sym=True, act_bits=8, act_granularity="token")}


def forced_kernels(backend: str):
    """Run packed layers on `backend` ('torch' = the reference) inside the block; dispatch reads the variable per
    call."""
    return _env(KERNEL_ENV, backend)


@contextlib.contextmanager
def _env(name: str, value: str):
    """The environment variable `name` set to `value` inside the block, restored after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def prefill_path(path: str):
    """Calls of M > 16 tokens take `path` (auto | dequant | fused) inside the block."""
    return _env("QRESEARCH_PREFILL", path)  # LIBRARY: read per call by kernels/triton_dequant.py


@contextlib.contextmanager
def small_m_path(path: str):
    """Calls of M <= 16 tokens take `path` (splitk | gemv | small | gemv-i2f) inside the block; gemv-i2f: the
    GEMV with int-to-float conversions of its codes instead of its default logic-and-add unpacking."""
    env = {"QRESEARCH_SMALL_M": "gemv", "QRESEARCH_GEMV_MAGIC": "0"} if path == "gemv-i2f" else \
        {"QRESEARCH_SMALL_M": path}  # LIBRARY: read per call by kernels/dispatch.py and kernels/triton_gemv.py
    with contextlib.ExitStack() as stack:
        for name, value in env.items():
            stack.enter_context(_env(name, value))
        yield


def act_order_path(path: str):
    """Act-order layers take `path` (permute | gather) inside the block."""
    return _env("QRESEARCH_ACT_ORDER", path)  # LIBRARY: read per call by kernels/dispatch.py


def act_order_kernel(x, meta, bufs, bias, tiles: dict):
    """An act-order layer as QRESEARCH_ACT_ORDER=permute runs it: codes permuted once to contiguous groups
    (kernels/prepared.py), x[:, perm], then a fixed-tile contiguous-group kernel for this M (tiles: the
    correctness section's gemv2 / gemv / small2 / splitk / prefill tiles; fixed tiles keep the case free of
    autotuning)."""
    from qresearch.kernels.prepared import permuted_act_order  # LIBRARY: the act-order permutation
    from qresearch.kernels.triton_small import supports  # LIBRARY: triton_small's layer check

    permuted = permuted_act_order(meta, bufs)
    if permuted is None:
        raise ValueError("g_idx is no clean act-order assignment: it cannot be permuted")
    perm, qweight = permuted
    xp, bp = x.index_select(1, perm), {**bufs, "qweight": qweight, "g_idx": None}
    m = x.shape[0]
    if m == 1 and 32 % meta.bits == 0:
        return gemv_kernel(xp, meta, bp, bias, tiles["gemv2"])
    if 1 < m <= 16 and supports(meta, False, m) is None:
        return small_kernel(xp, meta, bp, bias, tiles["small2"])
    return wq_kernel(xp, meta, bp, bias, tiles["gemv" if m == 1 else "splitk" if m <= 16 else "prefill"])


def pack_random_layer(n: int, k: int, bits: int, group: int, sym: bool, act_order: bool, scale_dtype: torch.dtype,
                      gen: torch.Generator) -> tuple[PackedMeta, dict]:
    """RTN-quantize a random weight [n, k] and pack it: (meta, buffers qweight/scales/qzeros/g_idx) on the CPU.

    act_order: every input column gets the group of a random permutation of the contiguous assignment.
    """
    w = torch.randn(n, k, generator=gen)
    q = quantize_tensor(w, weight_spec(bits, group, sym))
    meta = PackedMeta(bits, q.spec.group_for(k), k, n, sym)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(k) // meta.group)[torch.randperm(k, generator=gen)].to(torch.int32)  # [k]
    bufs = {"qweight": pack_rows(q.codes, bits), "scales": q.scale.to(scale_dtype),
            "qzeros": None if sym else pack_zeros(q.zero, bits), "g_idx": g_idx}
    return meta, bufs


def dequant_weight64(meta: PackedMeta, bufs: dict) -> torch.Tensor:
    """The weight [n, k] the packed buffers encode, float64 (exact: codes times 16-bit scales)."""
    return ref.dequant_weight(meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["g_idx"]).double()


def wa16_reference(x, meta, bufs, bias):
    return ref.wa16_ref(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["g_idx"], bias)


def w8a8_reference(x, meta, bufs, bias, static):
    return ref.w8a8_ref(x, meta, bufs["qweight"], bufs["scales"], bias, static)


def w8a8_truth64(x, meta, bufs, bias, static) -> torch.Tensor:
    """Exact W8A8 semantics in float64: the reference's int8 activations and scales, exact integer products."""
    xq, sx = ref.act_quant_ref(x, static)
    wq = ref.int8_weight(meta, bufs["qweight"])
    y = (xq.double() @ wq.double().t()) * sx.double()[:, None] * bufs["scales"].double().reshape(1, -1)  # [M, N]
    return y if bias is None else y + bias.double()


def act_quant_reference(x):
    return ref.act_quant_ref(x)


def wq_kernel(x, meta, bufs, bias, block):
    """The Triton W{2..8}A16 kernel with a fixed tile (block=None: the autotuned production launch)."""
    from qresearch.kernels.triton_wq import wq_linear  # LIBRARY: Triton weight-only GEMM / split-K GEMV

    return wq_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["g_idx"], bias, block)


def gemv_kernel(x, meta, bufs, bias, block):
    """The Triton one-token GEMV with a fixed tile (block=None: tuned per shape)."""
    from qresearch.kernels.triton_gemv import wq_gemv  # LIBRARY: Triton M = 1 GEMV

    return wq_gemv(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bias, block)


def small_kernel(x, meta, bufs, bias, block):
    """triton_small's kernels (M <= 16) with a fixed DOT_CONFIGS / WIDE_CONFIGS tuple (None: tuned per shape)."""
    from qresearch.kernels.triton_small import small_m_linear  # LIBRARY: Triton small-M kernels

    return small_m_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bias, block)


def dequant_kernel(x, meta, bufs, bias):
    """Prefill as the Triton dequantize kernel then the dense GEMM."""
    from qresearch.kernels.triton_dequant import dequant_linear  # LIBRARY: Triton dequantize + dense GEMM

    return dequant_linear(x, meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["g_idx"], bias)


def w8a8_kernel(x, meta, bufs, bias, static, block):
    from qresearch.kernels.triton_w8a8 import w8a8_linear  # LIBRARY: Triton int8 GEMM

    return w8a8_linear(x, meta, bufs["qweight"], bufs["scales"], bias, static, block)


def act_quant_kernel(x):
    from qresearch.kernels.triton_w8a8 import act_quant  # LIBRARY: Triton per-token int8 quantization

    return act_quant(x)


def rtn_packed(model, variant: str, device: torch.device) -> dict[str, str]:
    """Quantize `model`'s block linears with RTN `variant` and swap in packed modules; {linear: kernel name}."""
    ctx = Context(calib=None, arch=arch_for(model), device=device)
    result = RTN(**RTN_VARIANTS[variant]).quantize(model, ctx)
    used = swap_linears(model, result, PACKED_FORMAT)
    del result
    return used


def kernel_counts(model) -> dict[str, int]:
    """How many packed linears run each kernel (for inputs in the model's dtype on its device)."""
    return dict(Counter(m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)))


def gptq_method(batch_size: int) -> GPTQ:
    """GPTQ w4 g128 asym, everything on the compute device (offload off: one block fits)."""
    return GPTQ(bits=4, group_size=128, sym=False, offload=False, batch_size=batch_size)


def gptq_context(model, calib: torch.Tensor, device: torch.device) -> Context:
    return Context(calib=calib, arch=arch_for(model), device=device)


def capture_block0(model, calib: torch.Tensor, device: torch.device, batch_size: int):
    """What block 0 receives for every calibration batch (hidden states + kwargs)."""
    return capture_inputs(model, arch_for(model), calib, device, batch_size)


def block0_hessians(model, io) -> dict[str, torch.Tensor]:
    """H of the first linear of every input group of block 0 (q, o, gate, down on Llama) in one pass over `io`."""
    arch = arch_for(model)
    stats = input_stats(blocks_of(model, arch)[0], io, [grp[0] for grp in arch.sequential])
    return {name: st.hessian for name, st in stats.items()}


@contextlib.contextmanager
def gptq_int_loop(on: bool):
    """GPTQ solves inside take the int format's own column loop (on: the Triton kernel on CUDA, C on CPU) or the
    format path's torch ops (off); the default (on) comes back after."""
    gptq_solver.INT_LOOP = on
    try:
        yield
    finally:
        gptq_solver.INT_LOOP = True


def gptq_exact_solve(W: torch.Tensor, H: torch.Tensor, act_order: bool):
    """Our GPTQ solve as the reference configures its own (w4 g128 asym, blocksize 128, percdamp 0.01, the exact
    inverse factor) -> (codes, scale, zero, dequantized W), on W's device."""
    q, _ = gptq_solver.gptq_quantize(W, H, weight_spec(4, 128, False), 128, 0.01, act_order)
    return q.codes, q.scale, q.zero, q.dequantize()


LOOP_AB_LAYERS = ("self_attn.q_proj", "mlp.down_proj")  # 4096 and 11008 inputs on Llama-2-7B


def gptq_loop_ab(model, hs: dict[str, torch.Tensor], layers=LOOP_AB_LAYERS) -> list[dict]:
    """One GPTQ solve (w4 g128 asym) per layer of block 0, with its Hessian from `hs`, through the int format's own
    column loop (the Triton kernel on CUDA, C on CPU; one untimed solve first compiles it) and through the format
    path's torch ops: seconds of each and whether codes, scales and zeros are identical."""
    blk, spec, rows = blocks_of(model, arch_for(model))[0], weight_spec(4, 128, False), []
    dev = next(model.parameters()).device

    def solve(W, H, int_loop: bool):
        with gptq_int_loop(int_loop):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            q, _ = gptq_solver.gptq_quantize(W, H, spec)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return q, time.perf_counter() - t0

    for name in layers:
        W, H = blk.get_submodule(name).weight.detach(), hs[name]
        solve(W, H, True)  # compiles the Triton kernel for this shape (CUDA)
        (q_loop, s_loop), (q_fmt, s_fmt) = solve(W, H, True), solve(W, H, False)
        same = all(torch.equal(getattr(q_loop, k), getattr(q_fmt, k)) for k in ("codes", "scale", "zero"))
        rows.append({"layer": name, "shape": list(W.shape), "loop": "triton" if dev.type == "cuda" else "c",
                     "int_loop_s": s_loop, "format_path_s": s_fmt, "speedup": s_fmt / s_loop, "identical": same})
    return rows


DEVICE_RTN_SPECS = ((4, 128, False, None, "int"), (3, 128, True, None, "int"), (8, -1, True, None, "int"),
                    (4, 32, False, 8, "int"), (8, 128, True, None, "fp8_e4m3"))


def device_rtn_row(device: torch.device) -> dict:
    """Correctness row: RTN qparams and codes of a random 512 x 1152 weight fitted on `device` equal those fitted
    on the CPU, bit for bit (int w4 g128 asym, w3 g128 sym, w8 per-channel, w4 g32 with 8-bit channel-level
    scales; fp8 e4m3 g128). It fails where a scale is a tensor divided by a Python number: CUDA multiplies by the
    reciprocal."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(512, 1152, generator=g) * torch.linspace(0.005, 0.05, 1152)
    bad = []
    for bits, group, sym, sbits, fmt in DEVICE_RTN_SPECS:
        spec = weight_spec(bits, group, sym, fmt, scale_bits=sbits)
        a, b = quantize_tensor(W, spec), quantize_tensor(W.to(device), spec)
        bad += [f"{fmt} w{bits} g{group} {'sym' if sym else 'asym'}{f' s{sbits}' if sbits else ''} {k}"
                for k in ("codes", "scale", "zero") if not torch.equal(getattr(a, k), getattr(b, k).cpu())]
    return {"case": f"RTN qparams + codes on the device vs CPU ({len(DEVICE_RTN_SPECS)} specs)",
            "family": "rtn_device", "path": "torch", "bits": 4, "group": 128, "max_abs": 0.0, "rel": float(len(bad)),
            "ref_rel": 0.0, "tol": 0.0, "status": "FAIL" if bad else "PASS",
            "note": f"differ: {', '.join(bad)}" if bad else "codes, scales, zeros bit-identical to the CPU's"}


def gptq_loop_row(device: torch.device) -> dict:
    """Correctness row for GPTQ's column loop on `device`: a w4 g128 solve of a random 256 x 512 weight (correlated
    inputs) through the int loop (the Triton kernel on CUDA, C on CPU) and through the format path's torch ops.
    PASS = identical codes, scales and zeros."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 512, generator=g) * torch.linspace(0.2, 3.0, 512)
    X[:, 1:] += 0.5 * X[:, :-1]
    W, H = (torch.randn(256, 512, generator=g) * 0.02).to(device), (X.T @ X / X.shape[0]).to(device)
    spec, out = weight_spec(4, 128, False), []
    for int_loop in (True, False):
        with gptq_int_loop(int_loop):
            out.append(gptq_solver.gptq_quantize(W, H, spec)[0])
    (a, b), loop = out, "triton" if device.type == "cuda" else "c"
    same = {k: bool(torch.equal(getattr(a, k), getattr(b, k))) for k in ("codes", "scale", "zero")}
    diff = int((a.codes != b.codes).sum())
    ok = all(same.values())
    note = f"{loop} loop vs the format path: codes, scales, zeros bit-identical" if ok else \
        f"identical: {same}; {diff} codes differ"
    return {"case": "gptq column loop w4 g128 asym 256x512", "family": "gptq_loop", "path": loop, "bits": 4,
            "group": 128, "max_abs": float((a.codes.float() - b.codes.float()).abs().max()),
            "rel": diff / a.codes.numel(), "ref_rel": 0.0, "tol": 0.0, "status": "PASS" if ok else "FAIL",
            "note": note}
