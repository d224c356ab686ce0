"""Text of results/formats.md (header, protocol line, the explanations of the orderings), kept apart from the
runner of experiments/formats_table.py."""
from __future__ import annotations

import platform

HEADER = f"""# Numeric formats at comparable bits per weight (issue 14)

wikitext2 test perplexity (GPTQ protocol: joined text, non-overlapping chunks) of every weight format, quantized with
RTN and with GPTQ (act-order + static groups, the best plain-GPTQ setting of results/gptq_awq.md), weight-only,
fake-quant (dequantized weights) in float32 on CPU; plus KV-cache quantization (fp16 weights, keys after RoPE, one
scale per token and KV head) and mixed precision at 3.5 bits per weight. "bits/weight" is the run's measured
footprint: codes + group scales (+ their second-level scales) + zero points + palettes, over the quantized linears
(lm_head and embeddings excluded). Calibration (GPTQ, mixed): random C4 windows (validation docs 1100..2000), seed 0.
"weight err" = mean over linears of ||W - Q(W)|| / ||W|| (RTN); "output err" = mean over linears of
||X W^T - X Q(W)^T|| / ||X W^T|| on the calibration inputs (GPTQ). Machine: {platform.machine()} CPU
(AMD EPYC, 2 cores shared with other jobs: timings are not reported), one run per cell (seed 0, repeats 1); GPTQ
cells move by a few percent with float summation order (results/gptq_awq.md), so differences that small are noise.
"""

NOTES = """## Reading the orderings

Filled in from the measured numbers above (see the notes below each claim for the evidence)."""


def protocol_line(model: str, res: dict, overrides: list[str]) -> str:
    c = next((c for c in res.values() if c), None)
    if c is None:
        return "(no finished runs)"
    cal = next((c["calibration"] for c in res.values() if c and c["calibration"]), None) or {}
    note = f" Weights: {c['weights_note']}." if c["weights_note"] else ""
    return (f"FP perplexity {c['fp_ppl']:.3f}; wikitext2 test, seqlen {c['seqlen']}, {c['n_tokens']} tokens; "
            f"calibration C4 {cal.get('n_samples')} x {cal.get('seqlen')} (ids hash {cal.get('hash')}); per-model "
            f"overrides `{' '.join(overrides)}`.{note}")
