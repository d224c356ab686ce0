"""W8A8 on CPU through our AVX512-VNNI product on the stored codes (qresearch/kernels/cpu_int8.py): exact integer
sums, the torch_int_mm kernel's outputs bit for bit, the weight held once, the fallback named where the CPU lacks
VNNI."""
import gc
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from qresearch.kernels import cpu_int8, dispatch
from qresearch.kernels.prepared import derived_bytes
from qresearch.nn.packed import QuantLinear
from qresearch.quant import QuantSpec
from qresearch.records import ActQuant
from tests._qhelpers import REPO, rtn_layer

needs_vnni = pytest.mark.skipif(cpu_int8.load()[0] is None, reason=f"c_vnni unavailable: {cpu_int8.load()[1]}")


@needs_vnni
@pytest.mark.parametrize("m,n,k", [(1, 5, 7), (1, 37, 4096), (2, 9, 64), (3, 8, 65), (4, 13, 200), (5, 4, 63),
                                   (9, 3, 1), (17, 21, 300), (70, 11, 130)])
def test_u8s8_product_is_torch_int_mm_exactly(m, n, k):
    """Tiles of 1 (8 weight rows) and 4 x 4, their row and column tails, K tails of the 64-byte steps, extreme
    values (all 255 codes against -128 activations)."""
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    u = torch.randint(0, 256, (n, k + 3), generator=g, dtype=torch.uint8)  # 3 padding bytes past K: never read
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    u[0], x[0] = 255, -128
    want = x.long() @ (u[:, :k].long() - 128).t()  # exact in int64
    assert torch.equal(cpu_int8.u8s8_mm(x, u, k).long(), want)
    if k >= 2:  # torch._int_mm itself is wrong at K = 1 on CPU (int_mm.int_mm_why_not routes it to emulation)
        assert torch.equal(torch._int_mm(x, (u[:, :k].to(torch.int16) - 128).to(torch.int8).t()).long(), want)
    assert torch.equal(cpu_int8.signed_copy(u, k), (u[:, :k].to(torch.int16) - 128).to(torch.int8))


@needs_vnni
@pytest.mark.parametrize("m,k", [(1, 576), (3, 200), (5, 17), (4, 4096), (2, 1)])
@pytest.mark.parametrize("static", [None, torch.tensor([[0.03]])])
def test_c_activation_quantizer_is_the_reference_bit_for_bit(m, k, static):
    """One C pass gives act_quant_ref's int8 codes and fp32 scales exactly (IEEE division, ties to even, a zero row's
    scale 1, K tails of the 16-lane steps) and the codes' row sums; NaN rows are handed back to torch (None)."""
    from qresearch.kernels.reference import act_quant_ref

    g = torch.Generator().manual_seed(m * 100 + k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)[None]
    x[0, : min(3, k)] = 0.0
    if m > 1:
        x[1] = 0.0
    q, s, xsum = cpu_int8.act_quant(x, static)
    want_q, want_s = act_quant_ref(x, static)
    assert torch.equal(q, want_q) and torch.equal(s, want_s) and torch.equal(xsum, want_q.sum(1, dtype=torch.int32))
    ties = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0, 200.0, -300.0]])
    assert cpu_int8.act_quant(ties, torch.ones(1, 1))[0].tolist() == [[0, 2, 2, 0, -2, -2, 127, 127, -128]]
    x[0, 0] = float("nan")
    assert cpu_int8.act_quant(x, None) is None


def _w8a8(out_f, in_f, granularity="token", static=None, bias=True):
    res = rtn_layer(out_f, in_f, 8, -1, True, seed=out_f)
    res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity=granularity), static)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return QuantLinear.from_result(lin, res)


