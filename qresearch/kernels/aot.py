"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets without a GPU (Triton's bundled ptxas).

`compile_job(job, arch)` lowers one kernel config to a cubin for sm_<arch> with the specialization a real launch
on Llama-shaped layers gets, and reads registers, stack (spills), shared memory and the tensor-core instruction
family. Used by experiments/compile_kernels.py and the compile tests.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per CTA (bytes), CUDA guide
WQ_INTS = ["M", "N", "K", "stride_xm", "stride_qw", "stride_s", "stride_z", "stride_ym", "M_BUCKET"]
WQ_PTRS = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "gidx_ptr": "*i32",
           "b_ptr": "*fp16", "y_ptr": "*fp16", "p_ptr": "*fp32", "cnt_ptr": "*i32"}  # split-K partials, counters
# weight variants compiled for the wq kernels: (label, BITS, SYM, HAS_GIDX)
WQ_VARIANTS = {"w4 asym": (4, False, False), "w3 asym": (3, False, False), "w8 asym": (8, False, False),
               "w2 asym": (2, False, False), "w4 sym": (4, True, False), "w4 asym act-order": (4, False, True)}


@dataclass(frozen=True)
class Job:
    kernel: str  # wq_prefill | wq_decode | w8a8_gemm | act_quant
    variant: str
    fn: object
    signature: dict
    constants: dict
    num_warps: int
    num_stages: int
    options: dict = field(default_factory=dict)  # more compile options, as the launch passes them

    def config(self) -> str:
        keys = [k for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_KW", "BLOCK_B", "BLOCK_O", "NG", "SUB", "SPLIT_K",
                            "XPERM", "BLOCK")
                if k in self.constants]
        return " ".join(f"{k.replace('BLOCK_', 'B').replace('SPLIT_K', 'SK')}={self.constants[k]}" for k in keys) \
            + f" w={self.num_warps} s={self.num_stages}"


def wq_jobs(kind: str, variants: list[str]) -> list[Job]:
    """One job per (autotune config, weight variant) of the weight-only GEMM."""
    from qresearch.kernels import triton_wq as k

    configs = k.PREFILL_CONFIGS if kind == "wq_prefill" else k.DECODE_CONFIGS
    jobs = []
    for v in variants:
        bits, sym, gidx = WQ_VARIANTS[v]
        for c in configs:
            const = dict(GROUP=128, BITS=bits, SYM=sym, HAS_GIDX=gidx, HAS_BIAS=False, **c.kwargs)
            sig = {**WQ_PTRS, **{n: "i32" for n in WQ_INTS}, **{n: "constexpr" for n in const}}
            jobs.append(Job(kind, v, k.wq_matmul_kernel, sig, const, c.num_warps, c.num_stages))
    return jobs


