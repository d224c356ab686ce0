"""Cases for tests/test_triton_interpreter.py: Triton kernels run by the Triton interpreter on CPU tensors (TRITON_INTERPRET=1), against the torch reference.

Error bounds (relative Frobenius, vs the reference on the same packed buffers):
  fp32 activations: 1e-5 (accumulation order only);  fp16: 3e-3 (output rounding ~ 2^-11 + order);
  bf16: 1.6e-2 (2^-8 output rounding), GEMV path only: the interpreter does not emulate bf16 tl.dot.
W8A8: int8 activations and int32 accumulation are exact; only the fp32 epilogue order differs (1e-6).
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # triton reads it when first imported: needs a fresh process
    pytest.skip("run through tests/test_triton_interpreter.py (sets TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)

from qresearch.kernels import reference as ref  # noqa: E402
from qresearch.kernels import triton_w8a8 as W8  # noqa: E402
from qresearch.kernels import triton_wq as WQ  # noqa: E402
from tests._qhelpers import packed_args, rel_err, rtn_layer  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K): GEMV, split-K decode tile, prefill tile
BLOCKS = {1: dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2), 5: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3),
          33: dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1)}


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (3, False), (3, True), (2, False), (8, True),
                                      (5, False), (7, True)])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_wq_matmul_fp32(bits, sym, m):
    res = rtn_layer(37, 200, bits, 64, sym, seed=bits + m)  # odd N = 37; K = 200: partial last group of 8
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(m, 200), torch.randn(37)
    y = WQ.wq_linear(x, meta, qw, s, qz, gi, b, BLOCKS[m])
    assert y.shape == (m, 37) and y.dtype == x.dtype
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, b)) < TOL[torch.float32]


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("m", [1, 33])
def test_wq_matmul_act_order(bits, m):
    """g_idx: scales and zeros gathered per element."""
    res = rtn_layer(40, 160, bits, 32, False, act_order=True, seed=7)
    meta, qw, s, qz, gi = packed_args(res)
    x = torch.randn(m, 160)
    y = WQ.wq_linear(x, meta, qw, s, qz, gi, None, BLOCKS[m])
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) < TOL[torch.float32]


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("m", [1, 33])
def test_wq_matmul_groups_smaller_than_tile(bits, m):
    """group 16 < BLOCK_K: a tile spans several groups (the gathered-scale path); also 16 does not divide K."""
    res = rtn_layer(24, 120, bits, 16, False, seed=11)
    meta, qw, s, qz, gi = packed_args(res)
    x = torch.randn(m, 120)
    y = WQ.wq_linear(x, meta, qw, s, qz, gi, None, BLOCKS[m])
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype,m", [(torch.float16, 1), (torch.float16, 5), (torch.float16, 33),
                                     (torch.bfloat16, 1)])
def test_wq_matmul_half(dtype, m):
    res = rtn_layer(48, 128, 4, 128, False, seed=3)
    meta, qw, s, qz, gi = packed_args(res)
    x = torch.randn(m, 128).to(dtype)
    y = WQ.wq_linear(x, meta, qw, s, qz, gi, None, BLOCKS[m])
    assert y.dtype == dtype and rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) < TOL[dtype]


def test_wq_matmul_detects_wrong_layout():
    """The test can fail: a kernel fed codes from another bit width must disagree with the reference."""
    res = rtn_layer(16, 64, 4, 64, True)
    meta, qw, s, qz, gi = packed_args(res)
    wrong = type(meta)(2, meta.group, meta.in_features, meta.out_features, True)
    x = torch.randn(1, 64)
    y = WQ.wq_linear(x, wrong, qw[:, :4].contiguous(), s, qz, gi, None, BLOCKS[1])
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) > 0.1


@pytest.mark.parametrize("block", [128, None])
def test_act_quant_kernel_exact(block):
    """Two passes over 128-wide blocks, and one pass with the whole row in a block (the default up to 8192)."""
    x = torch.randn(6, 300)
    x[1] = 0.0
    x[3, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1.0: ties to even, as torch.round
    q, s = W8.act_quant(x, block=block)
    q_ref, s_ref = ref.act_quant_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q[3, 1:4].tolist() == [0, 2, -2]


def test_act_quant_default_takes_two_passes_over_wide_rows():
    """Rows wider than ONE_PASS_MAX: the default's two passes over TWO_PASS_BLOCK-wide blocks (a partial last one)
    give the reference's bits; the largest |x| in the last block."""
    k = W8.ONE_PASS_MAX + 3 * 8 + 5
    x = torch.randn(3, k)
    x[0, -1] = 40.0
    q, s = W8.act_quant(x)
    q_ref, s_ref = ref.act_quant_ref(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and q[0, -1] == 127


@pytest.mark.parametrize("w_as_a", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 203), (19, 203), (19, 256)])
def test_w8a8_matmul(dtype, m, k, w_as_a):
    """Both operand orders (W_AS_A: the transposed product, weights the MMA's A operand); odd M and N (tile rows
    wrapped into range); K = 203: bytes beyond the row masked, K = 256: EVEN_K (unmasked loads); bias."""
    res = rtn_layer(37, k, 8, -1, True, seed=m)
    meta, qw, s, _, _ = packed_args(res)
    x, b = torch.randn(m, k).to(dtype), torch.randn(37)
    y = W8.w8a8_linear(x, meta, qw, s, b, block=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, W_AS_A=w_as_a))
    want = ref.w8a8_ref(x, meta, qw, s, b)
    assert y.dtype == dtype and rel_err(y, want) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_w8a8_static_scale():
    res = rtn_layer(16, 64, 8, -1, True)
    meta, qw, s, _, _ = packed_args(res)
    x, scale = torch.randn(4, 64), torch.tensor([0.02])
    y = W8.w8a8_linear(x, meta, qw, s, None, scale, block=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32))
    assert rel_err(y, ref.w8a8_ref(x, meta, qw, s, None, scale)) < 1e-6


