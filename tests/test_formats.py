"""Every numeric format of the table: its representable values round-trip exactly (enumerated), its encoder matches an
independent float64 reference rounding (brute force over the levels), its saturation is as documented, and its
footprint equals the arithmetic."""
import math

import pytest
import torch

from qresearch.errors import ConfigError
from qresearch.eval.footprint import layer_bits
from qresearch.quant import FORMATS, QuantSpec, quantize_tensor, weight_spec
from qresearch.quant.fitted import kmeans_1d, lut_lookup, nearest_sorted
from qresearch.quant.primitives import decode, encode
from qresearch.quant.scales import ScaleCoding, code_scales, decode_scales, encode_scales, level2_of
from qresearch.records import LayerResult

GRID = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "mxfp4": 4, "nvfp4": 4, "nf4": 4}
GROUP = {"mxfp4": 32, "nvfp4": 16}
# published NF4 levels (QLoRA / bitsandbytes), an independent check of our construction from normal quantiles
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def _spec(name, bits=None, **kw):
    bits = bits or GRID.get(name) or FORMATS[name].bits_allowed[-1]
    return QuantSpec(bits=bits, group_size=GROUP.get(name, 32), qformat=name, **kw)


def _finite_levels(spec):
    """(codes, values) of every code whose value is finite, one code per value (+0 for zero)."""
    vals = spec.format.levels(spec).double()
    codes = torch.arange(vals.numel())
    zeros = (vals == 0).nonzero()
    keep = torch.isfinite(vals) & ~((vals == 0) & (codes != (int(zeros[0]) if len(zeros) else -1)))
    return codes[keep], vals[keep]


