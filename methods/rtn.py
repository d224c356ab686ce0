"""RTN: round-to-nearest weight quantization with min-max qparams per group / channel / tensor,
optionally with activation quantization (dynamic per-token / per-tensor, or static from an observer)."""
from __future__ import annotations

import time

from qresearch.calib.observe import observe_inputs
from qresearch.errors import ConfigError
from qresearch.method import Context, Method, Recorder, TagFlag
from qresearch.models.arch import target_linears
from qresearch.quant import QuantSpec, get_format, quantize_tensor, weight_spec
from qresearch.quant.observers import OBSERVERS, make_observer
from qresearch.records import ActQuant, QuantResult

ACT_GRANULARITIES = ("token", "tensor")


def act_spec(bits: int, granularity: str, qformat: str = "int") -> QuantSpec | None:
    """Symmetric activation spec; bits=16 = activations stay in full precision."""
    if bits == 16:
        return None
    if granularity not in ACT_GRANULARITIES:
        raise ConfigError(f"act_granularity={granularity!r} is unknown; allowed: {', '.join(ACT_GRANULARITIES)}")
    if not 2 <= bits <= 8:
        raise ConfigError(f"act_bits={bits} is out of range; allowed: 2..8, or 16 for full-precision activations")
    if not get_format(qformat).act_ok:
        from qresearch.quant import FORMATS

        ok = ", ".join(n for n, f in FORMATS.items() if f.act_ok)
        raise ConfigError(f"act_qformat={qformat} cannot quantize activations dynamically; allowed: {ok}")
    return QuantSpec(bits=bits, sym=True, granularity=granularity, qformat=qformat)


class RTN(Method):
    """Quantize every block linear (and the head if `lm_head`) independently.

    Activations: act_bits=16 (off) or 2..8 with `act_granularity` token (per-token dynamic) or tensor; with
    `act_static` the per-tensor scale is fixed from calibration data by `act_observer` (minmax, moving_average,
    percentile, mse, kl) - that is the only case that needs calibration.
    """

    name = "rtn"
    tag_flags = (TagFlag("lm_head", False, "head"), TagFlag("act_static", False, "static"),
                 TagFlag("act_observer", "minmax", "{}"), TagFlag("bits_map", None, "bitsmap"))

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, qformat: str = "int",
                 scale_bits: int | None = None, scale_level2: str = "channel", bits_map: str | None = None,
                 lm_head: bool = False, act_bits: int = 16, act_granularity: str = "token", act_static: bool = False,
                 act_observer: str = "minmax", act_qformat: str = "int"):
        self.spec = weight_spec(bits, group_size, sym, qformat, scale_bits, scale_level2)  # None when bits == 16
        self.use_bits_map(bits_map)
        self.lm_head = lm_head
        self.act = act_spec(act_bits, act_granularity, act_qformat)
        self.act_static, self.act_observer = act_static, act_observer
        if act_static and (self.act is None or self.act.granularity != "tensor"):
            raise ConfigError("act_static=true needs act_bits in 2..8 and act_granularity=tensor")
        if act_observer not in OBSERVERS:
            raise ConfigError(f"act_observer={act_observer!r} is unknown; allowed: {', '.join(OBSERVERS)}")
        if act_observer != "minmax" and not act_static:
            raise ConfigError(f"act_observer={act_observer} sets static scales; it needs act_static=true")
        if self.act is not None and self.spec is None:
            raise ConfigError(f"act_bits={act_bits} with bits=16: activation-only quantization is not supported; "
                              f"set bits to 2..8")
        self.needs_calibration = act_static

    def _act_quant(self, model, linears, ctx: Context) -> dict[str, ActQuant]:
        if self.act is None:
            return {}
        if not self.act_static:
            return {n: ActQuant(self.act) for n in linears}
        obs = observe_inputs(model, linears, ctx.calib, lambda: make_observer(self.act_observer, self.act),
                             ctx.device)
        return {n: ActQuant(self.act, static_scale=o.qparams()[0]) for n, o in obs.items()}

    def quantize(self, model, ctx: Context) -> QuantResult:
        result = QuantResult()
        if self.spec is None:
            return result
        used = self.resolve_bits_map(model, ctx)
        if used is not None:
            result.info["bits_map"] = used
        rec = Recorder(self.name, result)
        linears = target_linears(model, ctx.arch, self.lm_head)
        acts = self._act_quant(model, linears, ctx)
        for name, lin in linears.items():
            t0 = time.perf_counter()
            act = acts.get(name)
            extra = {"act_static_scale": float(act.static_scale)} if act and act.static_scale is not None else {}
            rec.record(name, quantize_tensor(lin.weight.data, self.spec_for(name)), lin.weight.data, act=act, t0=t0,
                       **extra)
        return result