def gemv_jobs(variants: list[str]) -> list[Job]:
    """One job per (tile config, weight variant) of the M = 1 GEMV (2/4/8 bits, g128)."""
    from qresearch.kernels import triton_gemv as k

    ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "b_ptr": "*fp16",
            "y_ptr": "*fp16", "p_ptr": "*fp32", "cnt_ptr": "*i32"}  # split-K: fp32 partials, arrival counters
    ints = ["N", "K", "stride_qw", "stride_s", "stride_z"]
    jobs = []
    for v in variants:
        bits, sym, gidx = WQ_VARIANTS[v]
        if gidx or 32 % bits:
            continue
        for c in k.CONFIGS:
            kw = dict(c.kwargs)
            const = dict(GROUP=128, BITS=bits, SYM=sym, HAS_BIAS=False, BLOCK_N=kw["BLOCK_N"],
                         BLOCK_KW=kw["BLOCK_K_CODES"] * bits // 32, SPLIT_K=kw["SPLIT_K"], EVEN_K=True, MAGIC=True)
            sig = {**ptrs, **{n: "i32" for n in ints}, **{n: "constexpr" for n in const}}
            jobs.append(Job("wq_gemv", v, k.wq_gemv_kernel, sig, const, c.num_warps, c.num_stages))
    return jobs


def small_jobs(variants: list[str]) -> list[Job]:
    """One job per (tile config, weight variant) of the small-M kernels (triton_small.py; 2/4/8 bits, g128)."""
    from qresearch.kernels import triton_small as k
    from qresearch.quant.packing import PackedMeta

    ptrs = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "b_ptr": "*fp16",
            "y_ptr": "*fp16", "p_ptr": "*fp32", "cnt_ptr": "*i32"}
    jobs = []
    for v in variants:
        bits, sym, gidx = WQ_VARIANTS[v]
        if gidx or 32 % bits:
            continue
        meta = PackedMeta(bits=bits, group=128, in_features=4096, out_features=4096, sym=sym)
        for kernel in ("wide", "dot"):
            if k.supports(meta, False, 1 if kernel == "wide" else 16) is not None:
                continue
            for c in k.configs(kernel, meta):
                a = k._wide_args(meta, c) if kernel == "wide" else k._dot_args(meta, c)
                warps, stages = (c[3], 3) if kernel == "wide" else (c[2], c[3])
                const = dict(GROUP=128, BITS=bits, SYM=sym, HAS_BIAS=False, **a)
                ints = ["N", "K", "stride_xp", "stride_qw", "stride_s", "stride_z"] if kernel == "wide" else \
                    ["M", "N", "K", "stride_xi", "stride_xm", "stride_qw", "stride_s", "stride_z", "stride_ym"]
                x_t = "*fp32" if kernel == "wide" and a["XPERM"] else "*fp16"
                sig = {**ptrs, "x_ptr": x_t, **{n: "i32" for n in ints},
                       **{n: "constexpr" for n in const}}
                fn = k.gemv_wide_kernel if kernel == "wide" else k.skinny_dot_kernel
                jobs.append(Job(f"small_{kernel}", v, fn, sig, const, warps, stages))
    return jobs


def w8a8_jobs() -> list[Job]:
    from qresearch.kernels import triton_w8a8 as k

    ptrs = {"xq_ptr": "*i8", "w_ptr": "*u8", "sx_ptr": "*fp32", "sw_ptr": "*fp16", "b_ptr": "*fp16",
            "y_ptr": "*fp16"}
    ints = ["M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "M_BUCKET"]
    jobs = []
    for c in k.CONFIGS:
        const = dict(HAS_BIAS=False, EVEN_K=True, **c.kwargs)  # Llama K (4096, 11008): multiples of BLOCK_K
        sig = {**ptrs, **{n: "i32" for n in ints}, **{n: "constexpr" for n in const}}
        jobs.append(Job("w8a8_gemm", "w8a8 per-token x per-channel", k.int8_matmul_kernel, sig, const, c.num_warps,
                        c.num_stages))
    sig = {"x_ptr": "*fp16", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32", "stride_qm": "i32",
           "BLOCK": "constexpr"}
    jobs.append(Job("act_quant", "per-token int8, two passes", k.act_quant_kernel, sig, {"BLOCK": k.TWO_PASS_BLOCK},
                    8, 1))
    jobs.append(Job("act_quant", "per-token int8, one pass", k.act_quant_kernel, sig, {"BLOCK": k.ONE_PASS_MAX}, 8, 1))
    return jobs


def dequant_jobs(variants: list[str]) -> list[Job]:
    """The prefill dequantize kernel (triton_dequant.py) per weight variant, g128, its launch tile."""
    from qresearch.kernels import triton_dequant as k

    ptrs = {"qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "gidx_ptr": "*i32", "w_ptr": "*fp16"}
    ints = ["N", "K", "stride_qw", "stride_s", "stride_z", "stride_w"]
    jobs = []
    for v in variants:
        bits, sym, gidx = WQ_VARIANTS[v]
        const = dict(GROUP=128, BITS=bits, SYM=sym, HAS_GIDX=gidx, BLOCK_K=64, BLOCK_N=128)
        sig = {**ptrs, **{n: "i32" for n in ints}, **{n: "constexpr" for n in const}}
        jobs.append(Job("dequant", v, k.dequant_kernel, sig, const, 4, 1))
    return jobs


def gptq_jobs() -> list[Job]:
    """GPTQ's column loop (triton_gptq.py) at blocksize 128, launched as the solver does: FMA contraction off."""
    from qresearch.kernels import triton_gptq as k

    ptrs = {n: "*fp32" for n in ("wt_ptr", "qt_ptr", "et_ptr", "h_ptr", "s_ptr", "z_ptr")}
    ints = {n: "i32" for n in ("h0", "h1", "ss", "zs", "OUT", "B", "A", "E")}
    const = dict(BLOCK_B=128, BLOCK_O=k.BLOCK_O)
    sig = {**ptrs, **ints, "maxq": "fp32", **{n: "constexpr" for n in const}}
    return [Job("gptq_columns", "int, per-row qparams", k.gptq_columns_kernel, sig, const, 4, 1,
                {"enable_fp_fusion": False})]


def aligned_attrs(job: Job) -> dict:
    """The specialization Triton's JIT gives a launch on Llama-shaped layers: every pointer 16-byte aligned and
    every size/stride divisible by 16 (tt.divisibility=16; it decides vectorized loads), except the token count M."""
    names = list(job.fn.arg_names)
    return {(names.index(n),): [["tt.divisibility", 16]] for n, t in job.signature.items()
            if t != "constexpr" and n not in ("M", "M_BUCKET")}


def tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED (static) of the cubin's kernel, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool("cuobjdump")), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump printed no resource usage: {out[-300:]}")
    return {k.lower(): int(v) for k, v in fields.items()}


def sass(cubin: bytes) -> str:
    """The cubin's SASS (cuobjdump -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool("cuobjdump")), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_body(sass_text: str) -> list[str]:
    """Instructions of the largest loop of the SASS (the span of its longest backward branch), empty when there is
    no loop: the main loop of a kernel."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][^;]*);", sass_text, re.M)]
    spans = [(int(t.group(1), 16), a) for a, text in ins if text.startswith("BRA")
             for t in [re.search(r"0x([0-9a-f]+)", text)] if t and int(t.group(1), 16) < a]
    if not spans:
        return []
    lo, hi = max(spans, key=lambda p: p[1] - p[0])
    return [text for a, text in ins if lo <= a <= hi]


