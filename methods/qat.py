"""QAT: a short fine-tuning loop on calibration windows with fake-quantized weights and activations (straight-through
estimators), then codes + qparams like every method.

Weights: per group / channel, scales from the current weight each step (minmax) or learned (LSQ). Activations:
per-token dynamic, or per-tensor with a static observer scale, a learned scale, or a PACT clip (Choi et al. 2018:
learnable clip alpha per quantizer, gradient through the clip, L2 term `pact_l2 * sum (alpha / alpha_init)^2`:
the paper's alpha^2, relative to each clip's calibrated start because LLM activation ranges span orders of magnitude). The loss is
next-token cross-entropy and/or distillation from the frozen FP model, optionally plus R2 / KURE weight
regularizers. The result: RTN codes of the trained weights on the trained grid, and PACT clips / learned scales as
static per-tensor activation scales. The FP weights are trained in place (that is the method); the FP model the
run compares against was evaluated before.
"""
from __future__ import annotations

import time

import torch

from methods.rtn import act_spec
from methods.training import (check_train_set, checkpoint_file, frozen_teacher, make_train_config, quantizer_params,
                              select_trainable, step_logger, task_losses, weight_shape, write_history)
from qresearch.calib.observe import observe_inputs
from qresearch.calib.train import train
from qresearch.errors import ConfigError
from qresearch.method import Context, Method, Recorder, TagFlag, require_calibration, require_weight_spec
from qresearch.models.arch import target_linears
from qresearch.nn.regularize import RegConfig, WeightRegularizer
from qresearch.nn.trainable import ACT_MODES, ActQuantizer, WeightQuantizer, range_of_scale, unwrap, wrap
from qresearch.quant.observers import OBSERVERS, make_observer
from qresearch.records import QuantResult


