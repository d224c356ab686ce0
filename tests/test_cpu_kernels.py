"""CPU low-bit kernels (qresearch/kernels/cpu_packed.py) vs the torch reference and the float64 dequant matmul.

Tolerances (relative Frobenius error of the [M, out] output): fp32 activations 1e-5 (both paths are fp32 with
a different summation order; observed ~3e-7); bf16 activations 1e-2 (bf16 output rounding alone is ~2e-3 rms;
a wrong zero point or scale gives errors of order 1).
"""
import copy
import gc
import os
import platform
import subprocess
import sys

import weakref

import pytest
import torch
from torch import nn

from qresearch.kernels import cpu_lowbit, cpu_panels
from qresearch.kernels import cpu_packed as cp
from qresearch.kernels import dispatch
from qresearch.kernels import reference as ref
from qresearch.kernels.prepared import derived_bytes, is_cached
from qresearch.nn.packed import QuantLinear
from qresearch.quant.packing import PackedMeta
from tests._qhelpers import REPO, packed_args, rel_err, rtn_layer, shared_dir

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
MS = (1, 5, 64, 301)  # 1: decode tile; 5: multi-row tiles; 64, 301: the C kernel's many-row loop (301: a 45-row
# last chunk of 256 and a 1-row last tile of 6)
# (bits, group, sym, act_order): per-channel, g32/g64/g128, sym/asym, act-order, all bit widths 2..8
SPECS = [(4, 128, False, False), (4, 64, True, False), (4, 32, False, True), (4, -1, False, False),
         (4, -1, True, True), (8, -1, True, False), (8, -1, False, True), (8, 128, False, False),
         (3, 64, False, False), (2, 32, True, True), (5, 128, False, False), (6, -1, True, False),
         (7, 32, False, False)]
SHAPES = [(40, 200), (48, 256), (36, 224)]  # 40 rows: not a multiple of 16; 200 columns: partial last groups, 200 % 16
# != 0 (c_lowbit copies the codes); 256 / 224 columns: c_lowbit reads 4- / 8-bit buffers in place, 224 with a short
# last group at g64 / g128
CPU = torch.device("cpu")


def _key(meta, dtype, mode="none", has_gidx=False, device=CPU):
    return dispatch.LayerKey(meta, dispatch.ActMode(mode, 8 if mode == "int8" else 16), device, dtype, has_gidx)


def _cases():
    for bits, group, sym, ao in SPECS:
        for kind in cp.KERNELS:
            dtypes = (torch.float32, torch.bfloat16) if kind == "c_lowbit" else (torch.bfloat16,)
            for dt in dtypes:
                meta = packed_args(rtn_layer(16, 256, bits, group, sym))[0]
                if cp.WHY_NOT[kind](_key(meta, dt, has_gidx=ao)) is None:
                    yield pytest.param(kind, dt, bits, group, sym, ao, id=f"{kind}-{str(dt)[6:]}-w{bits}g{group}"
                                       f"{'s' if sym else 'a'}{'-ao' if ao else ''}")


def _layer(out_f, in_f, bits, group, sym, ao, dtype):
    """Packed buffers as a model of `dtype` stores them (bf16 models keep bf16 scales) + a random bias."""
    meta, qw, s, qz, gi = packed_args(rtn_layer(out_f, in_f, bits, group, sym, ao, seed=out_f + bits))
    s = s.to(torch.bfloat16) if dtype == torch.bfloat16 else s
    return meta, {"qweight": qw, "scales": s, "qzeros": qz, "g_idx": gi, "bias": torch.randn(out_f).to(dtype)}


