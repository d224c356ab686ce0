"""QuantLinear (modules=packed) on CPU: equals the fake-quant layer, stores the bytes the arithmetic says,
and gives the fake format's perplexity on stories260K."""
import pytest
import torch
from torch import nn

from qresearch.eval.footprint import layer_bits
from qresearch.records import ActQuant, QuantResult
from qresearch.nn.fake import FakeQuantLinear
from qresearch.nn.packed import QuantLinear, packed_weight_bytes
from qresearch.nn.swap import swap_linears
from qresearch.quant import QuantSpec, quantize_tensor, weight_spec
from tests._qhelpers import cpu_w8a8_kernel, fp16_exact, rel_err, rtn_layer, shared_dir


def _pair(res, bias=True, seed=0):
    torch.manual_seed(seed)
    out_f, in_f = res.weight.codes.shape
    lin = nn.Linear(in_f, out_f, bias=bias)
    fake = FakeQuantLinear(res.weight.dequantize(torch.float32), lin.bias.data if bias else None, res,
                           fp_weight=lin.weight.data)
    return QuantLinear.from_result(lin, res), fake


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 128, False, False), (4, 64, True, True),
                                                      (3, 64, False, False), (2, 32, False, True),
                                                      (8, -1, True, False), (5, 100, False, False)])
def test_packed_equals_fake(bits, group, sym, act_order):
    res = rtn_layer(33, 172, bits, group, sym, act_order)  # 172 = 128 + 44: partial last group
    packed, fake = _pair(res)
    assert packed.kernel_name == f"c_lowbit_w{bits}a16"  # fp32 on CPU: our C kernel
    x = torch.randn(2, 7, 172)
    assert rel_err(packed(x), fake(x)) < 1e-6


@pytest.mark.parametrize("granularity,static", [("token", False), ("tensor", False), ("tensor", True)])
def test_w8a8_layer_close_to_fake(granularity, static):
    res = rtn_layer(40, 96, 8, -1, True)
    res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity=granularity),
                       torch.tensor([[0.03]]) if static else None)
    packed, fake = _pair(res)
    assert packed.kernel_name == f"{cpu_w8a8_kernel()}_w8a8"  # CPU: exact integer product, torch_ref's math
    x = torch.randn(5, 96)
    assert rel_err(packed(x), fake(x)) < 1e-5


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_int_mm_equals_reference_bitwise_and_follows_new_weights(static):
    from qresearch.kernels import reference as ref

    res = rtn_layer(40, 96, 8, -1, True)
    res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"), torch.tensor([[0.03]]) if static else None)
    packed, _ = _pair(res)
    x = torch.randn(5, 96)

    def want():
        return ref.w8a8_ref(x, packed.meta, packed.qweight, packed.scales, packed.bias,
                            packed.act_scale if static else None)

    assert torch.equal(packed(x), want())  # integer product exact on both sides, same float rescale order
    packed.qweight.copy_(torch.roll(packed.qweight, 1, dims=0))  # in place: the cached int8 weight is stale
    assert torch.equal(packed(x), want())


def test_other_activation_bits_use_fake_act_reference():
    res = rtn_layer(16, 64, 4, 32, False)
    res.act = ActQuant(QuantSpec(bits=6, sym=False, granularity="token"))
    packed, fake = _pair(res)
    assert packed.kernel_name == "c_lowbit_w4a6"
    x = torch.randn(3, 64)
    assert rel_err(packed(x), fake(x)) < 1e-6


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 128, False, False), (3, 32, True, False),
                                                      (2, 64, False, True), (8, -1, True, False)])
def test_measured_bytes_match_bit_arithmetic(bits, group, sym, act_order):
    res = rtn_layer(16, 1024, bits, group, sym, act_order)  # codes and zeros fill whole words per row
    packed, _ = _pair(res)
    assert packed.weight_bytes() * 8 == sum(layer_bits(res).values())


def test_partial_rows_pad_at_most_one_word():
    res = rtn_layer(10, 172, 4, 128, False)
    packed, _ = _pair(res)
    arithmetic = sum(layer_bits(res).values())
    assert 0 <= packed.weight_bytes() * 8 - arithmetic < 10 * 32 + 2 * 32  # < one word per row + per zero column


def test_extra_repr():
    packed, _ = _pair(rtn_layer(8, 64, 4, 32, True, act_order=True))
    r = repr(packed)
    for part in ("bits=4", "group=32", "sym=True", "layout=int32_k", "act_order=True", "kernel=c_lowbit_w4a16"):
        assert part in r


