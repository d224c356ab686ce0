"""A short regularization phase before PTQ: fine-tune the FP weights of the block linears with R2 (range) and / or
KURE (kurtosis) regularizers, keeping the model's function by distillation from its frozen FP copy (or by
next-token loss). It quantizes nothing: later steps of the recipe (rtn, gptq, ...) quantize the regularized
weights. Recorded: the training curve, and the weights' kurtosis and max|w| / rms per group before and after.
With r2=null and kure_weight=0 it only fine-tunes (the control that separates the regularizer from the loop).
"""
from __future__ import annotations

from methods.training import (check_train_set, checkpoint_file, frozen_teacher, make_train_config, select_trainable,
                              step_logger, task_losses, weight_shape, write_history)
from qresearch.calib.train import train
from qresearch.method import Context, Method, TagFlag, require_calibration
from qresearch.models.arch import target_linears
from qresearch.nn.regularize import RegConfig, WeightRegularizer
from qresearch.records import QuantResult


class Regularize(Method):
    """Train the FP block linears with task loss + R2 / KURE; returns no quantized layers (see module docstring)."""

    name = "regularize"
    needs_calibration = True
    tag_flags = (TagFlag("r2_name", "linf", "r2{}"), TagFlag("r2_weight", 1.0, "r2w{}"),
                 TagFlag("kure_weight", 0.0, "kure{}"), TagFlag("steps", 100, "s{}"), TagFlag("loss", "kd", "{}"))

    def __init__(self, r2: str | None = "linf", r2_weight: float = 1.0, kure_weight: float = 0.0,
                 group_size: int = 128, eta: float = 1.0, train: str = "linears", steps: int = 100, lr: float = 1e-3,
                 qparam_lr: float = 1e-2, batch_size: int = 4, loss: str = "kd", grad_clip: float = 1.0,
                 log_every: int = 10, ckpt_every: int = 50):
        self.reg = RegConfig(r2, r2_weight if r2 is not None else 0.0, kure_weight, group_size, eta)
        check_train_set(train)
        self.r2, self.r2_weight, self.kure_weight = r2, r2_weight, kure_weight
        self.r2_name = r2 or "off"
        self.steps, self.loss, self.train = steps, loss, train
        self.cfg = make_train_config(steps, lr, qparam_lr, batch_size, loss, grad_clip, log_every, ckpt_every)

    def quantize(self, model, ctx: Context) -> QuantResult:
        require_calibration(self.name, ctx)
        ckpt, key = checkpoint_file(ctx, self.name, self.settings(), model)
        linears = target_linears(model, ctx.arch)
        lin_weights = {n: m.weight for n, m in linears.items()}
        before = weight_shape(lin_weights, self.reg.group_size)
        teacher = frozen_teacher(model, self.loss)
        weights = select_trainable(model, list(linears), self.train)
        reg = WeightRegularizer(lin_weights, self.reg)
        task = task_losses(model, teacher, self.loss)

        def loss_fn(ids):
            return {**task(ids), **(reg(lin_weights) if self.reg.active else {})}

        report = train(model, weights, {f"reg.{n}": p for n, p in reg.named_parameters()}, loss_fn, ctx.calib,
                       self.cfg, ctx.device, ckpt, key, step_logger(ctx, self.name), self.name)
        for p in model.parameters():
            p.requires_grad_(True)
        result = QuantResult()
        result.info["train"] = {**report.summary(), "history_file": write_history(ctx, self.name, report),
                                "trained_params": sum(p.numel() for p in weights.values()),
                                "weight_shape_before": before,
                                "weight_shape_after": weight_shape(lin_weights, self.reg.group_size)}
        return result
