"""Observers against direct computations on the concatenated stream."""
import pytest
import torch

from qresearch.quant import ConfigError, QuantSpec, fake_quantize
from qresearch.quant.observers import (HistogramObserver, MinMaxObserver, MovingAverageObserver, make_observer,
                                       percentile_threshold, rebin)

T8 = QuantSpec(bits=8, granularity="tensor", sym=True)


def batches(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(200, 64, generator=g) * (1 + i) for i in range(n)]


def test_minmax_equals_range_of_the_whole_stream():
    spec = QuantSpec(bits=4, group_size=8)  # 20 columns: groups of 8, 8 and a partial 4
    obs = MinMaxObserver(spec)
    xs = [torch.randn(6, 20) for _ in range(4)]
    for x in xs:
        obs.update(x)
    full = torch.stack(xs)  # [batches, rows, cols]
    for j, (a, b) in enumerate([(0, 8), (8, 16), (16, 20)]):
        torch.testing.assert_close(obs.min[:, j], full[:, :, a:b].amin(dim=(0, 2)))
        torch.testing.assert_close(obs.max[:, j], full[:, :, a:b].amax(dim=(0, 2)))
    s, z = obs.qparams()
    assert s.shape == z.shape == (6, 3)


def test_token_granularity_pools_rows():
    obs = MinMaxObserver(QuantSpec(bits=8, granularity="token", sym=True))
    for x in batches():
        obs.update(x)
    allx = torch.cat(batches())
    assert obs.min.shape == (1, 1) and float(obs.max) == float(allx.max()) and float(obs.min) == float(allx.min())


def test_moving_average_follows_ema():
    obs = MovingAverageObserver(T8, momentum=0.5)
    ref = None
    for x in batches():
        obs.update(x)
        ref = float(x.max()) if ref is None else ref + 0.5 * (float(x.max()) - ref)
    assert float(obs.max) == pytest.approx(ref)


def test_histogram_rebin_keeps_mass_and_percentile_matches_quantile():
    obs = HistogramObserver(T8, "percentile", bins=4096, percentile=99.0)
    xs = batches(n=6)
    for x in xs:
        obs.update(x)
    a = torch.cat(xs).abs().flatten()
    assert float(obs.hist.sum()) == a.numel()
    assert obs.threshold() == pytest.approx(float(torch.quantile(a, 0.99)), rel=0.02)
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(rebin(h, 1.0, 2.0).sum()) == 10.0 and percentile_threshold(h, 4.0, 100.0) == 4.0


@pytest.mark.parametrize("method", ["mse", "kl"])
def test_clipping_observers_beat_minmax_on_heavy_tails(method):
    """With a few huge outliers, a clipped 4-bit range has lower error on the bulk than min-max."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[:5] = 60.0
    spec = QuantSpec(bits=4, granularity="tensor", sym=True)
    obs = make_observer(method, spec)
    obs.update(x)
    t = obs.threshold()
    assert 1.0 < t < 30.0, t
    s, z = obs.qparams()
    err_clip = float((fake_quantize(x, spec, s, z) - x)[5:].pow(2).mean())
    err_mm = float((fake_quantize(x, spec) - x)[5:].pow(2).mean())
    assert err_clip < err_mm / 4


def test_make_observer_rejects_bad_input():
    with pytest.raises(ConfigError, match="observer='max'"):
        make_observer("max", T8)
    with pytest.raises(ConfigError, match="per-tensor"):
        make_observer("kl", QuantSpec(bits=8, granularity="token"))
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver(T8).qparams()


@pytest.mark.parametrize("method", ["percentile", "mse", "kl"])
def test_histogram_observers_on_degenerate_inputs(method):
    """All zeros: exact qparams (an input that never fired is not 'no data'); a constant input: its value kept,
    not clipped (KL once never tried the unclipped range, its candidate step skipping the last bin, and clipped a
    constant 2.5 to 0.16)."""
    spec = QuantSpec(bits=8, group_size=-1, sym=True, granularity="tensor")
    zeros = make_observer(method, spec)
    zeros.update(torch.zeros(64, 32))
    s, _ = zeros.qparams()
    assert float(s) == 1.0
    const = make_observer(method, spec)
    const.update(torch.full((64, 32), 2.5))
    x = torch.full((4, 4), 2.5)
    s, z = const.qparams()
    assert torch.allclose(fake_quantize(x, spec, s, z), x, rtol=0.01)
    with pytest.raises(RuntimeError, match="saw no data"):
        make_observer(method, spec).qparams()
