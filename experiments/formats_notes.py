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

stories260K, wikitext2 test, FP 117.50; one run per cell (GPTQ cells move by a few percent with float summation
order, so differences under ~2% are noise). Provenance: the format, KV-cache and palette cells ran at commit 8291e3e,
the mixed-precision cells at commit d086864 (both clean trees).

- **8 bits.** int8 per channel (117.41) and fp8_e4m3 per channel (117.25) are at FP; fp8_e5m2 is +3.2% (121.27).
  The weight errors order them (int8 0.006 < e4m3 0.025 < e5m2 0.050): with a per-channel scale a weight row has a
  bounded range, where a uniform grid is densest; a float format spends its codes on range, and E5M2 keeps only 2
  mantissa bits.
- **4 bits, RTN.** The best grids are nvfp4 (123.27 at 4.51 bits/weight: 16-value blocks with E4M3 scales) and int4
  g128 asym (124.83 at 4.29). nf4 g64 (133.18), fp4_e2m1 g32 (138.88), mxfp4 (141.74) and int4 g32 sym (146.01)
  follow. mxfp4 has the largest weight error of the 4-bit formats (0.116): its power-of-two E8M0 scale rounds a
  block's range up by up to 2x and wastes up to one bit. Symmetric int4 loses a level and cannot follow skewed
  groups, so g32 sym is worse than g128 asym despite groups four times smaller. nf4 has the lowest weight error
  (0.092) but not the lowest perplexity: its normal-quantile levels fit the bulk of a group, and perplexity is driven
  by the tails.
- **4 bits, GPTQ.** Error feedback shrinks the spread to 118.4-128 and reorders it: mxfp4 118.41, fp4 118.97, nf4
  double quant 120.40, nvfp4 120.65, k-means 120.73, int4 g128 122.46, int4 g32 sym 126.24. The float grids gain the
  most (fp4 138.9 -> 119.0): they put resolution near zero, where most weights are, and GPTQ corrects the coarse
  outer levels through the later columns. The GPTQ output errors (0.063-0.079) do not order these perplexities: the
  spread is at the noise level.
- **Two-level scales.** 8-bit group scales against one fp32 scale per tensor save 0.25 bits/weight (4.262 vs 4.514)
  at equal RTN perplexity (144.09 vs 146.01) and +1.3% with GPTQ. NF4 double quant saves 0.12 bits/weight (4.133 vs
  4.257) at the same perplexity.
- **k-means palettes** are not like for like in bits/weight here: a 16-entry fp16 palette per 64-wide row of this
  tiny model costs 4 bits/weight on its own (7.39 bits/weight for "4-bit"). Per bit it is the worst 4-bit entry; at
  3 bits (4.70 bits/weight) GPTQ + k-means (123.71; 126.18 after palette fine-tuning) is near int4 g128, which stores
  fewer bits.
- **3 bits and below.** int3 g128: RTN 210.46, GPTQ 155.94. At 2 and 1 bits RTN is unusable (ternary 1448, binary
  3086) and only GPTQ gives a working model (237 / 268); k-means with 4 entries per row (2.85 bits/weight) reaches
  182 with GPTQ.
- **Mixed precision at 3.5 bits/weight** (widths 3-8; each linear's sensitivity is its RTN output error at each
  width; greedy under the budget; allocation below):
  - With GPTQ: 145.11, better than uniform int3 g128 GPTQ (155.94, 3.28 bits/weight) and better than a random
    allocation at the same budget (149.92).
  - With RTN: 207.55 vs 210.46 for uniform w3, a small gain.
  - The sensitivity pass gives 4-5 bits to q/k projections and 3 bits to the MLP and o/v.
  - With 2-bit candidates allowed (widths 2-8): 186.02, worse than uniform w3. The layer-local proxy underrates
    what 2-bit layers do to the whole model, so 2 bits are off by default.
- **KV cache** (fp16 weights, one scale per token and KV head, keys after RoPE): int8 (117.52) and fp8_e4m3
  (117.48) are at FP, int4 is +16.6% (137.00). int4 KV on top of GPTQ w4 gives 144.33, vs 122.46 with an fp16 cache."""


def protocol_line(model: str, res: dict, overrides: list[str]) -> str:
    c = next((c for c in res.values() if c), None)
    if c is None:
        return "(no finished runs)"
    cal = next((c["calibration"] for c in res.values() if c and c["calibration"]), None) or {}
    note = f" Weights: {c['weights_note']}." if c["weights_note"] else ""
    return (f"FP perplexity {c['fp_ppl']:.3f}; wikitext2 test, seqlen {c['seqlen']}, {c['n_tokens']} tokens; "
            f"calibration C4 {cal.get('n_samples')} x {cal.get('seqlen')} (ids hash {cal.get('hash')}); per-model "
            f"overrides `{' '.join(overrides)}`.{note}")
