"""Shared parts of the steps that train (QAT, regularization before PTQ): the frozen FP teacher, which parameters
train, where checkpoints and loss curves go, and weight-shape statistics that show what a regularizer did."""
from __future__ import annotations

import copy
import csv
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from qresearch.calib.train import TrainConfig, TrainReport, lm_losses
from qresearch.errors import ConfigError
from qresearch.method import Context
from qresearch.quant.regularizers import grouped, kurtosis

TRAIN_SETS = ("linears", "all")


def check_train_set(train: str) -> None:
    if train not in TRAIN_SETS:
        raise ConfigError(f"train={train!r} is unknown; allowed: {', '.join(TRAIN_SETS)}")


def frozen_teacher(model: nn.Module, loss: str) -> nn.Module | None:
    """A frozen copy of the FP model when the loss distils from it (kd, ce+kd), else None."""
    if "kd" not in loss:
        return None
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def select_trainable(model: nn.Module, linears: list[str], train: str) -> dict[str, nn.Parameter]:
    """Parameters to train (the named linears' weights and biases, or every parameter); the others are frozen.
    Tied parameters appear once."""
    keep = {f"{n}.{leaf}" for n in linears for leaf in ("weight", "bias", "inner.weight", "inner.bias")}
    out, seen = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        wanted = (train == "all" or name in keep) and id(p) not in seen and not _is_quantizer(name)
        if wanted:
            out[name] = p
            seen.add(id(p))
    for p in model.parameters():
        p.requires_grad_(id(p) in seen)
    return out


def _is_quantizer(name: str) -> bool:
    return ".wq." in name or ".aq." in name


def quantizer_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Learnable quantizer parameters (weight scale factors, activation scales, PACT clips) of QAT modules."""
    out = {n: p for n, p in model.named_parameters() if _is_quantizer(n)}
    for p in out.values():
        p.requires_grad_(True)
    return out


def model_fingerprint(model: nn.Module) -> str:
    """Cheap hash of the model's current parameters (sum and abs-sum of each), so a checkpoint only resumes the
    same starting point (e.g. the same prior step's folded scales)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{float(p.double().sum()):.10e}:{float(p.double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


# part of every checkpoint key: bumped when the loop's arithmetic changes, so a rerun never resumes a checkpoint the
# old loop wrote (2: KD's exact gradient, qresearch/calib/train.py _TokenKL)
TRAIN_LOOP_VERSION = "2"


def checkpoint_file(ctx: Context, step: str, settings: dict, model: nn.Module) -> tuple[Path | None, str]:
    """(<run dir>/../checkpoints/<step>-<key>.pt, key): shared by reruns of the same run tag, keyed by the step's
    settings, the calibration windows, the seed and the starting weights. None when the run has no directory."""
    payload = json.dumps(settings, sort_keys=True, default=str) + str(ctx.seed) + TRAIN_LOOP_VERSION
    calib = ctx.calib.cpu().numpy().tobytes() if ctx.calib is not None else b""
    key = hashlib.sha256(payload.encode() + calib + model_fingerprint(model).encode()).hexdigest()[:20]
    if ctx.out_dir is None:
        return None, key
    folder = Path(ctx.out_dir).parent / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{step}-{key}.pt", key


def write_history(ctx: Context, step: str, report: TrainReport) -> str | None:
    """The loss curve as <run dir>/<step>_train.csv; returns its file name (None without a run dir)."""
    if ctx.out_dir is None or not report.history:
        return None
    path = Path(ctx.out_dir) / f"{step}_train.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for row in report.history for k in row))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(report.history)
    return path.name


def step_logger(ctx: Context, step: str):
    """Per-step rows to the run's logger as <step>/<key>."""
    if ctx.log is None:
        return None
    return lambda row: ctx.log({f"{step}/{k}": v for k, v in row.items()})


@torch.no_grad()
def weight_shape(weights: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
    """Mean over weights of kurtosis and of max |w| / rms per group (what R2 / KURE act on)."""
    kurt, ratio = [], []
    for w in weights.values():
        wf = w.detach().float()
        kurt.append(float(kurtosis(wf)))
        wg = grouped(wf, group_size)  # [rows, n_groups, g]
        ratio.append(float((wg.abs().amax(-1) / wg.pow(2).mean(-1).sqrt().clamp_min(1e-12)).mean()))
    return {"kurtosis": sum(kurt) / len(kurt), "absmax_over_rms": sum(ratio) / len(ratio)}


def make_train_config(steps: int, lr: float, qparam_lr: float, batch_size: int, loss: str, grad_clip: float,
                      log_every: int, ckpt_every: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(steps, lr, qparam_lr, batch_size, loss, grad_clip, log_every, ckpt_every, seed)


def task_losses(model: nn.Module, teacher: nn.Module | None, loss: str):
    """loss_fn(ids) -> {'ce' / 'kd': ...} for the training loop."""
    return lambda ids: lm_losses(model, teacher, ids, loss)
