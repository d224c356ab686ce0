"""RTN: round-to-nearest weight quantization with min-max qparams per group / channel / tensor."""
from __future__ import annotations

import time

from qresearch.method import Context, LayerResult, Method, QuantResult
from qresearch.models.arch import target_linears
from qresearch.quant import quantize_tensor, weight_spec
from qresearch.quant.stats import check_finite, rel_error


class RTN(Method):
    """Quantize every block linear (and the head if `lm_head`) independently; no calibration."""

    name = "rtn"

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, fmt: str = "int",
                 lm_head: bool = False):
        self.spec = weight_spec(bits, group_size, sym, fmt)  # None when bits == 16
        self.lm_head = lm_head

    def quantize(self, model, ctx: Context) -> QuantResult:
        result = QuantResult()
        if self.spec is None:
            return result
        for name, lin in target_linears(model, ctx.arch, self.lm_head).items():
            t0 = time.perf_counter()
            w = lin.weight.data
            q = quantize_tensor(w, self.spec)
            wq = q.dequantize()
            check_finite(name, wq)
            stats = {"layer": name, "method": self.name, "shape": list(w.shape), "weight_rel_err": rel_error(w, wq),
                     "seconds": time.perf_counter() - t0}
            result.layers[name] = LayerResult(q, stats=stats)
            result.stats.append(stats)
        return result