def _ref_encode(r: torch.Tensor, codes: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Float64 brute force: nearest level; on an exact tie the even code; beyond the range the end level."""
    d = (r[:, None] - vals[None, :]).abs()  # [n, levels]
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    even = cand & (codes[None, :] % 2 == 0)
    pick = torch.where(even.any(dim=1, keepdim=True), even, cand)
    return codes[pick.double().argmax(dim=1)]


# --- enumeration: every representable value round-trips ------------------------------------------------------

@pytest.mark.parametrize("name", list(GRID) + ["binary", "ternary"])
@pytest.mark.parametrize("scale", [1.0, 0.25, 2.0**-9])
def test_representable_values_round_trip(name, scale):
    spec = _spec(name)
    codes, vals = _finite_levels(spec)
    s = torch.tensor(scale)
    x = (vals * scale).float()
    got = encode(x, s, torch.zeros(()), spec)
    assert torch.equal(got.long(), codes), name
    assert torch.equal(decode(got, s, torch.zeros(()), spec), x)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
def test_int_levels_round_trip(bits, sym):
    spec = QuantSpec(bits=bits, group_size=8, sym=sym)
    z = torch.tensor(float(2 ** (bits - 1)) if sym else 3.0)
    codes = torch.arange(2**bits).to(torch.uint8)
    x = decode(codes, torch.tensor(0.5), z, spec)
    assert torch.equal(encode(x, torch.tensor(0.5), z, spec), codes)


@pytest.mark.parametrize("name", list(GRID))
def test_quantize_tensor_reproduces_a_tensor_made_of_levels(name):
    """Whole pipeline (qparams from the data, two-level / power-of-two scales included): a tensor whose groups are
    levels times a power of two, each group holding the largest level, comes back exactly."""
    spec = _spec(name, scale_bits=None if name != "nf4" else 16)
    _, vals = _finite_levels(spec)
    g = spec.group_size
    reps = -(-vals.numel() // (g - 1))
    rows = []
    for k in range(reps):
        chunk = vals[k * (g - 1):(k + 1) * (g - 1)]
        chunk = torch.cat([chunk, vals.abs().max().reshape(1), torch.zeros(g - 1 - chunk.numel(), dtype=vals.dtype)])
        rows.append(chunk * 2.0 ** -(k % 3))
    x = torch.stack(rows).float()  # [reps, g]: one group per row
    q = quantize_tensor(x, spec)
    assert torch.equal(q.dequantize(), x), name


def test_fp8_infinities_and_saturation():
    e4, e5 = FORMATS["fp8_e4m3"], FORMATS["fp8_e5m2"]
    s4, s5 = _spec("fp8_e4m3"), _spec("fp8_e5m2")
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    assert e4.max_level == 448.0 and e5.max_level == 57344.0
    assert not torch.isinf(e4.levels(s4)).any()  # E4M3 (fn): no infinity
    assert torch.isinf(e5.levels(s5)).sum() == 2  # E5M2: +-inf codes exist ...
    big = torch.tensor([1e4, -1e9, 449.0])
    assert decode(encode(big, one, zero, s4), one, zero, s4).tolist() == [448.0, -448.0, 448.0]
    huge = torch.tensor([6e4, 1e30, -1e30])
    assert decode(encode(huge, one, zero, s5), one, zero, s5).tolist() == [57344.0, 57344.0, -57344.0]  # ... unused
    assert e4.saturated(big, one, zero, s4).all() and not e4.saturated(torch.tensor([448.0]), one, zero, s4).any()


# --- independent float64 reference rounding ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(GRID))
def test_encoder_matches_float64_reference(name):
    spec = _spec(name)
    codes, vals = _finite_levels(spec)
    g = torch.Generator().manual_seed(1)
    mids = (vals[1:] + vals[:-1]) / 2
    r = torch.cat([torch.randn(4000, generator=g, dtype=torch.float64) * vals.abs().max() / 2,
                   torch.randn(500, generator=g, dtype=torch.float64) * vals.abs().max() * 3,  # beyond the range
                   mids, vals])
    for scale in (0.125, 0.0173, 3.7):  # a power of two (exact ties) and two arbitrary scales
        s = torch.tensor(scale)
        x = (r * scale).float()
        got = encode(x, s, torch.zeros(()), spec).long()
        ref = _ref_encode(x.double() / s.double(), codes, vals)
        assert torch.equal(got, ref), (name, scale, int((got != ref).sum()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_encoder_matches_float64_reference(bits):
    spec = QuantSpec(bits=bits, group_size=8, sym=False)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 3
    x = torch.cat([x, torch.arange(-20, 20) + 0.5])  # exact ties: round half to even
    s, z = torch.tensor(0.25), torch.tensor(3.0)  # power-of-two scale: x / s is exact in float32
    ref = torch.clamp(torch.round(x.double() / 0.25) + 3, 0, 2**bits - 1)  # round() is half-to-even
    assert torch.equal(encode(x, s, z, spec).double(), ref)


def test_sign_formats_match_reference_rules():
    x = torch.tensor([-3.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 2.0])
    s = torch.tensor(1.0)
    assert encode(x, s, s, _spec("binary")).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert encode(x, s, s, _spec("ternary")).tolist() == [0, 1, 1, 1, 1, 1, 2, 2]  # |r| = 1/2 ties to 0


@pytest.mark.parametrize("qformat,bits", [("binary", 1), ("ternary", 2), ("int", 4), ("nf4", 4), ("kmeans", 2)])
def test_an_all_zero_group_stays_zero(qformat, bits):
    """A zero row / group (pruned weights, padding) dequantizes to 0 in every format; binary, which has no zero code,
    once gave it the scale 1, so +-1."""
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    w[1] = 0
    w[2, 128:] = 0
    deq = quantize_tensor(w, weight_spec(bits, 128, qformat in ("binary", "ternary"), qformat)).dequantize()
    assert deq[1].abs().max() == 0 and deq[2, 128:].abs().max() == 0


def test_nf4_levels_match_published_constants():
    levels = FORMATS["nf4"].levels(_spec("nf4"))
    assert torch.allclose(levels.double(), torch.tensor(NF4_PUBLISHED, dtype=torch.float64), atol=2e-7, rtol=0)


def test_kmeans_encoder_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    lut = torch.randn(6, 8, generator=g).sort(dim=-1).values  # one sorted palette per row
    x = torch.randn(6, 50, generator=g) * 2
    x[:, :7] = (lut[:, 1:] + lut[:, :-1]) / 2  # exact midpoints: ties to the lower entry
    got = nearest_sorted(x, lut)
    ref = (x[:, :, None].double() - lut[:, None, :].double()).abs().argmin(dim=-1)  # first minimum = lower entry
    assert torch.equal(got, ref)
    assert torch.equal(lut_lookup(lut, got), torch.gather(lut, 1, ref))
    col = nearest_sorted(x[:, 9], lut)  # a GPTQ column: one palette per value
    assert torch.equal(col, ref[:, 9])


# --- scales, formats' own rules ---------------------------------------------------------------------------------

def test_mx_and_nv_scales():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    mx = quantize_tensor(x, _spec("mxfp4"))
    e = torch.log2(mx.scale)
    assert torch.equal(e, e.round()) and mx.scale2 is None  # E8M0: powers of two
    amax = x.reshape(4, 2, 32).abs().amax(-1)
    assert torch.equal(mx.scale, torch.exp2(torch.floor(torch.log2(amax)) - 2))  # OCP MX rule
    nv = quantize_tensor(x, _spec("nvfp4"))
    g = 448 * 6 / x.abs().max()
    assert torch.allclose(nv.scale2, g.reshape(1, 1))
    e4 = (nv.scale * nv.scale2).to(torch.float8_e4m3fn).float()
    assert torch.equal(e4 / nv.scale2, nv.scale)  # block scale = an E4M3 value / the fp32 tensor scale


@pytest.mark.parametrize("kw,msg", [(dict(qformat="mxfp4", bits=4, group_size=128), "allowed: group_size=32"),
                                    (dict(qformat="nvfp4", bits=4, group_size=32), "allowed: group_size=16"),
                                    (dict(qformat="mxfp4", bits=4, group_size=32, scale_bits=6), "scale_bits=6"),
                                    (dict(qformat="kmeans", bits=3, scale_bits=8), "no scales"),
                                    (dict(qformat="nf4", bits=3), "bits=3"),
                                    (dict(qformat="int", bits=4, scale_bits=9), "scale_bits=9"),
                                    (dict(qformat="int", bits=4, scale_bits=8, scale_level2="row"), "scale_level2")])
def test_format_rules_are_one_line_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        QuantSpec(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("coding", [ScaleCoding("uint", 8, "channel"), ScaleCoding("uint", 4, "tensor"),
                                    ScaleCoding("e4m3", 8, "tensor"), ScaleCoding("e8m0", 8, None)])
def test_coded_scales_are_exact_fixed_points(coding):
    raw = torch.rand(5, 9, generator=torch.Generator().manual_seed(5)) * 3 + 1e-3
    s2 = level2_of(raw, coding)
    eff = code_scales(raw, s2, coding)
    assert torch.equal(decode_scales(encode_scales(eff, s2, coding), s2, coding), eff)
    if coding.kind == "e8m0":  # the power of two at or below
        assert (eff <= raw).all() and (raw < 2 * eff).all()
    else:  # nearest code: half a step of the coding
        step = raw.max() / 15 if coding.bits == 4 else raw.max() / 255 if coding.kind == "uint" else raw * 2**-3
        assert ((eff - raw).abs() <= step / 2 * (1 + 1e-6)).all()


def test_two_level_int_scales_cost_little_accuracy():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    err = {sb: float((quantize_tensor(w, weight_spec(4, 32, False, "int", sb)).dequantize() - w).norm())
           for sb in (None, 8, 4)}
    assert err[None] <= err[8] < 1.02 * err[None] and err[8] < err[4]


# --- fitted formats ---------------------------------------------------------------------------------------------

def test_weighted_kmeans_follows_the_weights():
    x = torch.cat([torch.zeros(50), torch.ones(50) * 10]).reshape(1, -1)
    w = torch.cat([torch.ones(50), torch.ones(50) * 1e-6]).reshape(1, -1)
    plain, weighted = kmeans_1d(x, None, 1), kmeans_1d(x, w, 1)
    assert float(plain) == pytest.approx(5.0) and float(weighted) < 1e-3


@pytest.mark.parametrize("group,shape", [(-1, (16, 1, 8)), (32, (16, 2, 8)), (0, (1, 1, 8))])
def test_kmeans_palettes_per_row_group_layer(group, shape):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    q = quantize_tensor(w, weight_spec(3, group, True, "kmeans"))
    assert tuple(q.lut.shape) == shape and torch.equal(q.lut, q.lut.half().float())
    assert torch.equal(q.lut, q.lut.sort(dim=-1).values)
    deq = q.dequantize()
    ref = lut_lookup(q.lut.expand(16, shape[1], 8)[:, torch.arange(64) // (64 // shape[1])], q.codes)
    assert torch.equal(deq, ref) and float((deq - w).norm() / w.norm()) < 0.3


def test_ternary_scale_is_a_fixed_point_of_its_threshold():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(8))
    q = quantize_tensor(w, weight_spec(2, -1, True, "ternary"))
    a = q.scale[:, 0]
    kept = w.abs() > a[:, None] / 2
    assert torch.allclose((w.abs() * kept).sum(1) / kept.sum(1), a, rtol=1e-3)
    assert set(q.codes.unique().tolist()) == {0, 1, 2}
    b = quantize_tensor(w, weight_spec(1, -1, True, "binary"))
    assert torch.allclose(b.scale[:, 0], w.abs().mean(1))


# --- footprint arithmetic ---------------------------------------------------------------------------------------

def _bits(spec, out=48, inp=256):
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(9))
    return layer_bits(LayerResult(quantize_tensor(w, spec)))


@pytest.mark.parametrize("spec,expected", [
    (weight_spec(4, 128, False), dict(codes=48 * 256 * 4, scales=48 * 2 * 16, zeros=48 * 2 * 4)),
    (weight_spec(4, 32, False, "int", 6, "tensor"), dict(codes=48 * 256 * 4, scales=48 * 8 * 6, scale2=32,
                                                         zeros=48 * 8 * 4)),
    (weight_spec(8, -1, True, "fp8_e4m3"), dict(codes=48 * 256 * 8, scales=48 * 16)),
    (weight_spec(4, 64, True, "fp4_e2m1"), dict(codes=48 * 256 * 4, scales=48 * 4 * 16)),
    (weight_spec(4, 32, True, "mxfp4"), dict(codes=48 * 256 * 4, scales=48 * 8 * 8)),
    (weight_spec(4, 16, True, "nvfp4"), dict(codes=48 * 256 * 4, scales=48 * 16 * 8, scale2=32)),
    (weight_spec(4, 64, True, "nf4"), dict(codes=48 * 256 * 4, scales=48 * 4 * 8, scale2=32)),
    (weight_spec(4, 64, True, "nf4", 8, "channel"), dict(codes=48 * 256 * 4, scales=48 * 4 * 8, scale2=48 * 32)),
    (weight_spec(3, -1, True, "kmeans"), dict(codes=48 * 256 * 3, lut=48 * 8 * 16)),
    (weight_spec(4, 0, True, "kmeans"), dict(codes=48 * 256 * 4, lut=16 * 16)),
    (weight_spec(1, -1, True, "binary"), dict(codes=48 * 256, scales=48 * 16)),
    (weight_spec(2, -1, True, "ternary"), dict(codes=48 * 256 * 2, scales=48 * 16)),
], ids=lambda v: v.tag if isinstance(v, QuantSpec) else "")
def test_footprint_equals_the_arithmetic(spec, expected):
    got = {k: v for k, v in _bits(spec).items() if v}
    assert got == expected
    assert math.isclose(sum(got.values()) / (48 * 256), sum(expected.values()) / (48 * 256))
