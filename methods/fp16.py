"""fp16: no quantization (the baseline row of every table)."""
from qresearch.method import Context, Method, QuantResult


class FP16(Method):
    """Identity: returns an empty result; the model keeps its full-precision linears."""

    name = "fp16"

    def quantize(self, model, ctx: Context) -> QuantResult:
        return QuantResult()
