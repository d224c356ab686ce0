"""Cases for tests/test_triton_interpreter.py: the small-M kernels (qresearch/kernels/triton_small.py) under the
Triton interpreter, against the torch reference on the same packed buffers (bounds as in interp_kernels.py)."""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # triton reads it when first imported: needs a fresh process
    pytest.skip("run through tests/test_triton_interpreter.py (sets TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)

from qresearch.kernels import reference as ref  # noqa: E402
from qresearch.kernels import triton_small as S  # noqa: E402
from tests._qhelpers import packed_args, rel_err, rtn_layer  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (2, False), (8, True), (8, False)])
@pytest.mark.parametrize("group,k,cfg", [(64, 256, (16, 2, 1, 4, 0)), (128, 640, (16, 4, 2, 4, 0)),
                                         (128, 640, (16, 4, 2, 4, 1)), (128, 512, (32, 2, 1, 4, 1)),
                                         (128, 384, (32, 1, 3, 4, 0)), (-1, 200, (16, 2, 2, 4, 0))])
def test_gemv_wide_matches_reference(bits, sym, group, k, cfg):
    """Tiles of NG sub-chunks that span groups (g64 with NG=2, g128 with NG=4 over K=640: a partial last tile),
    x permuted or strided (XPERM), even K (no masks), split-K, per channel with K = 200 (a masked tail); odd N;
    bias."""
    res = rtn_layer(37, k, bits, group, sym, seed=bits + k)
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(1, k), torch.randn(37)
    assert S.supports(meta, gi is not None, 1) is None
    y = S.small_m_linear(x, meta, qw, s, qz, b, cfg)
    assert y.shape == (1, 37) and y.dtype == x.dtype
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, b)) < TOL[torch.float32]


@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize("bits,sym,group,k,cfg", [
    (4, False, 128, 384, (16, 1, 4, 2, 0)), (4, False, 128, 384, (16, 2, 4, 2, 1)), (4, True, 128, 640, (32, 2, 4, 2, 1)),
    (8, False, 64, 256, (16, 3, 4, 2, 0)), (8, True, -1, 200, (16, 2, 4, 2, 1)), (2, False, 256, 512, (16, 1, 4, 2, 1)),
    (4, False, 128, 384, (16, 2, 4, 2, 2)), (8, True, -1, 200, (16, 2, 4, 2, 2)), (2, False, 256, 512, (16, 1, 4, 2, 2)),
    (4, False, -1, 196, (16, 1, 4, 2, 2))])
def test_skinny_dot_matches_reference(m, bits, sym, group, k, cfg):
    """M < 16 rows masked; groups of 64 / 128 / 256, per channel with a masked K tail; split-K; bias; x strided
    (XPERM 0), copied (1) or read as a tile and split in registers (2, also with K = 196: not whole words)."""
    res = rtn_layer(37, k, bits, group, sym, seed=bits + k + m)
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(m, k), torch.randn(37)
    assert S.supports(meta, gi is not None, m) is None
    y = S.small_m_linear(x, meta, qw, s, qz, b, cfg)
    assert y.shape == (m, 37) and y.dtype == x.dtype
    assert rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, b)) < TOL[torch.float32]


def test_gemv_wide_half():
    """fp16 activations through the fp32 code conversion (the interpreter emulates 16-bit dots poorly, so the
    tensor-core kernel is checked in fp16 on the GPU by the suite)."""
    res = rtn_layer(48, 256, 4, 128, False, seed=3)
    meta, qw, s, qz, gi = packed_args(res)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1, 256).to(dtype)
        y = S.small_m_linear(x, meta, qw, s, qz, None, (32, 2, 1, 4, 0))
        assert y.dtype == dtype and rel_err(y, ref.wa16_ref(x, meta, qw, s, qz, gi, None)) < TOL[dtype]


def test_permute_x():
    x = torch.arange(16.0).reshape(1, 16)
    xp = S.permute_x(x, 4)  # 8 codes per word: [8, 1, 2]
    assert xp.shape == (8, 1, 2) and xp[3, 0].tolist() == [3.0, 11.0]
    meta = packed_args(rtn_layer(8, 196, 4, -1, False, seed=1))[0]  # K = 196: not whole words of 8 codes
    assert S.configs("wide", meta) and all(c[4] == 0 for c in S.configs("wide", meta))


def test_refuses_what_it_does_not_handle():
    meta = packed_args(rtn_layer(16, 128, 3, 64, False, seed=1))[0]
    assert "bits=3" in S.supports(meta, False, 1)
    meta = packed_args(rtn_layer(16, 256, 4, 4, False, seed=1))[0]
    assert "group=4" in S.supports(meta, False, 1)
    meta = packed_args(rtn_layer(16, 256, 2, 128, False, seed=1))[0]
    assert S.supports(meta, False, 1) is None and "16 words" in S.supports(meta, False, 2)
    assert "M=17" in S.supports(meta, False, 17) and "g_idx" in S.supports(meta, True, 1)
    with pytest.raises(ValueError, match="16 words"):
        S.small_m_linear(torch.randn(2, 256), meta, *packed_args(rtn_layer(16, 256, 2, 128, False, seed=1))[1:4],
                         None, (16, 1, 4, 2, 0))


@pytest.mark.parametrize("m,cfg", [(1, (16, 2, 3, 4, 0)), (5, (16, 3, 4, 2, 0))])
def test_split_k_is_one_kernel_deterministic_and_leaves_counters_zeroed(m, cfg):
    """Split-K (triton_splitk): the last K slice of each tile sums the partials in slice order, so a repeat gives the
    same bits; the bias is added once; the arrival counters are 0 again after the call (a counter left behind would
    stop the next call's reduction and leave y unwritten)."""
    from qresearch.kernels import triton_splitk as SK

    res = rtn_layer(37, 640, 4, 128, False, seed=11)
    meta, qw, s, qz, gi = packed_args(res)
    x, b = torch.randn(m, 640), torch.randn(37)
    y1 = S.small_m_linear(x, meta, qw, s, qz, b, cfg)
    y2 = S.small_m_linear(x, meta, qw, s, qz, b, cfg)
    assert torch.equal(y1, y2)
    assert rel_err(y1, ref.wa16_ref(x, meta, qw, s, qz, gi, b)) < TOL[torch.float32]
    assert int(SK.counters(x.device, 1).abs().sum()) == 0
    y0 = S.small_m_linear(x, meta, qw, s, qz, b, (cfg[0], *cfg[1:2], 1, *cfg[3:]) if m == 1 else (cfg[0], 1, *cfg[2:]))
    assert rel_err(y1, y0) < 1e-6  # one slice vs three / four: the same sums, other rounding
