"""Small convolutional networks built from a config (a list of layer entries), for the conv paths of QAT and
data-free quantization (CNN-style conv -> BN -> ReLU stacks; 1-D convs as in speech models' convolution modules).

Entries: {type: conv, out, kernel, stride, padding, groups, bias} | {type: bn} | {type: relu} | {type: leaky_relu,
slope} | {type: pool} (global average) | {type: flatten} | {type: linear, out, bias}.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError

LAYER_TYPES = ("conv", "bn", "relu", "leaky_relu", "pool", "flatten", "linear")


def _conv(dims: int, c: int, e: dict) -> nn.Module:
    cls = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    return cls(c, int(e["out"]), int(e.get("kernel", 3)), stride=int(e.get("stride", 1)),
               padding=int(e.get("padding", 0)), groups=int(e.get("groups", 1)), bias=bool(e.get("bias", True)))


def build_convnet(layers: list[dict], in_channels: int, dims: int = 2) -> nn.Sequential:
    """nn.Sequential from layer entries (module docstring); dims 1 (Conv1d) or 2 (Conv2d)."""
    if dims not in (1, 2):
        raise ConfigError(f"convnet dims={dims} is unsupported; allowed: 1, 2")
    mods, c = [], int(in_channels)
    for i, e in enumerate(layers):
        kind = e.get("type")
        if kind not in LAYER_TYPES:
            raise ConfigError(f"convnet layer {i} type={kind!r} is unknown; allowed: {', '.join(LAYER_TYPES)}")
        if kind == "conv":
            mods.append(_conv(dims, c, e))
            c = int(e["out"])
        elif kind == "bn":
            mods.append({1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](c))
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "leaky_relu":
            mods.append(nn.LeakyReLU(float(e.get("slope", 0.01))))
        elif kind == "pool":
            mods.append({1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[dims](1))
        elif kind == "flatten":
            mods.append(nn.Flatten())
        else:
            mods.append(nn.Linear(c, int(e["out"]), bias=bool(e.get("bias", True))))
            c = int(e["out"])
    return nn.Sequential(*mods)
