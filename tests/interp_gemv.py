"""Cases for tests/test_triton_interpreter.py: the M = 1 GEMV (qresearch/kernels/triton_gemv.py) under the Triton
interpreter, against the torch reference on the same packed buffers (bounds as in interp_kernels.py)."""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # triton reads it when first imported: needs a fresh process
    pytest.skip("run through tests/test_triton_interpreter.py (sets TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)

from qresearch.kernels import reference as ref  # noqa: E402
from qresearch.kernels import triton_gemv as G  # noqa: E402
from tests._qhelpers import packed_args, rel_err, rtn_layer  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (2, False), (8, True), (8, False)])
@pytest.mark.parametrize("group,k,split", [(64, 256, 1), (128, 384, 2), (-1, 200, 3)])
def test_gemv_matches_reference(bits, sym, group, k, split):
    """Groups of 64 / 128 (one qparam column per tile) and per channel with K = 200 (a masked tail); odd N."""
    res = rtn_layer(37, k, bits, group, sym, seed=bits + k)
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(1, k), torch.randn(37)
    assert G.supports(meta, gi is not None, 1) is None
    y = G.wq_gemv(x, meta, qw, s, qz, b, {"BLOCK_N": 16, "BLOCK_K_CODES": 64, "SPLIT_K": split})
    assert y.shape == (1, 37) and y.dtype == x.dtype
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, b)) < TOL[torch.float32]


@pytest.mark.parametrize("bits,group,k", [(4, 128, 384), (2, 64, 256), (8, -1, 200)])
def test_gemv_codes_by_magic_equal_codes_by_conversion(bits, group, k):
    """MAGIC (codes to floats by logic and an add) and the int-to-float conversions give the same products:
    bit-identical outputs, split or not, with a masked tail (K = 200)."""
    meta, qw, s, qz, _ = packed_args(rtn_layer(24, k, bits, group, False, seed=7 + bits))
    x = torch.randn(1, k)
    for split in (1, 2):
        blk = {"BLOCK_N": 16, "BLOCK_K_CODES": 64, "SPLIT_K": split}
        y = G.wq_gemv(x, meta, qw, s, qz, None, blk)
        assert torch.equal(y, G.wq_gemv(x, meta, qw, s, qz, None, {**blk, "MAGIC": False}))


def test_gemv_conversions_by_environment(monkeypatch):
    """QRESEARCH_GEMV_MAGIC=0 (the GPU suite's gemv-i2f row) runs the conversion build: same bits, and its
    suite helper sets and restores both variables."""
    from experiments.gpusuite import lib

    meta, qw, s, qz, _ = packed_args(rtn_layer(24, 256, 4, 128, False, seed=3))
    x = torch.randn(1, 256)
    blk = {"BLOCK_N": 16, "BLOCK_K_CODES": 64, "SPLIT_K": 1}
    y = G.wq_gemv(x, meta, qw, s, qz, None, blk)
    monkeypatch.delenv("QRESEARCH_SMALL_M", raising=False)
    with lib.small_m_path("gemv-i2f"):
        assert not G._magic() and os.environ["QRESEARCH_SMALL_M"] == "gemv"
        assert torch.equal(G.wq_gemv(x, meta, qw, s, qz, None, blk), y)
    assert G._magic() and "QRESEARCH_SMALL_M" not in os.environ and "QRESEARCH_GEMV_MAGIC" not in os.environ


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_half(dtype):
    res = rtn_layer(48, 256, 4, 128, False, seed=3)
    meta, qw, s, qz, gi = packed_args(res)
    x = torch.randn(1, 256).to(dtype)
    y = G.wq_gemv(x, meta, qw, s, qz, None, {"BLOCK_N": 32, "BLOCK_K_CODES": 128, "SPLIT_K": 1})
    assert y.dtype == dtype and rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) < TOL[dtype]


def test_gemv_refuses_what_it_does_not_handle():
    meta = packed_args(rtn_layer(16, 128, 3, 64, False, seed=1))[0]
    assert "bits=3" in G.supports(meta, False, 1)
    meta = packed_args(rtn_layer(16, 128, 4, 32, False, seed=1))[0]
    assert "group=32" in G.supports(meta, False, 1)
    assert "M=2" in G.supports(meta, False, 2) and "g_idx" in G.supports(meta, True, 1)
    meta = packed_args(rtn_layer(16, 256, 4, 64, False, seed=1))[0]
    with pytest.raises(ValueError, match="straddles"):
        G.wq_gemv(torch.randn(1, 256), meta, *packed_args(rtn_layer(16, 256, 4, 64, False, seed=1))[1:4], None,
                  {"BLOCK_N": 16, "BLOCK_K_CODES": 128, "SPLIT_K": 1})


