"""Integer-only static linear: fixed-point multipliers, int32 accumulation with zero points and int32 bias, and the
output within one output quantization step of the float computation; modules=integer end to end."""
import pytest
import torch
import torch.nn.functional as F

from methods.integer import IntegerStatic, static_qparams
from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.nn.integer import IntegerLinear, fixed_point, integer_accumulate, requantize
from qresearch.quant import QuantSpec, dequantize, quantize, quantize_tensor
from qresearch.records import ActQuant, LayerResult

from .conftest import DATA, require_shared
from .helpers import compose_cfg


def test_fixed_point_multiplier():
    m = torch.tensor([1e-6, 3.3e-4, 0.0123, 0.5, 0.999999, 1.7])
    m0, shift = fixed_point(m)
    assert bool(((m0 >= 2**30) & (m0 < 2**31)).all())
    approx = m0.double() / torch.pow(2.0, shift.double())
    assert torch.allclose(approx, m.double(), rtol=2**-30, atol=0)
    acc = torch.tensor([[-1000001, 3, 0, 12345678, -7, 2**30]], dtype=torch.int32)
    exact = torch.round(acc.double() * approx)
    got = requantize(acc, m0, shift).double()
    assert bool(((got - exact).abs() <= 1).all())  # ties round half up instead of half even


def _layer(w_sym: bool, w_gran: str, x_sym: bool, seed=0, out_f=48, in_f=96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b = torch.randn(out_f, generator=g) * 0.3
    x = torch.randn(64, in_f, generator=g).abs() * 1.5 - 0.4  # skewed: a zero point matters
    y = F.linear(x, w, b)
    xs = QuantSpec(bits=8, sym=x_sym, granularity="tensor")
    ys = QuantSpec(bits=8, sym=False, granularity="tensor")
    sx, zx = static_qparams(float(x.min()), float(x.max()), xs)
    sy, zy = static_qparams(float(y.min()), float(y.max()), ys)
    q = quantize_tensor(w, QuantSpec(bits=8, group_size=-1, sym=w_sym, granularity=w_gran))
    act = ActQuant(xs, sx, zx, out_spec=ys, out_scale=sy, out_zero=zy)
    return LayerResult(q, act=act), x, b, (xs, sx, zx), (ys, sy, zy)


@pytest.mark.parametrize("w_sym,w_gran,x_sym", [(True, "channel", False), (False, "channel", False),
                                                (True, "tensor", True), (False, "tensor", False)])
def test_integer_linear_within_one_output_step_of_float(w_sym, w_gran, x_sym):
    res, x, b, (xs, sx, zx), (ys, sy, zy) = _layer(w_sym, w_gran, x_sym)
    mod = IntegerLinear(res, b)
    y_int = mod(x)
    # float computation on the same quantized input and weights
    z = zx if zx is not None else torch.full_like(sx, xs.format.sym_zero(xs))
    xq = dequantize(quantize(x, sx, z, xs), sx, z, xs)
    y_float = F.linear(xq, res.weight.dequantize(), b)
    lo, hi = float((0 - zy) * sy), float((255 - zy) * sy)
    err = (y_int - y_float.clamp(lo, hi)).abs()
    assert float(err.max()) <= float(sy) * 1.0001, (float(err.max()), float(sy))
    assert float(err.mean()) < 0.4 * float(sy)  # mostly plain rounding (<= half a step) of the float value
    # every output is on the output grid
    codes = y_int / sy + zy
    assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_accumulator_is_int32_with_zero_points():
    g = torch.Generator().manual_seed(3)
    qx = torch.randint(-128, 128, (5, 33), generator=g).to(torch.int8)
    qw = torch.randint(-128, 128, (7, 33), generator=g).to(torch.int8)
    zx, zw = -17, torch.randint(-20, 20, (7,), generator=g)
    qb = torch.randint(-1000, 1000, (7,), generator=g)
    acc, _ = integer_accumulate(qx, zx, qw, zw, qw.long().sum(1), qb)
    ref = (qx.long() - zx) @ (qw.long() - zw[:, None]).T + qb
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), ref)
    big = torch.full((1, 70000), 127, dtype=torch.int8)
    with pytest.raises(OverflowError, match="int32"):
        integer_accumulate(big, -128, torch.full((1, 70000), 127, dtype=torch.int8), torch.zeros(1, dtype=torch.long),
                           torch.full((1,), 127 * 70000), None)


def test_builder_refuses_layers_without_static_io():
    res, _, b, *_ = _layer(True, "channel", False)
    res.act = ActQuant(QuantSpec(bits=8, sym=True, granularity="token"))
    with pytest.raises(ValueError, match="no static integer input scale"):
        IntegerLinear(res, b)


def test_config_errors_before_loading():
    with pytest.raises(ConfigError, match="modules=integer needs static input and output qparams"):
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=w8a8", "modules=integer", "logger=none"]))
    with pytest.raises(ConfigError, match="act_bits=9 is out of range"):
        IntegerStatic(act_bits=9)
    with pytest.raises(ConfigError, match="data.n_samples=0"):  # a static scheme without calibration data
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=integer", "modules=integer",
                          "logger=none", "data.n_samples=0"]))


def test_integer_modules_run_a_whole_model(tmp_path):
    require_shared()
    from qresearch.runner import run

    cfg = compose_cfg(["model=tiny_random_llama", f"data.root={DATA}", "method=integer", "modules=integer",
                       "logger=none", "eval.max_chunks=2", "data.n_samples=4", "data.seqlen=64", "skip_done=false"])
    cfg.paths.results, cfg.out_dir = str(tmp_path / "results"), str(tmp_path / "run")
    m = run(cfg)
    assert m["kernels"] == {"integer_int_mm": 14} and m["run"]["tag"] == "integer-w8g-1-sym-a8t-asym-integer"
    r = m["ppl"]["wikitext2"]
    assert abs(r["ppl"] / r["fp_ppl"] - 1) < 0.05  # a random model: integer-only stays close to its FP
    assert m["activations"]["before"]["inputs"] == 8 and (tmp_path / "run" / "outliers.csv").is_file()
