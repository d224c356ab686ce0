"""R2 (L-inf, margin, soft-min-max) and KURE have their documented values on hand-made tensors, and the
regularizer module trains its own parameters and reduces what it targets."""
import math

import pytest
import torch

from qresearch.errors import ConfigError
from qresearch.nn.regularize import RegConfig, WeightRegularizer
from qresearch.quant.regularizers import grouped, kure, kurtosis, r2_linf, r2_margin, r2_soft_min_max, soft_max

W = torch.tensor([[1.0, -3.0, 2.0, 0.0]])  # one row; groups of 2: [1, -3], [2, 0]


def test_grouping():
    assert grouped(W, 2).shape == (1, 2, 2) and grouped(W, -1).shape == (1, 1, 4) and grouped(W, 0).shape == (1, 1, 4)
    assert grouped(torch.zeros(3, 2, 5), 4).shape == (3, 3, 4)  # conv [out, in, k] -> [out, in * k] in groups


def test_linf_is_the_largest_magnitude_per_group():
    assert torch.equal(r2_linf(grouped(W, 2)), torch.tensor([[3.0, 2.0]]))
    assert torch.equal(r2_linf(grouped(W, -1)), torch.tensor([[3.0]]))


def test_margin_penalizes_weights_beyond_the_margin_and_the_margin_itself():
    # margin 2: group [1, -3]: (0 + 1^2) / 2 + 4 = 4.5; group [2, 0]: 0 + 4 = 4
    out = r2_margin(grouped(W, 2), torch.tensor([[2.0, -2.0]]))  # the margin's sign does not matter
    assert torch.allclose(out, torch.tensor([[4.5, 4.0]]))


def test_soft_min_max_limits():
    wg = grouped(W, -1)
    # hardness 0: soft max and soft min are both the mean -> range 0, plus eta * e^0
    assert torch.allclose(r2_soft_min_max(wg, torch.zeros(1, 1), eta=0.5), torch.tensor([[0.5]]))
    # large hardness: max - min = 2 - (-3) = 5, exp term vanishes
    assert torch.allclose(r2_soft_min_max(wg, torch.full((1, 1), 50.0)), torch.tensor([[5.0]]), atol=1e-4)
    # hardness 1 on [1, -3, 2, 0]: softmax-weighted mean, by hand
    e = [math.exp(v) for v in (1, -3, 2, 0)]
    smax = sum(v * x for v, x in zip((1, -3, 2, 0), e)) / sum(e)
    assert float(soft_max(wg, torch.ones(1, 1))) == pytest.approx(smax, rel=1e-6)


def test_kurtosis_and_kure():
    assert float(kurtosis(torch.tensor([-1.0, 1.0, -1.0, 1.0]))) == pytest.approx(1.0)
    assert float(kure(torch.tensor([-1.0, 1.0, -1.0, 1.0]))) == pytest.approx(0.64)  # (1 - 1.8)^2
    # [-2, 0, 0, 2]: mean 0, var 2, E[x^4] = 8 -> kurtosis 8 / 4 = 2
    assert float(kurtosis(torch.tensor([-2.0, 0.0, 0.0, 2.0]))) == pytest.approx(2.0)
    g = torch.Generator().manual_seed(0)
    assert float(kurtosis(torch.rand(200000, generator=g))) == pytest.approx(1.8, abs=0.02)
    assert float(kurtosis(torch.randn(200000, generator=g))) == pytest.approx(3.0, abs=0.05)


def test_regularizer_module_reduces_its_target_and_trains_its_parameters():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 0] = 12.0  # an outlier
    for kind in ("linf", "margin", "soft_min_max"):
        p = torch.nn.Parameter(w.clone())
        reg = WeightRegularizer({"w": p}, RegConfig(r2=kind, r2_weight=1.0, group_size=32))
        opt = torch.optim.Adam([p, *reg.parameters()], lr=1e-2)
        for _ in range(100):
            loss = reg({"w": p})["r2"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(p.detach().abs().max()) < 11.5, kind
    p = torch.nn.Parameter(torch.randn(16, 64))
    reg = WeightRegularizer({"w": p}, RegConfig(kure_weight=1.0))
    before = float(kurtosis(p.detach()))
    opt = torch.optim.Adam([p], lr=1e-2)
    for _ in range(100):
        loss = reg({"w": p})["kure"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(kurtosis(p.detach())) - 1.8) < abs(before - 1.8) / 2


def test_bad_regularizer_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="r2='l2'"):
        RegConfig(r2="l2", r2_weight=1.0)
    with pytest.raises(ConfigError, match="r2_weight=0"):
        RegConfig(r2="linf", r2_weight=0.0)