@needs_vnni
@pytest.mark.parametrize("granularity,static", [("token", None), ("tensor", None), ("tensor", torch.tensor([[0.03]]))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_equals_torch_int_mm_bit_for_bit(granularity, static, dtype, monkeypatch):
    """Decode rows (the C kernel) and rows past VNNI_MAX_M (torch._int_mm on signed panels) give the
    torch_int_mm kernel's outputs exactly; the layer holds nothing beside its buffers, and follows them."""
    mod = _w8a8(37, 200, granularity, static).to(dtype)
    assert mod.kernel_name == "c_vnni_w8a8"
    with monkeypatch.context() as mp:
        mp.setenv("QRESEARCH_KERNELS", "torch_int")
        other = _w8a8(37, 200, granularity, static).to(dtype)
        other.load_state_dict(mod.state_dict())
        assert other.kernel_name == "torch_int_mm_w8a8"
    monkeypatch.setattr(cpu_int8, "PANEL_BYTES", 200 * 8)  # 8-row panels: 37 rows end in a 5-row panel
    for m in (1, 3, 4, 9, cpu_int8.VNNI_MAX_M + 3):
        x = torch.randn(m, 200).to(dtype)
        y = mod(x)
        with monkeypatch.context() as mp:
            mp.setenv("QRESEARCH_KERNELS", "torch_int")
            assert torch.equal(y, other(x)), m
    assert derived_bytes(nn.Sequential(mod)) == 0  # no copy of the weight kept
    mod.qweight.copy_(torch.roll(mod.qweight, 1, dims=0))  # in place: the stored bytes are what runs
    other.qweight.copy_(mod.qweight)
    x = torch.randn(2, 200).to(dtype)
    with monkeypatch.context() as mp:
        mp.setenv("QRESEARCH_KERNELS", "torch_int")
        want = other(x)
    assert torch.equal(mod(x), want)


@needs_vnni
def test_reads_the_stored_buffer_itself():
    mod = _w8a8(8, 64)
    u = cpu_int8.stored_bytes(mod.meta, mod.qweight)
    assert u.data_ptr() == mod.qweight.data_ptr() and u.shape == (8, 64)
    gone = __import__("weakref").ref(mod.qweight)
    del mod, u
    gc.collect()
    assert gone() is None


def test_int8_matmul_avoids_torch_int_mm_at_k_1():
    from qresearch.kernels.int_mm import int8_matmul

    a, b = torch.tensor([[-128], [3]], dtype=torch.int8), torch.tensor([[127, -5, 2]], dtype=torch.int8)
    out, path = int8_matmul(a, b)
    assert path.startswith("emulated: CPU torch._int_mm gives wrong sums for K = 1")
    assert torch.equal(out.long(), a.long() @ b.long())


def test_refusals_name_the_limit():
    meta = _w8a8(4, 64).meta
    assert "device cuda" in cpu_int8.why_not(meta, torch.device("cuda"))
    wide = type(meta)(8, -1, cpu_int8.MAX_K + 1, 4, True)
    assert f"in_features={cpu_int8.MAX_K + 1}" in cpu_int8.why_not(wide, torch.device("cpu"))
    assert "w4 asym" in cpu_int8.why_not(type(meta)(4, 128, 256, 4, False), torch.device("cpu"))
    key = dispatch.LayerKey(wide, dispatch.ActMode("int8", 8), torch.device("cpu"), torch.float32, False)
    kernel, why = dispatch.choose(key)
    assert kernel.name == "torch_int_mm" and "c_vnni_w8a8: in_features" in why


NO_VNNI_CHECK = """
from qresearch.kernels import cpu_int8
from tests.test_cpu_int8 import _w8a8
lib, why = cpu_int8.load()
assert lib is None and "AVX512-VNNI" in why, why
assert _w8a8(8, 64).kernel_name == "torch_int_mm_w8a8"
print("fallback named:", why)
"""


def test_build_without_vnni_falls_back_to_torch_int_mm_by_name(tmp_path):
    """Built for x86-64-v3 (no AVX-512), the library reports no VNNI and W8A8 layers record torch_int_mm."""
    env = {**os.environ, "QRESEARCH_CPU_MARCH": "x86-64-v3", "QRESEARCH_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", NO_VNNI_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "fallback named" in r.stdout, r.stderr[-2000:]


@needs_vnni
@pytest.mark.parametrize("granularity,static", [("token", None), ("tensor", None), ("tensor", torch.tensor([[0.03]]))])
@pytest.mark.parametrize("m", [1, 5])
def test_decode_plan_gives_the_dispatch_path_bits_and_follows_the_buffers(granularity, static, m):
    """Decode-sized calls go through the layer's kept plan (weight bytes, fp32 scales and bias bound once): the
    dispatch path's bits (plans are off inside launcher.jit_only()), also after the weight, its scales or the bias
    are written in place."""
    from qresearch.kernels.launcher import jit_only

    mod = _w8a8(37, 200, granularity, static)
    x = torch.randn(m, 200)
    with torch.no_grad():
        y = mod(x)
        assert [p for p in mod._plans.values() if p[0] is not None], "no plan"
        with jit_only():
            assert torch.equal(y, mod(x))
        for write in (lambda: mod.qweight.copy_(torch.roll(mod.qweight, 1, dims=0)), lambda: mod.scales.mul_(2),
                      lambda: mod.bias.add_(1)):
            before = mod(x)
            write()
            with jit_only():
                want = mod(x)
            assert torch.equal(mod(x), want) and not torch.equal(want, before)