def loop_instructions(sass_text: str) -> int:
    """The main loop's static size, a proxy for issue cost where a kernel is instruction-bound (0: no loop)."""
    return len(loop_body(sass_text))


def loop_opcodes(sass_text: str) -> dict[str, int]:
    """Opcode counts of the main loop (e.g. LDG.E.U16: 2-byte global loads), most frequent first."""
    counts: dict[str, int] = {}
    for text in loop_body(sass_text):
        op = text.split()[0]
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def tensor_core_op(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def sync_ops(ptx: str) -> dict:
    """The synchronisation a split-K reduction needs, as the PTX spells it: atomics, CTA barriers, L2-only loads."""
    return {"atomics": sorted(set(re.findall(r"\batom\.[\w.]+", ptx))),
            "barrier": bool(re.search(r"\bbar(rier)?\.sync\b", ptx)), "ld_cg": "ld.global.cg" in ptx}


def compile_job(job: Job, arch: int, maxnreg: int | None = None, opcodes: bool = False) -> dict:
    """Compile `job` for sm_<arch>; `maxnreg` caps registers per thread (to see spills appear); `opcodes`: also the
    main loop's opcode counts (`loop_ops`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(job.fn, job.signature, job.constants, aligned_attrs(job))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": job.num_warps, "num_stages": job.num_stages, "maxnreg": maxnreg,
                                **job.options})
    res = resource_usage(k.asm["cubin"])
    shared = int(k.metadata.shared)
    text = sass(k.asm["cubin"])
    return {"kernel": job.kernel, "variant": job.variant, "config": job.config(), "arch": f"sm_{arch}",
            "regs": res["reg"], "stack_bytes": res["stack"], "shared_bytes": shared,
            "fits_smem": shared <= SMEM_LIMIT[arch], "tensor_cores": tensor_core_op(k.asm["ptx"]),
            **sync_ops(k.asm["ptx"]), "ptx_fma": len(re.findall(r"\bfma\.rn\.f32\b", k.asm["ptx"])),
            "loop_instrs": loop_instructions(text),
            **({"loop_ops": loop_opcodes(text)} if opcodes else {}), "compile_s": round(time.perf_counter() - t0, 2)}
