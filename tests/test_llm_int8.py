"""LLM.int8(): per-call decomposition equals the float matmul when every feature is an outlier and the pure int8
emulation when none is; mixed calls add the two parts; the int8 GEMM (torch._int_mm) is exact; bad thresholds fail
in plan()."""
import pytest
import torch
import torch.nn.functional as F

from methods.llm_int8 import LLMInt8
from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.kernels import reference as ref
from qresearch.kernels.int_mm import int8_matmul, int8_matmul_emulated
from qresearch.nn.fake import FakeQuantLinear, build_fake
from qresearch.nn.packed import QuantLinear
from qresearch.quant import QuantSpec, quantize_tensor
from qresearch.records import ActQuant, LayerResult

from .conftest import DATA
from ._qhelpers import cpu_w8a8_kernel
from .helpers import compose_cfg


def _layer(threshold, out_f=24, in_f=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(out_f, generator=g))
    q = quantize_tensor(lin.weight.data, QuantSpec(bits=8, group_size=-1, sym=True, granularity="channel"))
    q.scale = q.scale.half().float()  # fp16-exact scales: packed and fake dequantize identically
    act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"), outlier_threshold=threshold)
    res = LayerResult(q, act=act)
    return lin, res, QuantLinear.from_result(lin, res), build_fake(lin, res)


def _x(seed=1, m=9, k=40):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("kind", ["packed", "fake"])
def test_every_feature_an_outlier_is_the_float_matmul(kind):
    lin, res, packed, fake = _layer(threshold=1e-12)
    mod = packed if kind == "packed" else fake
    x = _x()
    y = mod(x)
    w = res.weight.dequantize()  # int8 weights (bitsandbytes' inference form)
    torch.testing.assert_close(y, F.linear(x, w, lin.bias.data), rtol=1e-5, atol=1e-5)
    assert mod.outlier_counter.summary()["outlier_columns_seen"] == 40


def test_no_outlier_is_the_pure_int8_emulation():
    lin, res, packed, fake = _layer(threshold=1e9)
    x = _x()
    assert packed.kernel_name == f"{cpu_w8a8_kernel()}_w8a8+dynamic_fp_outliers"
    bufs = {k: getattr(packed, k) for k in ("qweight", "scales", "bias")}
    expect = ref.w8a8_ref(x, packed.meta, bufs["qweight"], bufs["scales"], bufs["bias"])  # float64 emulation
    assert torch.equal(packed(x), expect)
    torch.testing.assert_close(fake(x), expect, rtol=1e-5, atol=1e-5)
    assert packed.outlier_counter.summary()["fraction_rows_affected"] == 0


def test_mixed_call_splits_columns_and_counts_rows():
    lin, res, packed, fake = _layer(threshold=6.0)
    x = _x() * 0.5
    x[3, 5], x[7, 11] = 9.0, -7.5  # two outlier features, in two of nine rows
    cols = torch.zeros(40, dtype=torch.bool)
    cols[[5, 11]] = True
    w = res.weight.dequantize()
    regular = x.masked_fill(cols, 0)
    bufs = {k: getattr(packed, k) for k in ("qweight", "scales", "bias")}
    expect = ref.w8a8_ref(regular, packed.meta, bufs["qweight"], bufs["scales"], bufs["bias"]) + x[:, cols] @ w[:, cols].T
    torch.testing.assert_close(packed(x), expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fake(x), expect, rtol=1e-5, atol=1e-5)
    s = packed.outlier_counter.summary()
    assert s["outlier_columns"] == [5, 11] and s["fraction_rows_affected"] == pytest.approx(2 / 9)
    # without the decomposition the outliers widen row 3's and 7's int8 scale: the error grows
    plain = F.linear(x, lin.weight.data, lin.bias.data)
    no_dec = ref.w8a8_ref(x, packed.meta, bufs["qweight"], bufs["scales"], bufs["bias"])
    assert (packed(x) - plain).norm() < (no_dec - plain).norm()


def test_int8_gemm_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (37, 300), generator=g).to(torch.int8)
    b = torch.randint(-128, 128, (300, 23), generator=g).to(torch.int8)
    exact = a.long() @ b.long()
    out, path = int8_matmul(a, b)
    assert path == "int_mm" and out.dtype == torch.int32 and torch.equal(out.long(), exact)
    assert torch.equal(int8_matmul_emulated(a, b).long(), exact)


def test_w8a8_kernel_choice_and_backend_switch(monkeypatch):
    _, res, _, _ = _layer(threshold=1e9)
    res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"))
    lin = torch.nn.Linear(40, 24)
    packed = QuantLinear.from_result(lin, res)
    assert packed.kernel_name == f"{cpu_w8a8_kernel()}_w8a8"
    monkeypatch.setenv("QRESEARCH_KERNELS", "torch")
    ref_mod = QuantLinear.from_result(lin, res)
    assert ref_mod.kernel_name == "torch_ref_w8a8"
    x = _x()
    monkeypatch.delenv("QRESEARCH_KERNELS")
    y_int = packed(x)
    monkeypatch.setenv("QRESEARCH_KERNELS", "torch")
    assert torch.equal(y_int, ref_mod(x))


def test_method_records_int8_and_threshold():
    from tests.pipeline_helpers import tiny_model
    from qresearch.method import Context
    from qresearch.models.arch import arch_for

    model = tiny_model("opt")
    res = LLMInt8(threshold=4.0).quantize(model, Context(None, arch_for(model), torch.device("cpu")))
    r = next(iter(res.layers.values()))
    assert r.weight.spec.bits == 8 and r.act.outlier_threshold == 4.0 and r.act.spec.granularity == "token"
    assert len(res.layers) == 12


@pytest.mark.parametrize("value", ["0", "-1.5"])
def test_threshold_must_be_positive_before_loading(value):
    with pytest.raises(ConfigError, match=f"threshold={value} is invalid; allowed: > 0"):
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=llm_int8", "logger=none",
                          f"method.llm_int8.threshold={value}"]))


def test_fake_module_repr_names_threshold():
    _, _, _, fake = _layer(threshold=6.0)
    assert isinstance(fake, FakeQuantLinear) and fake.outlier_counter is not None
