"""The one place that turns a QuantResult into modules."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError, NumericalError
from ..records import LayerResult, QuantResult
from .fake import build_fake
from .integer import build_integer
from .packed import build_packed

# modules kind -> builder(linear, layer_result) -> module
BUILDERS: dict[str, Callable[[nn.Linear, LayerResult], nn.Module]] = {"fake": build_fake, "packed": build_packed,
                                                                      "integer": build_integer}
MODULES = tuple(BUILDERS)


def get_module(root: nn.Module, path: str) -> nn.Module | None:
    """Module at a dotted path, or None if any part is missing (e.g. OPT's optional project_in)."""
    m = root
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def swap_linears(model: nn.Module, result: QuantResult, modules: str = "fake") -> dict[str, str]:
    """Replace every linear named in `result` by a `modules` module (fake | packed | integer).
    Returns {module name: kernel used}."""
    if modules not in BUILDERS:
        raise ConfigError(f"modules={modules!r} is unknown; allowed: {', '.join(BUILDERS)}")
    used = {}
    for name, res in result.layers.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{name} is {type(lin).__name__}, not nn.Linear; was it swapped twice?")
        try:
            new = BUILDERS[modules](lin, res)
        except NumericalError as e:
            raise NumericalError(f"{name}: {e}") from None
        set_module(model, name, new)
        used[name] = getattr(new, "kernel_name", modules)
    return used
