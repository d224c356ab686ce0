"""The one place that turns a QuantResult into modules (DESIGN rule 2)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..method import LayerResult, QuantResult
from ..quant.spec import ConfigError
from .fake import FakeQuantLinear, layer_weight
from .packed import build_packed

# format name -> builder(linear, layer_result) -> module; issue-specific formats register here
BUILDERS: dict[str, Callable[[nn.Linear, LayerResult], nn.Module]] = {}


def _fake(lin: nn.Linear, res: LayerResult) -> nn.Module:
    w = lin.weight.data
    bias = None if lin.bias is None else lin.bias.data
    return FakeQuantLinear(layer_weight(res, w.dtype).to(w.device), bias, res, fp_weight=w)


BUILDERS["fake"] = _fake
BUILDERS["packed"] = build_packed


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def swap_linears(model: nn.Module, result: QuantResult, format: str = "fake") -> dict[str, str]:
    """Replace every linear named in `result` by a `format` module. Returns {module name: kernel/format used}."""
    if format not in BUILDERS:
        raise ConfigError(f"format={format!r} is unknown; allowed: {', '.join(sorted(BUILDERS))}")
    used = {}
    for name, res in result.layers.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, not nn.Linear; was it swapped twice?")
        new = BUILDERS[format](lin, res)
        set_module(model, name, new)
        used[name] = getattr(new, "kernel_name", format)
    return used
