"""QAT / regularization steps: the training loop resumes from its checkpoint to the same weights, reports progress,
and the steps return codes + qparams (PACT clips as static scales) or regularized FP weights, end to end."""
import csv
import json

import pytest
import torch

from methods.qat import QAT
from methods.regularize import Regularize
from qresearch.calib.train import TrainConfig, batch_at, train
from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.runner import run
from tests.conftest import DATA, require_shared
from tests.helpers import compose_cfg
from tests.pipeline_helpers import tiny_model


def _ctx(model, n=8, seq=16, **kw):
    return Context(calib=torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1)),
                   arch=arch_for(model), device=torch.device("cpu"), **kw)


def test_batches_are_seeded_epochs():
    calib = torch.arange(10)[:, None]
    first = torch.cat([batch_at(calib, s, 2, 0) for s in range(5)])
    assert sorted(first.flatten().tolist()) == list(range(10))  # one epoch covers every window once
    assert torch.equal(batch_at(calib, 7, 2, 0), batch_at(calib, 7, 2, 0))


def _tiny_train(model, ckpt, steps, fail_at=None):
    w = dict(model.named_parameters())
    calib = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))

    def loss_fn(ids):
        if fail_at is not None and int(torch.tensor(len(calls))) == fail_at:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return {"ce": model(input_ids=ids, labels=ids).loss}
    calls: list = []
    cfg = TrainConfig(steps=steps, lr=1e-3, batch_size=2, loss="ce", log_every=2, ckpt_every=2)
    return train(model, w, {}, loss_fn, calib, cfg, torch.device("cpu"), ckpt, key="k", label="t")


def test_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, capsys):
    straight = tiny_model("llama")
    _tiny_train(straight, tmp_path / "a.pt", 6)
    assert "step 6/6" in capsys.readouterr().out
    crashed = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        _tiny_train(crashed, tmp_path / "b.pt", 6, fail_at=5)  # dies in step 6, after the step-4 checkpoint
    resumed = tiny_model("llama")
    report = _tiny_train(resumed, tmp_path / "b.pt", 6)
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 4" in out and "min left" in out
    assert report.resumed_from == 4 and [r["step"] for r in report.history] == [1, 2, 3, 4, 5, 6]
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_qat_returns_codes_and_pact_static_scales():
    model = tiny_model("llama")
    step = QAT(bits=4, group_size=32, act_bits=8, steps=4, batch_size=2, lr=1e-4, log_every=2)
    res = step.quantize(model, _ctx(model))
    assert len(res.layers) == 14
    for name, r in res.layers.items():
        assert r.act.static_scale is not None and r.act.spec.granularity == "tensor"
        assert r.stats["act_clip"] > 0 and r.stats["act_clip_init"] > 0
        assert not hasattr(model.get_submodule(name), "inner")  # plain linears back in place
    assert res.info["train"]["steps"] == 4 and res.info["train"]["last_loss"] > 0
    assert all(p.requires_grad for p in model.parameters())


def test_qat_learns_pact_clips_below_minmax_with_a_strong_l2_term():
    model = tiny_model("llama")
    step = QAT(bits=8, group_size=32, act_bits=8, steps=20, batch_size=2, pact_l2=1.0, qparam_lr=0.05)
    res = step.quantize(model, _ctx(model))
    shrunk = [r.stats["act_clip"] < r.stats["act_clip_init"] for r in res.layers.values()]
    assert all(shrunk)


def test_regularize_reduces_what_it_targets_and_quantizes_nothing():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1.5  # an outlier
    step = Regularize(r2="linf", r2_weight=1.0, group_size=32, steps=30, lr=3e-3, batch_size=2)
    res = step.quantize(model, _ctx(model))
    assert not res.layers and step.spec is None
    t = res.info["train"]
    assert t["weight_shape_after"]["absmax_over_rms"] < t["weight_shape_before"]["absmax_over_rms"]
    step = Regularize(r2=None, kure_weight=1.0, group_size=32, steps=30, lr=3e-3, batch_size=2)
    t = step.quantize(model, _ctx(model)).info["train"]
    assert abs(t["weight_shape_after"]["kurtosis"] - 1.8) < abs(t["weight_shape_before"]["kurtosis"] - 1.8)


