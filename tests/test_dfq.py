"""DFQ: CLE leaves the FP network's outputs unchanged and equalizes ranges (conv nets with BN, Llama / OPT blocks);
bias correction reduces the mean output shift of a quantized toy conv / linear network (analytic and empirical);
the step end to end."""
import copy

import pytest
import torch
from torch import nn

from methods.dfq import DFQ, dfq_sequential, fold_all_bn, relu_pairs
from qresearch.calib.equalize import correct_bias, equalize, expected_relu, in_ranges, out_ranges
from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.models.conv import build_convnet
from qresearch.quant import QuantSpec
from tests.helpers import compose_cfg
from tests.pipeline_helpers import tiny_model

NET = [{"type": "conv", "out": 16, "kernel": 3, "padding": 1}, {"type": "bn"}, {"type": "relu"},
       {"type": "conv", "out": 16, "kernel": 3, "padding": 1}, {"type": "bn"}, {"type": "relu"},
       {"type": "pool"}, {"type": "flatten"}, {"type": "linear", "out": 10}]


def _net(dims: int, seed: int = 0) -> nn.Sequential:
    """A conv net with uneven channel ranges and trained-looking BN statistics (eval mode)."""
    torch.manual_seed(seed)
    net = build_convnet(NET, in_channels=3, dims=dims)
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.weight.mul_(torch.logspace(-1, 1, m.weight.shape[0]).reshape(-1, *[1] * (m.weight.dim() - 1)))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_(0.3, 0.5)
    return net.eval()


def _inputs(dims):
    g = torch.Generator().manual_seed(1)
    return torch.randn((64, 3, 16) if dims == 1 else (64, 3, 8, 8), generator=g)


@pytest.mark.parametrize("dims", [1, 2])
def test_cle_leaves_the_fp_network_unchanged_and_equalizes_ranges(dims):
    net, x = _net(dims), _inputs(dims)
    ref = net(x)
    fp = copy.deepcopy(net)
    assert sorted(fold_all_bn(fp)) == [0, 3] and relu_pairs(fp) == [(0, 3), (3, 8)]
    assert torch.allclose(fp(x), ref, atol=1e-4, rtol=1e-4)  # BN folding is exact in eval mode
    before = float(out_ranges(fp[0]).max() / out_ranges(fp[0]).min())
    for _ in range(3):
        for i, k in relu_pairs(fp):
            equalize(fp[i], fp[k])
    assert torch.allclose(fp(x), ref, atol=1e-4, rtol=1e-4)
    r1, r2 = out_ranges(fp[0]), in_ranges(fp[3])
    assert float(r1.max() / r1.min()) < before / 3
    assert float((r1 / r2).max()) < 1.5 and float((r1 / r2).min()) > 1 / 1.5


@pytest.mark.parametrize("kind,pairs", [("llama_mha", 2), ("llama", 1), ("opt", 2)])
def test_cle_in_llm_blocks_is_exact_on_the_tables_pairs(kind, pairs):
    model, ids = tiny_model(kind), torch.randint(0, 128, (2, 16))
    ref = model(input_ids=ids).logits
    step = DFQ(bits=8, cle=True, bias_correction="none")
    ctx = Context(calib=None, arch=arch_for(model), device=torch.device("cpu"))
    from qresearch.method import Recorder
    from qresearch.records import QuantResult
    rec = Recorder("dfq", QuantResult())
    rec.result.info["cle_pairs"], rec.result.info["cle_skipped"] = [], []
    for i, block in enumerate(model.get_submodule(ctx.arch.blocks)):
        step._equalize(block, f"b{i}.", ctx, rec)
    assert len(rec.result.info["cle_pairs"]) == pairs * 2  # per block, 2 blocks
    assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
    if kind == "llama":  # grouped-query attention: v -> o does not line up and is listed as skipped
        assert len(rec.result.info["cle_skipped"]) == 2


def test_expected_relu_matches_monte_carlo():
    mu, sigma = torch.tensor([-1.0, 0.0, 0.7]), torch.tensor([0.5, 1.0, 2.0])
    z = mu + sigma * torch.randn(400000, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(expected_relu(mu, sigma), z.relu().mean(0), atol=0.01)


@torch.no_grad()
def _mean_shift(fp: nn.Module, q: nn.Module, x: torch.Tensor) -> float:
    return float((fp(x) - q(x)).mean(0).abs().mean())


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("how", ["analytic", "empirical"])
def test_bias_correction_reduces_the_mean_output_shift_of_a_conv_net(dims, how):
    net, x = _net(dims), _inputs(dims)
    spec = QuantSpec(bits=4, group_size=-1, granularity="tensor")
    plain, corrected = copy.deepcopy(net), copy.deepcopy(net)
    dfq_sequential(plain, spec, cle=False, bias_correction="none")
    info = dfq_sequential(corrected, spec, cle=False, bias_correction=how, batches=[x[:32]])
    assert info["corrected"]  # analytic: the layers fed by a BN'd ReLU; empirical: every layer
    held_out = x[32:]
    assert _mean_shift(net, corrected, held_out) < 0.7 * _mean_shift(net, plain, held_out)


def test_bias_correction_on_a_linear_layer_removes_the_shift_exactly_for_its_mean():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    x = torch.randn(4096, 32) + torch.linspace(-2, 2, 32)
    wq = torch.round(lin.weight.data * 4) / 4
    fp = lin(x).mean(0)
    c = correct_bias(lin, wq, x.mean(0))
    shifted = nn.functional.linear(x, wq, lin.bias).mean(0)
    assert torch.allclose(shifted, fp, atol=1e-5) and lin.bias is not None and c.abs().max() > 0


def test_dfq_step_end_to_end_and_errors():
    model, ids = tiny_model("llama_mha"), torch.randint(0, 128, (4, 32))
    ctx = Context(calib=ids, arch=arch_for(model), device=torch.device("cpu"))
    res = DFQ(bits=4, per_tensor=True).quantize(model, ctx)
    assert len(res.layers) == 14 and res.layers["model.layers.0.mlp.down_proj"].weight.scale.numel() == 1
    assert all("bias_correction_rms" in r for r in res.stats) and len(res.info["cle_pairs"]) == 4
    assert model.model.layers[1].mlp.down_proj.bias is not None  # the correction lives in the model's bias
    p = plan(compose_cfg(["method=dfq", "model=stories260k", "logger=none", "bits=8"]))
    assert p.tag == "dfq-w8gt" and p.needs_calibration
    p = plan(compose_cfg(["method=dfq", "model=stories260k", "logger=none", "method.dfq.bias_correction=none",
                          "method.dfq.per_tensor=false", "group_size=-1"]))
    assert not p.needs_calibration and p.tag == "dfq-w4g-1-bc-none"
    with pytest.raises(ConfigError, match="batch-norm"):
        plan(compose_cfg(["method=dfq", "model=stories260k", "logger=none", "method.dfq.bias_correction=analytic"]))
