"""GPTQ math against references: RTN on an identity Hessian, RTN's output error, blocksize invariance, act-order."""
import pytest
import torch

from methods.gptq import GPTQ, gptq_quantize
from qresearch.method import Context
from qresearch.models.arch import arch_for, blocks_of
from qresearch.calib.blockio import capture_inputs
from qresearch.calib.hooks import record_inputs
from qresearch.calib.stats import accumulate_hessian, add_gram_, output_rel_error
from qresearch.quant import QTensor, QuantSpec, choose_qparams, quantize, quantize_tensor, weight_spec
from qresearch.quant.spec import ConfigError
from tests.pipeline_helpers import stories260k, tiny_model

SPECS = [weight_spec(3, 64, False), weight_spec(4, 64, True), weight_spec(4, -1, False), weight_spec(3, 48, False)]


def _inputs(n=1024, d=200, seed=0):
    """Correlated inputs with a few large channels (like LLM activations): [n, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.3 * torch.randn(d, d, generator=g))
    return x * (1 + 4 * (torch.rand(d, generator=g) > 0.95))


def _out_err(x, w, wq):
    return float((x @ w.T - x @ wq.T).norm())


def test_accumulate_hessian_matches_definition():
    x = _inputs(300, 40).double()
    H, n = None, 0
    for chunk in x.float().split(70):
        H, n = accumulate_hessian(H, n, chunk.reshape(-1, 7, 40) if len(chunk) % 7 == 0 else chunk)
    assert n == 300
    torch.testing.assert_close(H.double(), 2 * x.T @ x / 300, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [3, 129, 300, 2100])
def test_gram_over_the_lower_triangle_is_the_full_product(n):
    """add_gram_ computes block rows of the lower triangle and mirrors them: the same values as one GEMM (float64
    check), the blocks above the diagonal exact transposes, and the update lands in H."""
    x = torch.randn(64, n, generator=torch.Generator().manual_seed(n))
    H = torch.full((n, n), 0.25)
    assert add_gram_(H, x) is H
    torch.testing.assert_close(H.double(), 0.25 + x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
    if n > 256:  # blocks are at most 256 high: entries 256+ above the diagonal are copies of those below
        assert torch.equal(H.triu(256), H.T.triu(256))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
def test_identity_hessian_gives_rtn(spec):
    """No cross-column correlation -> no error feedback: GPTQ must round exactly like RTN."""
    w = torch.randn(32, 200)
    q, _ = gptq_quantize(w, torch.eye(200), spec, blocksize=32)
    g_idx = q.g_idx
    ref = quantize_tensor(w, spec)
    assert g_idx is None
    torch.testing.assert_close(q.scale, ref.scale)
    assert torch.equal(q.codes, ref.codes)


def test_clamp_stats_count_weights_pushed_off_the_grid():
    """Min-max grids with no feedback never clamp; a grid half as wide as the weights clamps some."""
    spec = SPECS[0]
    w = torch.randn(16, 128)
    st: dict = {}
    gptq_quantize(w, torch.eye(128), spec, stats=st)
    assert st == {"clamped": 0.0, "clamped_loss": 0.0}
    grid = quantize_tensor(w * 0.5, spec)
    gptq_quantize(w, torch.eye(128), spec, qparams=(grid.scale, grid.zero), stats=st)
    assert 0.05 < st["clamped"] < 1 and 0 < st["clamped_loss"] <= 1


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.tag)
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_output_error_below_rtn_random(spec, act_order, static):
    x, w = _inputs(), torch.randn(48, 200)
    H, _ = accumulate_hessian(None, 0, x)
    q, loss = gptq_quantize(w, H, spec, blocksize=64, act_order=act_order, static_groups=static)
    g_idx = q.g_idx
    wq = q.dequantize(torch.float32)
    rtn = quantize_tensor(w, spec).dequantize()
    assert _out_err(x, w, wq) < 0.9 * _out_err(x, w, rtn)
    assert loss > 0
    assert (g_idx is not None) == (act_order and not static)


def test_blocksize_is_only_an_implementation_detail():
    """Lazy batch updates are exact: any blocksize gives the same rounding (up to float ties)."""
    x, w, spec = _inputs(), torch.randn(48, 200), weight_spec(4, 64, False)
    H, _ = accumulate_hessian(None, 0, x)
    a = gptq_quantize(w, H, spec, blocksize=128)[0]
    b = gptq_quantize(w, H, spec, blocksize=7)[0]
    assert (a.codes == b.codes).float().mean() > 0.995


def test_act_order_layout():
    """act_order alone: each group holds <= g columns, scale is per permuted group; static groups: min-max of W."""
    x, w, spec = _inputs(), torch.randn(16, 200), weight_spec(4, 64, False)
    H, _ = accumulate_hessian(None, 0, x)
    q, _ = gptq_quantize(w, H, spec, act_order=True)
    g_idx = q.g_idx
    counts = torch.bincount(g_idx.long(), minlength=4)
    assert counts.tolist() == [64, 64, 64, 8]  # partial last group stays the last in processing order
    perm = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(g_idx[perm[:64]], torch.zeros(64, dtype=torch.int32))
    qs, _ = gptq_quantize(w, H, spec, act_order=True, static_groups=True)
    gs = qs.g_idx
    assert gs is None
    torch.testing.assert_close(qs.scale, choose_qparams(w, spec)[0])


def test_gptq_below_rtn_on_real_captured_inputs():
    """stories260K block 1: down_proj (in=172: partial last group at g128) and q_proj on real C4-like inputs."""
    model = stories260k()
    arch = arch_for(model)
    torch.manual_seed(0)
    io = capture_inputs(model, arch, torch.randint(3, 512, (8, 128)), torch.device("cpu"), 4)
    block = blocks_of(model, arch)[1]
    xs = {}
    record_inputs(block, io, ["mlp.down_proj", "self_attn.q_proj"], lambda n, x: xs.setdefault(n, []).append(x))
    for name, spec in [("mlp.down_proj", weight_spec(3, 128, False)), ("self_attn.q_proj", weight_spec(4, 32, True))]:
        x = torch.cat(xs[name]).reshape(-1, xs[name][0].shape[-1])  # [tokens, in]
        w = block.get_submodule(name).weight.data
        H, _ = accumulate_hessian(None, 0, x)
        q, _ = gptq_quantize(w, H, spec)
        wq = q.dequantize(torch.float32)
        rtn = quantize_tensor(w, spec).dequantize()
        assert _out_err(x, w, wq) < _out_err(x, w, rtn), name
        assert abs(output_rel_error(w, wq, H) - _out_err(x, w, wq) / float((x @ w.T).norm())) < 1e-3


def test_gptq_method_on_tiny_model():
    model = tiny_model("llama")
    arch = arch_for(model)
    ctx = Context(calib=torch.randint(0, 128, (4, 32)), arch=arch, device=torch.device("cpu"))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    res = GPTQ(bits=3, group_size=32, act_order=True, true_sequential=True).quantize(model, ctx)
    assert len(res.layers) == 2 * 7 and len(res.stats) == 14
    assert all(r.weight.g_idx is not None and r.stats["out_rel_err"] < 1 for r in res.layers.values())
    for n, p in model.state_dict().items():  # the FP model is left as it was
        torch.testing.assert_close(p, before[n], msg=n)


def test_gptq_bad_options():
    with pytest.raises(ConfigError, match="bits=16"):
        GPTQ(bits=16)
    with pytest.raises(ConfigError, match="percdamp"):
        GPTQ(percdamp=2.0)
    assert isinstance(weight_spec(3, 64, False), QuantSpec)


@pytest.mark.parametrize("act_order", [False, True])
def test_fixed_qparams_are_kept_and_rounding_still_beats_rtn(act_order):
    """qparams=(scale, zero) from an earlier step (e.g. AWQ's clipped ranges) are kept; GPTQ only rounds, and its
    output error is below rounding-to-nearest on the same grid."""
    x, w, spec = _inputs(), torch.randn(48, 200), weight_spec(3, 64, False)
    H, _ = accumulate_hessian(None, 0, x)
    grid = quantize_tensor(0.8 * w, spec)  # a clipped grid: ranges shrunk to 80%
    q, _ = gptq_quantize(w, H, spec, blocksize=64, act_order=act_order, qparams=(grid.scale, grid.zero))
    g_idx = q.g_idx
    assert g_idx is None
    assert torch.equal(q.scale, grid.scale) and torch.equal(q.zero, grid.zero)
    nearest = QTensor(quantize(w, grid.scale, grid.zero, spec), grid.scale, grid.zero, spec).dequantize()
    assert _out_err(x, w, q.dequantize()) < 0.9 * _out_err(x, w, nearest)
    with pytest.raises(ValueError, match="qparams shapes"):
        gptq_quantize(w, H, spec, qparams=(grid.scale[:, :1], grid.zero[:, :1]))


def test_qparams_prior_needs_a_compatible_earlier_step():
    model = tiny_model("llama")
    arch = arch_for(model)
    ctx = Context(calib=torch.randint(0, 128, (4, 32)), arch=arch, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="qparams=prior needs an earlier step"):
        GPTQ(bits=3, group_size=32, qparams="prior").quantize(model, ctx)
    with pytest.raises(ConfigError, match="qparams='best'"):
        GPTQ(qparams="best")
    prior = GPTQ(bits=4, group_size=32).quantize(model, ctx)  # a different bit width than the next step
    ctx.prior = prior
    with pytest.raises(ConfigError, match="same bits/group_size/sym"):
        GPTQ(bits=3, group_size=32, qparams="prior").quantize(model, ctx)