def test_w8a8_parts_row_splits_a_call():
    """The GPU suite's W8A8 breakdown (experiments/gpusuite/w8a8_parts.py) on CPU: every part timed, and our GEMM's
    output equals torch._int_mm's integer sums rescaled (K = 200 is not a multiple of the interpreter tile's 32)."""
    from experiments.gpusuite.w8a8_parts import parts_row, signed_weight

    row = parts_row("40x200", 24, torch.device("cpu"), torch.float32, None, 1, 0, False)
    assert row["gemm_rel_err"] < 1e-6 and row["kernel"] == "triton_w8a8"
    assert row["act_quant_blocks"] == []  # K = 200: no two-pass row block is narrower than the row
    assert all(row[f"{k}_us"] > 0 for k in ("fp16", "call", "act_quant", "gemm", "cublas_int8", "fp8"))
    assert row["fp8_rel_err"] < 1e-2  # bf16 output of exact fp8 products vs float64 on the same e4m3 operands
    assert row["fp8_bound"] == row["fp16_us"] / (row["act_quant_us"] + row["fp8_us"])
    words = torch.tensor([[0x80FF7F00]], dtype=torch.int64).to(torch.int32)  # bytes 0x00 0x7F 0xFF 0x80 (little end)
    assert signed_weight(words, 4).tolist() == [[-128, -1, 127, 0]]


def test_w8a8_parts_act_quant_blocks_give_the_default_bits():
    """Two-pass row blocks narrower than a 2100-wide row (1024, 2048) are timed and give the one-pass default's
    int8 codes and scales."""
    from experiments.gpusuite.w8a8_parts import act_quant_blocks
    from qresearch.kernels.triton_w8a8 import act_quant

    x = torch.randn(3, 2100) * torch.linspace(0.1, 4.0, 2100)
    xq, sx = act_quant(x)
    rows = act_quant_blocks(x, xq, sx, lambda fn: (fn() and 1e-6, "eager"))
    assert [(r["block"], r["identical"]) for r in rows] == [(1024, True), (2048, True)]
    assert act_quant_blocks(x, xq.flip(1), sx, lambda fn: (1e-6, "eager"))[0]["identical"] is False


