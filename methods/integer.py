"""Static quantization for integer-only inference (run it with modules=integer, qresearch/nn/integer.py): 8-bit
integer weights (symmetric, or with zero points; per output channel or per tensor), and per-tensor static input and
output qparams of every block linear from calibration min / max on the model as it stands (after earlier steps'
folds, e.g. method=smoothquant_integer). With modules=fake the same result fake-quantizes the inputs only."""
from __future__ import annotations

import time

import torch

from qresearch.calib.observe import feed_calibration
from qresearch.errors import ConfigError
from qresearch.method import Context, Method, Recorder, TagFlag, require_calibration
from qresearch.models.arch import target_linears
from qresearch.quant import QuantSpec, qparams_from_minmax, quantize_tensor
from qresearch.records import ActQuant, QuantResult


@torch.no_grad()
def observe_io_range(model, linears: dict, calib: torch.Tensor, device, batch_size: int = 8) -> dict:
    """{name: [in_min, in_max, out_min, out_max]} of each linear's input and output over calib [n, seq]."""
    rng: dict[str, list[float]] = {n: [0.0, 0.0, 0.0, 0.0] for n in linears}  # ranges always hold 0

    def hook(name):
        def fn(_m, args, out):
            r, x = rng[name], args[0]
            r[:] = [min(r[0], float(x.min())), max(r[1], float(x.max())), min(r[2], float(out.min())),
                    max(r[3], float(out.max()))]
        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    feed_calibration(model, handles, calib, device, batch_size, desc="observe io")
    return rng


def static_qparams(lo: float, hi: float, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor (scale [1, 1], zero [1, 1] or None when symmetric) for the range [lo, hi]."""
    scale, zero = qparams_from_minmax(torch.tensor([[lo]]), torch.tensor([[hi]]), spec)
    return scale, None if spec.sym else zero


class IntegerStatic(Method):
    """Static W8A8 with requantized outputs: the data modules=integer needs (input and output qparams per linear)."""

    name = "integer"
    needs_calibration = True
    integer_io = True  # provides what modules=integer needs
    tag_flags = (TagFlag("weight_granularity", "channel", "w{}"), TagFlag("weight_sym", True, "wasym"))

    def __init__(self, weight_sym: bool = True, weight_granularity: str = "channel", act_bits: int = 8,
                 act_sym: bool = False, batch_size: int = 8):
        if weight_granularity not in ("channel", "tensor"):
            raise ConfigError(f"integer weight_granularity={weight_granularity!r} is unknown; allowed: channel, tensor")
        if not 2 <= act_bits <= 8:
            raise ConfigError(f"integer act_bits={act_bits} is out of range; allowed: 2..8")
        self.weight_sym, self.weight_granularity, self.act_sym = weight_sym, weight_granularity, act_sym
        self.spec = QuantSpec(bits=8, group_size=-1, sym=weight_sym, granularity=weight_granularity)
        self.act = QuantSpec(bits=act_bits, sym=act_sym, granularity="tensor")
        self.out_spec = QuantSpec(bits=8, sym=False, granularity="tensor")
        self.batch_size = batch_size

    def quantize(self, model, ctx: Context) -> QuantResult:
        require_calibration(self.name, ctx)
        result = QuantResult()
        rec = Recorder(self.name, result)
        linears = target_linears(model, ctx.arch)
        ranges = observe_io_range(model, linears, ctx.calib, ctx.device, self.batch_size)
        for name, lin in linears.items():
            t0 = time.perf_counter()
            x_lo, x_hi, y_lo, y_hi = ranges[name]
            sx, zx = static_qparams(x_lo, x_hi, self.act)
            sy, zy = static_qparams(y_lo, y_hi, self.out_spec)
            act = ActQuant(self.act, sx, zx, out_spec=self.out_spec, out_scale=sy, out_zero=zy)
            rec.record(name, quantize_tensor(lin.weight.data, self.spec), lin.weight.data, act=act, t0=t0,
                       x_min=x_lo, x_max=x_hi, y_min=y_lo, y_max=y_hi)
        return result