@pytest.mark.parametrize("path,gemv_calls,small_calls", [("gemv", 1, 0), ("splitk", 0, 0), ("small", 0, 2),
                                                         ("auto", 1, 1)])
def test_dispatch_routes_small_m_calls_by_path(monkeypatch, path, gemv_calls, small_calls):
    """QRESEARCH_SMALL_M picks the kernel of M <= 16 calls: gemv (M = 1 only), split-K, triton_small (both), or
    auto (the H100's fastest: gemv at M = 1, triton_small at M = 3)."""
    from qresearch.kernels import dispatch
    from qresearch.kernels import triton_small as S

    res = rtn_layer(40, 256, 4, 128, False, seed=5)
    meta, qw, s, qz, gi = packed_args(res)
    bufs = {"qweight": qw, "scales": s, "qzeros": qz, "g_idx": gi, "bias": None}
    x = torch.randn(1, 256)
    calls = {"gemv": 0, "small": 0}
    real_g, real_s = G.wq_gemv, S.small_m_linear
    monkeypatch.setattr(G, "wq_gemv", lambda *a, **k: calls.__setitem__("gemv", calls["gemv"] + 1) or real_g(*a, **k))
    monkeypatch.setattr(S, "small_m_linear",
                        lambda *a, **k: calls.__setitem__("small", calls["small"] + 1) or real_s(*a, **k))
    monkeypatch.setenv("QRESEARCH_SMALL_M", path)
    y = dispatch._run_triton_wq(x, meta, bufs, None)
    y3 = dispatch._run_triton_wq(torch.randn(3, 256), meta, bufs, None)
    dispatch._run_triton_wq(torch.randn(17, 256), meta, bufs, None)  # M = 17: the prefill tiles on every path
    assert calls == {"gemv": gemv_calls, "small": small_calls}
    assert y3.shape == (3, 40) and rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) < TOL[torch.float32]


def test_auto_falls_back_in_order():
    """auto tries the GEMV then triton_small at M = 1, triton_small at 2..16, and leaves M > 16 to triton_wq."""
    from qresearch.kernels import dispatch

    assert dispatch._small_m_order("auto", 1) == ("gemv", "small")
    assert dispatch._small_m_order("auto", 16) == ("small",) and dispatch._small_m_order("auto", 17) == ()
    assert dispatch._small_m_order("gemv", 2) == () and dispatch._small_m_order("splitk", 1) == ()


def test_unknown_small_m_path_is_refused(monkeypatch):
    from qresearch.kernels import dispatch

    monkeypatch.setenv("QRESEARCH_SMALL_M", "fastest")
    with pytest.raises(ValueError, match="QRESEARCH_SMALL_M='fastest' is unknown; allowed: auto, small, gemv, splitk"):
        dispatch.small_m_path()


@pytest.mark.parametrize("n,block,iters", [(5000, 1024, 2), (4096, 1024, 4), (33, 16, 1)])
def test_read_floor_kernel_reads_every_word_once(n, block, iters):
    """The suite's read floor (experiments/gpusuite/floor.py) xors each program's words: a word skipped or read
    twice changes the result (random words, masked tail)."""
    import numpy as np

    from experiments.gpusuite.floor import read_words

    w = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    got = read_words(w, block, iters).numpy()
    step = block * iters
    want = [np.bitwise_xor.reduce(w.numpy()[i:i + step]) for i in range(0, n, step)]
    assert got.tolist() == [int(v) for v in want]


def test_gemv_split_k_repeats_exactly_and_leaves_counters_zeroed():
    """Split-K reduced by the last slice (triton_splitk): bit-identical repeats, one bias, counters back at 0."""
    from qresearch.kernels import triton_splitk as SK

    res = rtn_layer(45, 512, 4, 128, False, seed=3)
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(1, 512), torch.randn(45)
    cfg = {"BLOCK_N": 16, "BLOCK_K_CODES": 64, "SPLIT_K": 4}
    y1 = G.wq_gemv(x, meta, qw, s, qz, b, cfg)
    assert torch.equal(y1, G.wq_gemv(x, meta, qw, s, qz, b, cfg))
    assert rel_err(y1, ref.wa16_ref(x, meta, qw, s, qz, gi, b)) < TOL[torch.float32]
    assert int(SK.counters(x.device, 1).abs().sum()) == 0