def test_act_order_rows_time_both_paths():
    """The GPU suite's act-order rows on CPU (interpreted kernels): QRESEARCH_ACT_ORDER paths permute and gather,
    each matching the torch reference on the same module."""
    from types import SimpleNamespace

    from experiments.gpusuite.kernels import ACT_ORDER_RUNS, act_order_rows

    ctx = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, gpu=False, copy_bw=1e10)
    rows = act_order_rows("40x256", ctx, None, 1, 0)
    assert [(r["M"], r["variant"].split()[-1]) for r in rows] == list(ACT_ORDER_RUNS)
    assert all(r["ref_rel_err"] < 1e-5 and r["q_ms"] > 0 and r["kernel"] == "triton_w4a16" for r in rows), rows


def test_launch_probe_rows_run_every_launch_path():
    """The GPU suite's host-time probe (experiments/gpusuite/launch.py) under the interpreter: the GEMV's own launch
    and the bare JIT call give the same bits; the compiled-kernel path, which the interpreter has no object for, is
    recorded with its error rather than dropped; W8A8's two kernels are timed."""
    from experiments import bench_kernels as bk
    from experiments.gpusuite import launch

    dev = torch.device("cpu")
    w4, w8 = (bk.build(v, 64, 256, dev, torch.float32) for v in ("w4a16_g128", "w8a8"))
    rows = {r["path"]: r for r in launch.triton_rows(w4, w8, torch.randn(1, 256), dev, 1, 1.0)}
    assert rows["triton_gemv._launch (tile fixed)"]["identical"] and rows["JIT launch, buffers reused"]["identical"]
    assert rows["compiled-kernel launch"]["us"] is None and "Error" in rows["compiled-kernel launch"]["error"]
    assert rows["act_quant (W8A8)"]["us"] > 0 and rows["int8_gemm (W8A8)"]["identical"]


class _StandInTuner:
    """Plays triton.autotune's part under the interpreter (no GPU to time configs): launches `cfg` as the pick."""

    def __init__(self, cfg):
        self.best_config, self.calls = cfg, 0

    def __getitem__(self, grid):
        def run(*args, **flags):
            self.calls += 1
            tile = self.best_config.kwargs
            WQ.wq_matmul_kernel[grid(tile)](*args, **flags, **tile, num_warps=self.best_config.num_warps)
        return run


@pytest.mark.parametrize("m,cfg", [(33, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1)),
                                   (5, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3))])
def test_wq_autotuned_path_launches_the_pick_directly_after_the_first_call(m, cfg, monkeypatch):
    """The first call of a key goes through the autotuner; later calls launch its pick (_BEST) through the Launcher,
    with the same output bits as the tile launched as a fixed block; a new key (another M bucket) tunes again."""
    import triton

    res = rtn_layer(37, 200, 4, 64, False, seed=3)
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(m, 200), torch.randn(37)
    tuner = _StandInTuner(triton.Config(cfg, num_warps=4))
    monkeypatch.setattr(WQ, "INTERPRETED", False)  # take the autotuned branch
    monkeypatch.setattr(WQ, "_tuned", lambda kind: tuner)
    monkeypatch.setattr(WQ, "_BEST", {})
    first, second = WQ.wq_linear(x, meta, qw, s, qz, gi, b), WQ.wq_linear(x, meta, qw, s, qz, gi, b)
    assert tuner.calls == 1 and len(WQ._BEST) == 1
    want = WQ.wq_linear(x, meta, qw, s, qz, gi, b, cfg)
    assert torch.equal(first, want) and torch.equal(second, want)
    WQ.wq_linear(torch.randn(2 * m, 200), meta, qw, s, qz, gi, b)  # another M bucket: another key
    assert tuner.calls == 2 and len(WQ._BEST) == 2
