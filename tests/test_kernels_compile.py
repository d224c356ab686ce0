"""The Triton kernels compile for NVIDIA GPUs (sm_80, sm_90) on this CPU machine through Triton's bundled ptxas.

The interpreter tests check the math; these check that the compiler accepts the same source for real targets and
that the configs the autotuner starts from keep their key properties (tensor cores, no spills, shared memory).
"""
import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted functions under TRITON_INTERPRET=1; nothing to compile", allow_module_level=True)

from qresearch.kernels import aot

if not aot.tool("ptxas-blackwell").exists() and not aot.tool("ptxas").exists():
    pytest.skip("this triton wheel ships no NVIDIA backend binaries", allow_module_level=True)


def _job(jobs, **want):
    return next(j for j in jobs if all(j.constants[k] == v for k, v in want.items()))


def test_w4_prefill_compiles_to_wgmma_without_spills_on_sm90():
    job = _job(aot.wq_jobs("wq_prefill", ["w4 asym"]), BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    r = aot.compile_job(job, 90)
    assert r["tensor_cores"] == "wgmma", r
    assert r["stack_bytes"] == 0 and r["fits_smem"], r


def test_w3_straddling_codes_and_act_order_compile_on_sm80():
    """3-bit codes cross word boundaries (selected from 3 whole words per 32 codes); act-order reads g_idx: both
    lower to mma.sync and fit sm_80 shared memory (per-code word gathers needed 450 KiB at this config)."""
    for variant in ("w3 asym", "w4 asym act-order"):
        job = _job(aot.wq_jobs("wq_prefill", [variant]), BLOCK_M=64, BLOCK_N=64, BLOCK_K=128)
        r = aot.compile_job(job, 80)
        assert r["tensor_cores"] == "mma.sync" and r["regs"] <= 255 and r["fits_smem"], r


def test_decode_gemv_and_w8a8_compile():
    gemv = _job(aot.wq_jobs("wq_decode", ["w4 asym"]), BLOCK_M=1, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4)
    r = aot.compile_job(gemv, 90)
    assert r["tensor_cores"] == "none" and r["stack_bytes"] == 0, r  # BLOCK_M=1: a multiply-reduce, no MMA
    tile = _job(aot.wq_jobs("wq_decode", ["w4 asym"]), BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4)
    r = aot.compile_job(tile, 80)
    assert r["tensor_cores"] == "mma.sync" and r["fits_smem"], r
    gemm = _job([j for j in aot.w8a8_jobs() if j.kernel == "w8a8_gemm"], BLOCK_M=128, BLOCK_N=128)
    r = aot.compile_job(gemm, 90)
    assert r["tensor_cores"] == "wgmma" and r["stack_bytes"] == 0, r


def test_spills_are_detected():
    """The resource reader sees spills: a kernel forced to few registers must report stack > 0."""
    job = _job(aot.wq_jobs("wq_prefill", ["w4 asym"]), BLOCK_M=64, BLOCK_N=64, BLOCK_K=128)
    r = aot.compile_job(job, 80, maxnreg=64)
    assert r["regs"] <= 64 and r["stack_bytes"] > 0, r


def test_small_m_kernels_compile_for_sm90():
    """triton_small: the default M = 2..16 kernel's tuned pick on the H100 (BN=64 SK=8 XPERM) lowers to tensor-core
    MMAs without spills; the wide GEMV's largest tile keeps its per-step reduction under the register cap."""
    jobs = aot.small_jobs(["w4 asym"])
    for xperm in (1, 2):  # the copied x, and the x tile split in registers (fewer, 16-byte loads)
        dot = _job([j for j in jobs if j.kernel == "small_dot"], BLOCK_N=64, SPLIT_K=8, XPERM=xperm)
        r = aot.compile_job(dot, 90)
        assert r["tensor_cores"] == "mma.sync" and r["stack_bytes"] == 0 and r["fits_smem"], r
    wide = _job([j for j in jobs if j.kernel == "small_wide"], BLOCK_N=32, NG=8, SPLIT_K=1, XPERM=True)
    r = aot.compile_job(wide, 90)
    assert r["tensor_cores"] == "none" and r["stack_bytes"] == 0 and r["regs"] < 255, r


def test_split_k_reduction_synchronises_on_sm90():
    """One-kernel split-K (triton_splitk): a CTA barrier before one gpu-scope acq_rel atomic (the arrival count),
    L2-only loads of the partials and an atomic reset; SPLIT_K = 1 has no atomics. The GEMV and the skinny dot."""
    gemv = aot.gemv_jobs(["w4 asym"])
    for sk in (1, 8):
        r = aot.compile_job(_job(gemv, BLOCK_N=32, SPLIT_K=sk), 90)
        if sk == 1:
            assert r["atomics"] == [] and not r["ld_cg"], r
        else:
            assert r["atomics"] == ["atom.global.gpu.acq_rel.add.u32", "atom.global.gpu.acq_rel.exch.b32"], r
            assert r["barrier"] and r["ld_cg"] and r["stack_bytes"] == 0, r
    dot = _job([j for j in aot.small_jobs(["w4 asym"]) if j.kernel == "small_dot"], BLOCK_N=64, SPLIT_K=8, XPERM=1)
    r = aot.compile_job(dot, 90)
    assert "atom.global.gpu.acq_rel.add.u32" in r["atomics"] and r["barrier"] and r["ld_cg"], r


def test_even_k_gemv_drops_the_masks_from_its_main_loop():
    """The GEMV's tuned H100 pick (BN=128, 128 codes, SK=8, 8 warps): x is read as one [BLOCK_KW, PER] tile per step
    (16-byte loads split in registers), not as 2-byte loads per code position; with EVEN_K (K a multiple of the
    tile, every Llama layer) that loop has no K masks and at least 5% fewer SASS instructions than the masked build
    (sm_90, Triton 3.6, codes by conversion: 332 vs 398; it was 386 vs 492 with a 2-byte load per code position)."""
    job = _job(aot.gemv_jobs(["w4 asym"]), BLOCK_N=128, BLOCK_KW=16, SPLIT_K=8)
    job = aot.Job(job.kernel, job.variant, job.fn, job.signature, job.constants, 8, job.num_stages)
    even = aot.compile_job(job, 90, opcodes=True)
    masked = aot.compile_job(aot.Job(job.kernel, job.variant, job.fn, job.signature,
                                     {**job.constants, "EVEN_K": False}, 8, job.num_stages), 90)
    assert 0 < even["loop_instrs"] <= 0.95 * masked["loop_instrs"], (even, masked)
    # 2-byte loads left: the rows' fp16 scales (the old x reads took 32 per step); 64 codes per thread per step
    assert even["loop_ops"].get("LDG.E.U16", 0) < 8 and even["loop_instrs"] < 5.75 * 64, even  # 3.6: 341, 3.9: 355


def test_gemv_codes_become_floats_without_conversions():
    """MAGIC (the default): the main loop of the H100's pick converts no code with I2F (the zeros' two remain),
    where the conversion build has one per code (64 per thread per step)."""
    job = _job(aot.gemv_jobs(["w4 asym"]), BLOCK_N=128, BLOCK_KW=16, SPLIT_K=8)
    conv = lambda r: sum(n for op, n in r["loop_ops"].items() if op.startswith("I2F"))  # noqa: E731
    magic = aot.compile_job(aot.Job(job.kernel, job.variant, job.fn, job.signature, job.constants, 8, 3), 90,
                            opcodes=True)
    i2f = aot.compile_job(aot.Job(job.kernel, job.variant, job.fn, job.signature, {**job.constants, "MAGIC": False},
                                  8, 3), 90, opcodes=True)
    assert conv(magic) <= 4 and conv(i2f) >= 64, (magic["loop_ops"], i2f["loop_ops"])


def test_prefill_dequantize_kernel_compiles_without_spills():
    """triton_dequant's kernel, every weight variant (2/3/4/8 bits, sym, act-order) on sm_80 and sm_90: no spills,
    no tensor cores (it only writes the dense weight)."""
    for job in aot.dequant_jobs(list(aot.WQ_VARIANTS)):
        for arch in (80, 90):
            r = aot.compile_job(job, arch)
            assert r["stack_bytes"] == 0 and r["tensor_cores"] == "none" and r["fits_smem"], (job.variant, r)


def test_w8a8_gemm_main_loop_selects_no_bytes():
    """The W8A8 GEMM's main loop at 128x128x128 on sm_90, both operand orders: no per-byte PRMT / SEL unpacking of
    an `other` value (other=128 cost 112 PRMT + 81 SEL, 328 instructions per step), and with tile rows wrapped
    into range and EVEN_K no masks at all (Triton 3.6: 106, transposed 91; 3.9: 118, 97)."""
    for w_as_a in (False, True):
        job = _job([j for j in aot.w8a8_jobs() if j.kernel == "w8a8_gemm"], BLOCK_M=128, BLOCK_N=128, BLOCK_K=128,
                   W_AS_A=w_as_a)
        r = aot.compile_job(job, 90, opcodes=True)
        assert r["loop_ops"].get("PRMT", 0) < 16 and r["loop_ops"].get("SEL", 0) < 4, (w_as_a, r["loop_ops"])
        assert r["loop_instrs"] < 130 and r["stack_bytes"] == 0, (w_as_a, r["loop_instrs"], r["stack_bytes"])


def test_skinny_dot_pairs_code_positions_without_repacking():
    """triton_small XPERM 2 (x tile split in registers) dots over code-position pairs, whose 16-bit halves are the
    MMA's register pairs as they stand: at the H100's pick (BN=64 SK=8) on sm_90 its main loop repacks half as
    much (PRMT 68 -> 36 per step, sym and asym) and is shorter than the per-position XPERM 1 loop."""
    jobs = [j for j in aot.small_jobs(["w4 asym", "w4 sym"]) if j.kernel == "small_dot"]
    for variant in ("w4 asym", "w4 sym"):
        r = {x: aot.compile_job(_job([j for j in jobs if j.variant == variant], BLOCK_N=64, SPLIT_K=8, XPERM=x), 90,
                                opcodes=True) for x in (1, 2)}
        assert r[2]["loop_ops"].get("PRMT", 0) <= 40 and r[2]["stack_bytes"] == 0, (variant, r[2]["loop_ops"])
        assert r[2]["loop_instrs"] < r[1]["loop_instrs"], (variant, r[1]["loop_instrs"], r[2]["loop_instrs"])


def test_wq_decode_tiles_do_not_spill_on_sm90():
    """triton_wq's decode tiles (the M <= 16 path of 3-bit and other layers the GEMV / skinny kernels do not take)
    fit the registers on sm_90 for 3/4/8 bits: under Triton 3.6 the old BLOCK_K = 256 and 64-codes-per-thread
    GEMV tiles spilled up to 1.6 KB per thread (act-order's per-element gathers still spill: not checked)."""
    for variant in ("w4 asym", "w3 asym", "w8 asym"):
        for job in aot.wq_jobs("wq_decode", [variant]):
            if job.constants["SPLIT_K"] != 2:
                continue
            r = aot.compile_job(job, 90)
            assert r["stack_bytes"] <= 8, (variant, job.config(), r["regs"], r["stack_bytes"])


def test_gptq_column_loop_rounds_every_product_on_sm90():
    """GPTQ's column loop (triton_gptq.py) as the solver launches it: IEEE division (div.rn) and no fused
    multiply-add in the PTX, so w - h * err and w - (q - z) * s round the product first, as the CPU loops do; the
    block of 128 columns stays in registers (no spills). A launch with contraction on would fuse them."""
    job = aot.gptq_jobs()[0]
    r = aot.compile_job(job, 90)
    assert r["stack_bytes"] == 0 and r["ptx_fma"] == 0, r
    fused = aot.compile_job(aot.Job(job.kernel, job.variant, job.fn, job.signature, job.constants, 4, 1,
                                    {"enable_fp_fusion": True}), 90)
    assert fused["ptx_fma"] > 0, fused