@pytest.mark.parametrize("kind,dtype,bits,group,sym,ao", list(_cases()))
def test_kernel_equals_reference_and_float64(kind, dtype, bits, group, sym, ao):
    for out_f, in_f in SHAPES:
        meta, bufs = _layer(out_f, in_f, bits, group, sym, ao, dtype)
        assert cp.WHY_NOT[kind](_key(meta, dtype, has_gidx=ao)) is None
        w64 = ref.dequant_weight(meta, bufs["qweight"], bufs["scales"], bufs["qzeros"], bufs["g_idx"]).double()
        for m in MS:
            x = torch.randn(m, in_f).to(dtype)
            y = cp.run(kind, x, meta, bufs)
            assert y.dtype == dtype and y.shape == (m, out_f)
            exact = x.double() @ w64.t() + bufs["bias"].double()  # [M, out]
            want = ref.wa16_ref(x, meta, *(bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx", "bias")))
            assert rel_err(y, exact) < TOL[dtype], (out_f, in_f, m, rel_err(y, exact))
            assert rel_err(y, want) < TOL[dtype], (out_f, in_f, m, rel_err(y, want))


PORTABLE_CHECK = """
import torch
from qresearch.kernels import cpu_lowbit, cpu_packed as cp, reference as ref
from tests._qhelpers import packed_args, rel_err, rtn_layer
assert cpu_lowbit.load()[0] is not None, cpu_lowbit.load()[1]
for bits, group, sym, ao, k in [(4, 64, False, True, 200), (8, -1, True, False, 200), (5, 32, False, False, 200),
                               (4, 128, False, False, 224), (8, 64, True, False, 224)]:  # 224: codes read in place
    meta, qw, s, qz, gi = packed_args(rtn_layer(40, k, bits, group, sym, ao))
    bufs = {"qweight": qw, "scales": s, "qzeros": qz, "g_idx": gi, "bias": torch.randn(40)}
    for m in (1, 5, 40):  # 40: dequantized panels + the dense matmul
        x = torch.randn(m, k)
        err = rel_err(cp.run("c_lowbit", x, meta, bufs), ref.wa16_ref(x, meta, qw, s, qz, gi, bufs["bias"]))
        assert err < 1e-5, (bits, group, m, err)
print("portable ok", cpu_lowbit.flags()[-1])
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds the C kernel for a generic x86-64 target")
def test_portable_c_path_without_avx512(tmp_path):
    """The non-AVX-512 loops of lowbit_cpu.c (what other CPUs run), built for x86-64-v2, in a fresh process."""
    env = {**os.environ, "QRESEARCH_CPU_MARCH": "x86-64-v2", "QRESEARCH_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "portable ok -march=x86-64-v2" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(not cpu_lowbit.has_many(),
                    reason="qr_lowbit_mm_many is built with AVX-512 only")
@pytest.mark.parametrize("out_f,in_f,bits,group,ao", [(37, 200, 4, 64, True), (42, 6500, 3, 128, False),
                                                      (21, 96, 8, -1, False), (29, 224, 4, 128, False)])
def test_many_row_loop_equals_fused_tiles_bit_for_bit(out_f, in_f, bits, group, ao, monkeypatch):
    """qr_lowbit_mm_many forms the fused tiles' weights (same fmsub) and sums in their order: equal outputs.
    37 / 42 / 21 rows: partial 4-row tiles and weight blocks; 6500 inputs: 12-row blocks (many_block_rows)."""
    meta, bufs = _layer(out_f, in_f, bits, group, False, ao, torch.float32)
    assert cpu_lowbit.many_block_rows(-(-in_f // 128) * 128) == (12 if in_f > 6144 else 16)
    for m in (cpu_lowbit.MANY_M, 24, 31, 263):  # the first many-row M; tails of the 6-row tile; 263: 7-row 2nd chunk
        x = torch.randn(m, in_f)
        with monkeypatch.context() as mp:
            mp.setattr(cpu_lowbit, "kernel_loop", lambda m: "fused")
            fused = cp.run("c_lowbit", x, meta, bufs)
        assert cpu_lowbit.kernel_loop(m) == "many"
        assert torch.equal(cp.run("c_lowbit", x, meta, bufs), fused), (out_f, in_f, m)


@pytest.mark.parametrize("bits,group,sym,ao", [(4, 64, False, True), (3, 32, False, False), (5, -1, True, False),
                                            (8, 64, False, True), (2, 128, True, False), (7, 32, False, True),
                                            (4, 32, False, False), (4, -1, True, False), (8, 128, False, False)])
def test_dense_panels_decode_as_the_reference(bits, group, sym, ao, monkeypatch):
    """Many rows as dequantized panels (cpu_panels.py) from the stored bit stream: the reference's weights (bits
    that straddle int32 words, act-order groups, the 16-code vector steps of 2 / 4 / 8 bits and their scalar tails
    at 200 columns), several panels and a short last one."""
    monkeypatch.setattr(cpu_panels, "PANEL_BYTES", 4 * 200 * 16)  # 16 rows of 200 columns: 16 + 16 + 13
    for dt in (torch.float32, torch.bfloat16):
        meta, bufs = _layer(45, 200, bits, group, sym, ao, dt)
        args = [bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx", "bias")]
        eye = torch.eye(200, dtype=dt)
        w = cpu_panels.linear(eye, meta, {**bufs, "bias": None}).t()  # [out, in]: the panels' weights
        assert torch.equal(w, ref.dequant_weight(meta, *args[:4]).to(dt)), (bits, group, dt)
        x = torch.randn(33, 200).to(dt)
        assert rel_err(cpu_panels.linear(x, meta, bufs), ref.wa16_ref(x, meta, *args)) < TOL[dt] / 10


def test_stream_decode_reads_every_packable_width():
    """qr_stream_dequant against unpack_rows for each width pack_rows writes (1 bit too: no vector path misreads it)."""
    from qresearch.quant.packing import PACK_BITS, pack_rows

    lib = cpu_lowbit.load()[0]
    for bits in PACK_BITS:
        codes = torch.randint(0, 2**bits, (3, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
        qw, s, z, out = pack_rows(codes, bits), torch.rand(3, 3) + 0.5, torch.rand(3, 3) * 3, torch.empty(3, 96)
        lib.qr_stream_dequant(qw.data_ptr(), qw.shape[1], 3, 96, bits, s.data_ptr(), z.data_ptr(), 3, 32, None,
                              out.data_ptr(), 0, 1)
        want = (codes.float() - z.repeat_interleave(32, 1)) * s.repeat_interleave(32, 1)
        assert torch.equal(out, want), bits


def test_many_bf16_rows_run_as_panels(monkeypatch):
    """bf16 from PANEL_M rows (any CPU kernel), fp32 only where the C kernel has no many-row loop."""
    meta, bufs = _layer(16, 256, 4, 128, False, False, torch.bfloat16)
    calls = []
    real = cpu_panels.linear
    monkeypatch.setattr(cpu_panels, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    m = cpu_panels.PANEL_M[torch.bfloat16]
    for kind in ("aten_int4", "c_lowbit"):
        for rows in (m - 1, m):
            cp.run(kind, torch.randn(rows, 256).bfloat16(), meta, bufs)
    assert calls == [m, m]
    x = torch.randn(m, 256).bfloat16().requires_grad_()  # autograd would keep the reused panel buffer: not panels
    (cp.run("aten_int4", x, meta, bufs).float() * torch.arange(16.0)).sum().backward()
    w = ref.dequant_weight(meta, *(bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx"))).bfloat16()
    assert calls == [m, m] and rel_err(x.grad, (torch.arange(16.0).bfloat16().expand(m, 16) @ w)) < 1e-2
    assert cpu_panels.use_panels("c_lowbit", 64, torch.float32) == (cpu_lowbit.kernel_loop(64) == "panels")
    assert not cpu_panels.use_panels("aten_int4", 1 << 20, torch.float32)
    assert not cpu_panels.use_panels("c_lowbit", 1 << 20, torch.float16)  # fp16 rows stay on the C kernel
    with pytest.raises(TypeError, match="not torch.float16"):
        cpu_panels.linear(torch.randn(m, 256).half(), meta, bufs)


def test_prepared_layouts_hold_what_they_claim():
    meta, bufs = _layer(40, 200, 4, 64, False, True, torch.float32)
    args = [bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx")]
    p = cp.prepare("c_lowbit", meta, *args, torch.float32)
    w = cpu_lowbit.lowbit_dequant(p)  # [out, n_groups * gp] in the permuted column order
    perm = cp.act_order_perm(bufs["g_idx"], meta)[0]
    want = ref.dequant_weight(meta, *args)[:, perm]  # [out, in], groups contiguous
    assert p.nib == 1 and p.gp == p.last == 64 and p.codes.shape == (40, 128)
    assert torch.equal(w[:, :200], want) and w.shape == (40, 256)  # exact dequant; columns 200+ meet zero x
    p4 = cp.prepare("aten_int4", meta, *args, torch.bfloat16)
    assert p4.op_group == 64 and p4.weight.shape == (48, 128) and p4.scale_zero.shape == (4, 48, 2)


@pytest.mark.parametrize("bits,group,sym,ao,in_f,in_place", [
    (4, 128, False, False, 224, True), (4, -1, True, False, 256, True), (8, 64, False, False, 224, True),
    (8, -1, True, False, 96, True), (4, 32, False, True, 256, False), (4, 128, False, False, 200, False),
    (5, 64, False, False, 256, False), (3, 32, False, False, 256, False), (2, 64, True, False, 256, False)])
def test_c_lowbit_reads_4_and_8_bit_buffers_in_place(bits, group, sym, ao, in_f, in_place):
    """4- / 8-bit layers whose groups and width are multiples of 32 are run from the stored words (no second copy
    of the weight); act-order, other widths and groups copy the codes into the kernel's own layout."""
    meta, bufs = _layer(24, in_f, bits, group, sym, ao, torch.float32)
    args = [bufs[k] for k in ("qweight", "scales", "qzeros", "g_idx")]
    p = cp.prepare("c_lowbit", meta, *args, torch.float32)
    shares = p.codes.untyped_storage().data_ptr() == bufs["qweight"].untyped_storage().data_ptr()
    assert shares == in_place  # act-order: the columns are permuted into a copy (stored_layout has no g_idx)
    assert ao or (cpu_lowbit.stored_layout(meta, bufs["qweight"]) is not None) == in_place
    perm = torch.arange(in_f) if p.perm is None else p.perm
    w = cpu_lowbit.lowbit_dequant(p)  # [out, width]: kernel column j is input column perm[j]
    assert torch.equal(w[:, :in_f], ref.dequant_weight(meta, *args)[:, perm])
    if in_place:  # the stream's own order: no input permutation; 4 bits as stream nibbles
        assert w.shape == (24, in_f) and p.perm is None and p.nib == (2 if bits == 4 else 0)


def test_registry_order_and_reasons():
    """Each CPU kernel names why it refuses a layer; choose() takes the first that runs, in priority order."""
    assert [k.name for k in dispatch.KERNELS if k.backend == "cpu"] == [*cp.KERNELS, "c_vnni"]  # c_vnni: W8A8
    assert all(10 < k.priority < 100 for k in cp.CPU_KERNELS)
    meta, _ = _layer(16, 256, 5, 128, False, False, torch.bfloat16)
    assert "bits=5" in cp.why_not_int4(_key(meta, torch.bfloat16))
    assert "group 128" in cp.why_not_int8(_key(meta, torch.bfloat16))
    meta4, _ = _layer(16, 300, 4, 100, False, False, torch.bfloat16)
    assert "group 100" in cp.why_not_int4(_key(meta4, torch.bfloat16))
    assert "float32" in cp.why_not_int4(_key(meta4, torch.float32))
    assert "float64" in cp.why_not_c(_key(meta4, torch.float64))
    assert "device cuda" in cp.why_not_c(_key(meta4, torch.float32, device=torch.device("cuda")))
    nf4 = PackedMeta(4, 64, 256, 16, True, qformat="nf4", lut_shape=(1, 1, 16))
    assert all("qformat=nf4" in f(_key(nf4, torch.bfloat16)) for f in cp.WHY_NOT.values())
    for dt, bits, group, want in [(torch.bfloat16, 4, 128, "aten_int4_w4a16"), (torch.bfloat16, 8, -1,
                                  "aten_int8_w8a16"), (torch.float32, 4, 128, "c_lowbit_w4a16")]:
        m = _layer(16, 256, bits, group, False, False, dt)[0]
        kernel, why = dispatch.choose(_key(m, dt, has_gidx=True))
        assert kernel.label(_key(m, dt)) == want, (want, why)
    kernel, why = dispatch.choose(_key(nf4, torch.float32))
    assert kernel.name == "torch_ref" and "c_lowbit_w4a16: qformat=nf4" in why
    assert dispatch.choose(_key(meta, torch.float32, "int8"))[0].name not in cp.KERNELS  # W8A8: not weight-only


def test_unclean_act_order_is_refused_at_prepare():
    meta, bufs = _layer(16, 256, 4, 128, False, False, torch.float32)
    bufs["g_idx"] = (torch.arange(256) // 128).to(torch.int32)[torch.randperm(256)]  # 128 columns a group: runs
    want = ref.wa16_ref(x := torch.randn(2, 256), meta, *(bufs[k] for k in ("qweight", "scales", "qzeros",
                                                                           "g_idx", "bias")))
    assert rel_err(cp.run("c_lowbit", x, meta, bufs), want) < 1e-5
    bufs["g_idx"] = torch.tensor([0] * 100 + [1] * 156, dtype=torch.int32)[torch.randperm(256)]  # 100 / 156
    with pytest.raises(ValueError, match="QRESEARCH_KERNELS=torch"):
        cp.run("c_lowbit", x, meta, bufs)


def test_forced_cpu_backend_takes_w8a8_only_through_vnni(monkeypatch):
    """QRESEARCH_KERNELS=cpu: weight-only layers get c_lowbit; W8A8 layers our VNNI kernel where the CPU has it,
    else an error naming the refusals (never torch._int_mm, another backend)."""
    from qresearch.kernels import cpu_int8

    monkeypatch.setenv("QRESEARCH_KERNELS", "cpu")
    meta, _ = _layer(16, 64, 8, -1, True, False, torch.float32)
    kernel, _ = dispatch.choose(_key(meta, torch.float32))
    assert kernel.label(_key(meta, torch.float32)) == "c_lowbit_w8a16"
    if cpu_int8.load()[0] is not None:
        assert dispatch.choose(_key(meta, torch.float32, "int8"))[0].name == "c_vnni"
    else:
        with pytest.raises(RuntimeError, match="QRESEARCH_KERNELS=cpu"):
            dispatch.choose(_key(meta, torch.float32, "int8"))


def _reference(mod, x, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setenv("QRESEARCH_KERNELS", "torch")
        return mod(x)


def test_quantlinear_prepares_once_and_follows_its_buffers(monkeypatch):
    res = rtn_layer(32, 96, 4, 32, False, act_order=True)
    mod = QuantLinear.from_result(nn.Linear(96, 32), res)
    before, stored = {k: v.clone() for k, v in mod.state_dict().items()}, mod.weight_bytes()
    calls = []
    real = cp.PREPARE["c_lowbit"]
    monkeypatch.setitem(cp.PREPARE, "c_lowbit", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 96)
    y1, y2 = mod(x), mod(x)
    assert len(calls) == 1 and torch.equal(y1, y2) and mod.kernel_name == "c_lowbit_w4a16"
    assert mod.state_dict().keys() == before.keys() and all(torch.equal(mod.state_dict()[k], v)
                                                            for k, v in before.items())
    assert is_cached(mod.qweight) and mod.weight_bytes() == stored  # prepared tensors: no stored bytes
    other = QuantLinear.from_result(nn.Linear(96, 32), rtn_layer(32, 96, 4, 32, False, act_order=True, seed=7))
    mod.load_state_dict(other.state_dict())  # written in place -> prepared again, output follows the new weights
    assert rel_err(mod(x), _reference(other, x, monkeypatch)) < 1e-5 and len(calls) == 2
    mod.scales = mod.scales * 2  # a replaced buffer (as module.to / _apply does) -> prepared again
    assert rel_err(mod(x), _reference(mod, x, monkeypatch)) < 1e-5 and len(calls) == 3
    mod(x)
    gone = weakref.ref(mod.qweight)
    del mod, y1, y2
    gc.collect()
    assert gone() is None and len(calls) == 3  # the cache does not keep a layer's weights alive


def test_derived_bytes_count_what_kernels_hold_beside_the_buffers():
    """derived_bytes: a layer read in place holds only fp32 scales / zeros / zero * scale (3 x 4 bytes a group); an
    act-order layer's copied codes count too; a layer read in place is freed with its module."""
    model = nn.Sequential(QuantLinear.from_result(nn.Linear(96, 32), rtn_layer(32, 96, 4, 32, False)),
                          nn.ReLU(), QuantLinear.from_result(nn.Linear(32, 96), rtn_layer(96, 32, 4, 32, False)))
    assert derived_bytes(model) == 0  # nothing prepared yet
    model(torch.randn(2, 96))
    assert derived_bytes(model) == 12 * (32 * 3 + 96 * 1)
    ao = nn.Sequential(QuantLinear.from_result(nn.Linear(96, 32), rtn_layer(32, 96, 4, 32, False, act_order=True)))
    ao(torch.randn(2, 96))
    assert derived_bytes(ao) >= 32 * 96 // 2 + 12 * 32 * 3  # the permuted nibbles, then the scales
    gone = weakref.ref(model[0].qweight)
    del model
    gc.collect()
    assert gone() is None


def test_input_gradient_matches_reference(monkeypatch):
    mod = QuantLinear.from_result(nn.Linear(64, 24), rtn_layer(24, 64, 4, 32, False))
    grads, names = [], []
    for backend in ("auto", "torch"):
        monkeypatch.setenv("QRESEARCH_KERNELS", backend)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        (mod(x) * torch.arange(24.0)).sum().backward()
        grads.append(x.grad)
        names.append(mod.kernel_name)
    assert names == ["c_lowbit_w4a16", "torch_ref_w4a16"] and rel_err(grads[0], grads[1]) < 1e-6


@pytest.mark.parametrize("dtype,bits,group,kernel", [(torch.bfloat16, 4, 128, "aten_int4_w4a16"),
                                                     (torch.bfloat16, 8, -1, "aten_int8_w8a16"),
                                                     (torch.float32, 3, 32, "c_lowbit_w3a16")])
def test_stories260k_packed_matches_reference_and_fake(dtype, bits, group, kernel, monkeypatch):
    """Whole model: CPU kernel vs the reference kernel on the same packed model, and vs the fake format."""
    path = shared_dir() / "models" / "stories260K"
    if not path.is_dir():
        pytest.fail(f"stories260K not found at {path}; set QRESEARCH_SHARED")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qresearch.data.tokens import eval_tokens
    from qresearch.eval.ppl import perplexity
    from qresearch.nn.swap import swap_linears
    from tests.test_quantlinear import rtn_result

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids, _ = eval_tokens("wikitext2", "test", str(shared_dir() / "data"), tok, "local", max_tokens=4 * 256)
    result = rtn_result(model, bits=bits, group=group)
    model = model.to(dtype)
    fake, packed = copy.deepcopy(model), model
    swap_linears(fake, result, "fake")
    kernels = swap_linears(packed, result, "packed")
    assert set(kernels.values()) == {kernel}, kernels  # stories260K: in 64/172, out 32/64/172 (padded where needed)
    ppl = lambda m: perplexity(m, ids, 256, torch.device("cpu"), batch_size=2)["ppl"]  # noqa: E731
    short = ids.reshape(-1)[:5].reshape(1, 5)  # 5 tokens: the few-row (decode-like) kernel path, not dequant-once
    logits = torch.no_grad()(lambda m: m(input_ids=short).logits)
    p_fake, p_kernel, l_fake, l_kernel = ppl(fake), ppl(packed), logits(fake), logits(packed)
    monkeypatch.setenv("QRESEARCH_KERNELS", "torch")
    p_ref, l_ref = ppl(packed), logits(packed)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the kernels keep fp32 weights, the reference bf16
    assert abs(p_kernel - p_ref) / p_ref < tol and abs(p_kernel - p_fake) / p_fake < tol, (p_fake, p_kernel, p_ref)
    assert rel_err(l_kernel, l_ref) < 3 * tol and rel_err(l_kernel, l_fake) < 3 * tol


@pytest.mark.parametrize("dtype,bits,group,kernel", [(torch.float32, 4, 32, "c_lowbit_w4a16"),
                                                     (torch.float32, 3, 64, "c_lowbit_w3a16"),
                                                     (torch.float16, 4, 32, "c_lowbit_w4a16"),
                                                     (torch.bfloat16, 4, 32, "aten_int4_w4a16"),
                                                     (torch.bfloat16, 8, -1, "aten_int8_w8a16")])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_cpu_decode_plans_give_the_dispatch_path_bits_and_follow_the_buffers(dtype, bits, group, kernel, m):
    """Decode-sized calls on the CPU kernels go through the layer's kept plan: the dispatch path's bits (plans are
    off inside launcher.jit_only()); weights written in place (load_state_dict) or replaced rebind it; an fp16
    layer's bias (copied to fp32 by c_lowbit's bound call) is watched too."""
    from qresearch.kernels.launcher import jit_only

    mod = QuantLinear.from_result(nn.Linear(96, 32), rtn_layer(32, 96, bits, group, False, seed=1)).to(dtype)
    x = torch.randn(m, 96).to(dtype)
    with torch.no_grad():
        y = mod(x)
        chosen, _ = mod._kernel(CPU, dtype)  # the kernel of this call's dtype
        assert chosen.label(mod._key(CPU, dtype)) == kernel
        assert [p for p in mod._plans.values() if p[0] is not None], "no plan"
        with jit_only():
            assert torch.equal(y, mod(x))
        other = QuantLinear.from_result(nn.Linear(96, 32), rtn_layer(32, 96, bits, group, False, seed=2)).to(dtype)
        mod.load_state_dict(other.state_dict())  # in place: the same tensors, new versions
        y2 = mod(x)
        assert torch.equal(y2, other(x)) and not torch.equal(y2, y)
        mod.bias.add_(1.0)  # the bias alone, in place
        with jit_only():
            want = mod(x)
        assert torch.equal(mod(x), want) and not torch.equal(want, y2)
        mod.scales = mod.scales * 2  # replaced: a new plan
        with jit_only():
            want = mod(x)
        assert torch.equal(mod(x), want)


def test_layers_made_in_inference_mode_run_and_read_as_unversioned(monkeypatch):
    """Buffers created under torch.inference_mode keep no version counter (asking raises): the prepared-weight cache
    and the plans read them as version -1 (identity only) and the layer gives the reference's output."""
    from qresearch.kernels.prepared import version

    with torch.inference_mode():
        mod = QuantLinear.from_result(nn.Linear(96, 32), rtn_layer(32, 96, 4, 32, False))
        assert mod.qweight.is_inference() and version(mod.qweight) == -1
        x = torch.randn(1, 96)
        y1, y3 = mod(x), mod(torch.cat([x, x, x]))
        want = _reference(mod, x, monkeypatch)
    assert version(torch.zeros(2)) == 0 and version(None) is None
    assert [p for p in mod._plans.values() if p[0] is not None], "no plan"
    assert torch.equal(y1, y3[:1]) and rel_err(y1, want) < 1e-5