@pytest.mark.parametrize("qformat", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_weights_pack_and_match_fake(qformat):
    """Every format's codes pack the same way; the reference kernel decodes them through the format table."""
    from qresearch.records import LayerResult

    lin = nn.Linear(72, 8)
    q = quantize_tensor(lin.weight.data, weight_spec(8, 32, True, qformat=qformat))
    q.scale = q.scale.half().float()  # packed scales are fp16: compare at the stored precision
    packed = QuantLinear.from_result(lin, LayerResult(q))
    x = torch.randn(5, 72)
    assert "qformat=" + qformat in repr(packed) and packed.kernel_name == "torch_ref_w8a16"
    want = x @ q.dequantize().t() + lin.bias.data
    torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-5)
    assert packed.weight_bytes() * 8 == sum(layer_bits(LayerResult(q)).values())


def _stories():
    path = shared_dir() / "models" / "stories260K"
    if not path.is_dir():
        pytest.fail(f"stories260K not found at {path}; set QRESEARCH_SHARED")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def rtn_result(model, bits=4, group=128, sym=False) -> QuantResult:
    from methods.rtn import RTN
    from qresearch.method import Context
    from qresearch.models.arch import arch_for

    res = RTN(bits, group, sym).quantize(model, Context(None, arch_for(model), torch.device("cpu")))
    for layer in res.layers.values():
        fp16_exact(layer)
    return res


def test_stories260k_packed_ppl_equals_fake():
    import copy

    from qresearch.data.tokens import eval_tokens
    from qresearch.eval.footprint import footprint
    from qresearch.eval.ppl import perplexity

    model, tok = _stories()
    ids, _ = eval_tokens("wikitext2", "test", str(shared_dir() / "data"), tok, "local", max_tokens=8 * 256)
    result = rtn_result(model)
    fake, packed = copy.deepcopy(model), model
    assert set(swap_linears(fake, result, "fake").values()) == {"fake"}
    assert set(swap_linears(packed, result, "packed").values()) == {"c_lowbit_w4a16"}
    p_fake = perplexity(fake, ids, 256, torch.device("cpu"), batch_size=4)["ppl"]
    p_packed = perplexity(packed, ids, 256, torch.device("cpu"), batch_size=4)["ppl"]
    assert abs(p_packed - p_fake) / p_fake < 1e-5, (p_fake, p_packed)
    measured = packed_weight_bytes(packed)
    arithmetic = footprint(fake, result)["bits_per_weight"] * footprint(fake, result)["quantized_params"] / 8
    pad_words = sum(r.weight.scale.shape[0] + r.weight.scale.shape[1] for r in result.layers.values())
    assert arithmetic <= measured < arithmetic + 4 * pad_words  # < one word per code row + per zero column
    assert (measured - arithmetic) / arithmetic < 0.03, (measured, arithmetic)


def test_scale_overflowing_its_16_bit_storage_is_refused_with_the_layer_named():
    """A group scale beyond fp16's range would be stored as inf (packed outputs NaN while the fake path is finite):
    refused with the layer named; bf16 storage (bf16 models) holds it."""
    from qresearch.errors import NumericalError
    from qresearch.records import LayerResult

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[0, :128] = 1e6  # int4 asym scale ~6.7e4 > 65504
    for dtype, ok in ((torch.float32, False), (torch.bfloat16, True)):
        model = nn.Sequential(nn.Linear(256, 16, bias=False)).to(dtype)
        model[0].weight.data = w.to(dtype)
        res = QuantResult(layers={"0": LayerResult(weight=quantize_tensor(w.to(dtype), weight_spec(4, 128, False)))})
        if ok:
            swap_linears(model, res, "packed")
            assert torch.isfinite(model(torch.randn(2, 256, dtype=dtype))).all()
        else:
            with pytest.raises(NumericalError, match=r"^0: packed 16x256 linear: a group scale of 6\.\d+e\+04 "
                                                     r"overflows torch\.float16"):
                swap_linears(model, res, "packed")


@pytest.mark.parametrize("act", [False, True])
def test_copies_and_pickles_of_a_planned_layer_compute_with_their_own_buffers(act, tmp_path):
    """After a decode call (the layer keeps a plan: a closure over its buffers), a deep copy written in place gives
    its own weights' output, not the original's; torch.save of the whole module works and the loaded one gives the
    same output."""
    import copy

    res = rtn_layer(32, 96, 8, -1, True) if act else rtn_layer(32, 96, 4, 32, False)
    if act:
        res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"))
    mod, _ = _pair(res)
    x = torch.randn(1, 96)
    with torch.no_grad():
        y = mod(x)
        assert [p for p in mod._plans.values() if p[0] is not None], "no plan: the case tests nothing"
        twin = copy.deepcopy(mod)
        twin.scales.mul_(2)
        assert torch.equal(mod(x), y) and rel_err(twin(x), 2 * (y - mod.bias) + mod.bias) < 1e-5
        torch.save(mod, tmp_path / "m.pt")
        back = torch.load(tmp_path / "m.pt", weights_only=False)
        assert torch.equal(back(x), y)