def test_kd_only_fine_tune_stays_at_its_teacher():
    """The control (no regularizer, KD from the FP model) starts at its optimum: KD's gradient is exactly zero there,
    so Adam leaves every weight as it was (autograd's ~1e-8 rounding, normalized by Adam, once moved them lr-sized)."""
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = Regularize(r2=None, kure_weight=0.0, steps=5, lr=1e-2, batch_size=2).quantize(model, _ctx(model)).info["train"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert t["first_loss"] == t["last_loss"] == 0.0, t


def test_kd_gradient_equals_autograd_through_log_softmax():
    import torch.nn.functional as F

    from qresearch.calib.train import distill_kl

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 40, generator=g).requires_grad_()
    t = torch.randn(2, 5, 40, generator=g)
    ref = F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1), log_target=True,
                   reduction="batchmean")
    (g_ref,) = torch.autograd.grad(ref, s)
    ours = distill_kl(s, t)
    (g_ours,) = torch.autograd.grad(ours, s)
    assert torch.allclose(ours, ref, rtol=1e-6) and torch.allclose(g_ours, g_ref, atol=1e-8, rtol=1e-5)


def test_configs_tags_and_errors():
    p = plan(compose_cfg(["method=qat", "model=stories260k", "act_bits=8", "logger=none"]))
    assert p.tag == "qat-w4g128-a8t" and p.facts["act_bits"] == 8
    p = plan(compose_cfg(["method=kure_gptq", "model=stories260k", "bits=3", "logger=none"]))
    assert [s.name for s in p.steps] == ["regularize", "gptq"] and p.tag == "kure_gptq-w3g128-r2off-kure0.1"
    assert p.facts["bits"] == 3
    with pytest.raises(ConfigError, match="act_mode=dynamic with act_granularity=tensor"):
        plan(compose_cfg(["method=qat", "model=stories260k", "act_bits=8", "logger=none",
                          "method.qat.act_mode=dynamic"]))
    with pytest.raises(ConfigError, match="loss='mse'"):
        plan(compose_cfg(["method=qat", "model=stories260k", "logger=none", "method.qat.loss=mse"]))
    p = plan(compose_cfg(["method=r2_rtn", "model=stories260k", "logger=none", "method.regularize.r2=null"]))
    assert p.tag == "r2_rtn-w4g128-r2off"  # fine-tuning only: the control


def test_qat_run_writes_curve_and_checkpoint_and_a_rerun_reuses_it(tmp_path):
    require_shared()
    over = ["model=stories260k", "method=qat", "act_bits=8", f"data.root={DATA}", "logger=none",
            "eval.max_chunks=2", "data.n_samples=4", "data.seqlen=32", "skip_done=false",
            "method.qat.steps=4", "method.qat.batch_size=2", "method.qat.ckpt_every=2"]
    cfg = compose_cfg(over)
    cfg.paths.results, cfg.out_dir = str(tmp_path / "results"), str(tmp_path / "runs" / "a")
    m = run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "a" / "qat_train.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and {"kd", "pact_l2"} <= set(rows[0])
    info = m["run"]["steps"][0]["train"]
    assert info["history_file"] == "qat_train.csv" and info["resumed_from"] == 0
    assert len(list((tmp_path / "runs" / "checkpoints").glob("qat-*.pt"))) == 1
    cfg.out_dir = str(tmp_path / "runs" / "b")
    m2 = run(cfg)
    assert m2["run"]["steps"][0]["train"]["resumed_from"] == 4  # the finished state was reloaded, not retrained
    assert m2["ppl"]["wikitext2"]["ppl"] == pytest.approx(m["ppl"]["wikitext2"]["ppl"], rel=1e-5)
    saved = json.loads((tmp_path / "runs" / "b" / "metrics.json").read_text())
    assert saved["run"]["steps"][0]["name"] == "qat"
