"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 (per-row activation scales, per-output-channel weight
scales) with mixed-precision decomposition. In every forward call, the input columns whose magnitude reaches
`threshold` in any row go through a float matmul; the rest through int8 x int8 -> int32.

The decomposition is decided per call by the modules (qresearch/nn/outliers.py): packed layers run the int8 part
with the registry's int8 kernel (torch._int_mm on CPU, Triton on CUDA) and fake layers with fake-quantized
activations. As in the authors' inference code (bitsandbytes, int8 weights), the float part multiplies the float
outlier columns of x with the dequantized int8 weight columns: weights are stored once, in int8.
"""
from __future__ import annotations

import math
import time

from qresearch.errors import ConfigError
from qresearch.method import Context, Method, Recorder, TagFlag
from qresearch.models.arch import target_linears
from qresearch.quant import QuantSpec, quantize_tensor
from qresearch.records import ActQuant, QuantResult


class LLMInt8(Method):
    """Every block linear (and the head if `lm_head`): int8 per-channel weights, int8 per-token activations with
    per-call outlier decomposition at `threshold`."""

    name = "llm_int8"
    tag_flags = (TagFlag("threshold", 6.0, "t{}"), TagFlag("lm_head", False, "head"))

    def __init__(self, threshold: float = 6.0, lm_head: bool = False):
        if not threshold > 0 or math.isnan(threshold):
            raise ConfigError(f"llm_int8 threshold={threshold} is invalid; allowed: > 0 (the paper uses 6.0; "
                              f"a huge value turns the decomposition off)")
        self.threshold, self.lm_head = float(threshold), lm_head
        self.spec = QuantSpec(bits=8, group_size=-1, sym=True, granularity="channel")
        self.act = QuantSpec(bits=8, sym=True, granularity="token")

    def quantize(self, model, ctx: Context) -> QuantResult:
        result = QuantResult()
        rec = Recorder(self.name, result)
        act = ActQuant(self.act, outlier_threshold=self.threshold)
        for name, lin in target_linears(model, ctx.arch, self.lm_head).items():
            t0 = time.perf_counter()
            rec.record(name, quantize_tensor(lin.weight.data, self.spec), lin.weight.data, act=act, t0=t0,
                       threshold=self.threshold)
        result.info["decomposition"] = "per call (outlier columns counted per layer at eval: metrics.activations)"
        return result