class QAT(Method):
    """Quantization-aware training of every block linear (see module docstring)."""

    name = "qat"
    needs_calibration = True
    tag_flags = (TagFlag("act_mode", "pact", "{}"), TagFlag("weight_scale", "minmax", "lsq"),
                 TagFlag("steps", 200, "s{}"), TagFlag("loss", "kd", "{}"), TagFlag("train", "linears", "all"),
                 TagFlag("r2", None, "r2{}"), TagFlag("kure_weight", 0.0, "kure{}"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 act_bits: int = 8, act_granularity: str = "tensor", act_mode: str = "pact", act_init: str = "minmax",
                 act_qformat: str = "int", pact_l2: float = 1e-4, weight_scale: str = "minmax",
                 train: str = "linears", steps: int = 200, lr: float = 1e-4, qparam_lr: float = 1e-2,
                 batch_size: int = 4, loss: str = "kd", grad_clip: float = 1.0, r2: str | None = None,
                 r2_weight: float = 0.0, kure_weight: float = 0.0, reg_group_size: int = -1, log_every: int = 10,
                 ckpt_every: int = 50, init_windows: int = 16):
        self.spec = require_weight_spec(self.name, bits, group_size, sym, qformat)
        self.act = act_spec(act_bits, act_granularity, act_qformat)
        if act_mode not in ACT_MODES:
            raise ConfigError(f"act_mode={act_mode!r} is unknown; allowed: {', '.join(ACT_MODES)}")
        if self.act is not None and act_mode != "dynamic" and self.act.granularity != "tensor":
            raise ConfigError(f"act_mode={act_mode} learns / fixes one scale per tensor; set act_granularity=tensor "
                              f"(or act_mode=dynamic for per-token)")
        if self.act is not None and act_mode == "dynamic" and act_granularity == "tensor":
            raise ConfigError("act_mode=dynamic with act_granularity=tensor is not a trained quantizer; use "
                              "act_granularity=token, or act_mode static / learned / pact")
        if act_init not in OBSERVERS or pact_l2 < 0 or init_windows < 1:
            raise ConfigError(f"act_init={act_init!r} / pact_l2={pact_l2} / init_windows={init_windows} invalid; "
                              f"allowed: act_init in {', '.join(OBSERVERS)}, pact_l2 >= 0, init_windows >= 1")
        check_train_set(train)
        self.act_mode, self.act_init, self.pact_l2, self.init_windows = act_mode, act_init, pact_l2, init_windows
        self.weight_scale, self.train, self.steps, self.loss = weight_scale, train, steps, loss
        self.r2, self.kure_weight = r2, kure_weight
        self.reg = RegConfig(r2, r2_weight, kure_weight, reg_group_size)
        self.cfg = make_train_config(steps, lr, qparam_lr, batch_size, loss, grad_clip, log_every, ckpt_every)
        WeightQuantizer(self.spec, torch.zeros(1, 1), weight_scale)  # validates weight_scale now

    def _init_scales(self, model, linears: dict, ctx: Context) -> dict[str, torch.Tensor]:
        """Per-tensor activation scales [1, 1] from an observer over the first `init_windows` calibration windows."""
        if self.act is None or self.act_mode == "dynamic":
            return {}
        obs = observe_inputs(model, linears, ctx.calib[:self.init_windows], lambda: make_observer(self.act_init,
                                                                                                   self.act), ctx.device)
        return {n: o.qparams()[0].reshape(1, 1).float() for n, o in obs.items()}

    def _wrap(self, model, ctx: Context):
        linears = target_linears(model, ctx.arch)
        scales = self._init_scales(model, linears, ctx)
        return wrap(model, list(linears), lambda n, m: WeightQuantizer(self.spec, m.weight, self.weight_scale),
                    lambda n, m: None if self.act is None else ActQuantizer(self.act, self.act_mode, scales.get(n)))

    def _loss_fn(self, model, teacher, wrapped, reg):
        task = task_losses(model, teacher, self.loss)
        pact = [m.aq for m in wrapped.values() if m.aq is not None and m.aq.mode == "pact"]

        def loss_fn(ids):
            parts = task(ids)
            if pact and self.pact_l2 > 0:
                parts["pact_l2"] = self.pact_l2 * torch.stack([q.l2() for q in pact]).sum()
            if reg is not None:
                parts.update(reg({n: m.inner.weight for n, m in wrapped.items()}))
            return parts
        return loss_fn

    def quantize(self, model, ctx: Context) -> QuantResult:
        require_calibration(self.name, ctx)
        ckpt, key = checkpoint_file(ctx, self.name, self.settings(), model)
        teacher = frozen_teacher(model, self.loss)
        wrapped = self._wrap(model, ctx)
        weights = select_trainable(model, list(wrapped), self.train)
        reg = WeightRegularizer({n: m.inner.weight for n, m in wrapped.items()}, self.reg) if self.reg.active else None
        qparams = {**quantizer_params(model), **({f"reg.{n}": p for n, p in reg.named_parameters()} if reg else {})}
        report = train(model, weights, qparams, self._loss_fn(model, teacher, wrapped, reg), ctx.calib, self.cfg,
                       ctx.device, ckpt, key, step_logger(ctx, self.name), self.name)
        shape = weight_shape({n: m.inner.weight for n, m in wrapped.items()}, self.reg.group_size)
        result = self._records(model, wrapped)
        for p in model.parameters():
            p.requires_grad_(True)
        result.info["train"] = {**report.summary(), "history_file": write_history(ctx, self.name, report),
                                "trained_params": sum(p.numel() for p in weights.values()),
                                "fp_weight_shape_after": shape}
        return result

    def _records(self, model, wrapped) -> QuantResult:
        """Codes + qparams of the trained weights, the activation records, then the plain linears back in place."""
        result = QuantResult()
        rec = Recorder(self.name, result)
        for name, m in wrapped.items():
            t0 = time.perf_counter()
            act = m.aq.act_quant() if m.aq is not None else None
            extra = {}
            if m.aq is not None and m.aq.mode != "dynamic":
                extra = {"act_static_scale": float(act.static_scale),
                         "act_clip": float(act.static_scale) * range_of_scale(self.act),
                         "act_clip_init": float(m.aq.scale0) * range_of_scale(self.act)}
            rec.record(name, m.wq.qtensor(m.inner.weight), m.inner.weight.data, act=act, t0=t0, **extra)
        unwrap(model, wrapped)
        return result
