"""Markdown for experiments/bench_gptq_vs_reference.py (machine, load, threads and repeats stated)."""
from __future__ import annotations


def _load(v) -> str:
    return " ".join(f"{x:.1f}" for x in v)


def _solver(meta: dict) -> list[str]:
    lines = ["## Solver: same weight and Hessian", "",
             "`gptq_quantize` vs the reference's `GPTQ.fasterquant`, w4 g128 asym, blocksize 128, percdamp 0.01; "
             "W ~ N(0, 0.02^2), H = M^T M + diag (rank-256 correlation, uneven channel scales). Seconds are the best "
             "of the alternating runs. *Identical*: our codes, scales and zeros equal the integer codes and "
             "(scale, zero) the reference rounds with (recorded through its `quantize` in one more untimed run), "
             "and our dequantized weight equals its output, bit for bit. *Inverse factor*: the Cholesky, inverse "
             "and Cholesky both run with the same LAPACK calls (measured apart, once): no reordering of ours can "
             "win that part back without changing the last bits, so it bounds the ratio on wide inputs.", "",
             "| layer | W [out x in] | act-order | ours s | reference s | reference / ours | inverse factor s | "
             "identical |", "|---|---|---|---|---|---|---|---|"]
    for r in meta["solver"]:
        same = r["identical"]
        ok = "yes" if all(same.values()) else "NO: " + ", ".join(k for k, v in same.items() if not v) + \
            f" ({r['codes_differing']} codes)"
        in_f = r["shape"].split("x")[1]
        lines.append(f"| {r['layer']} | {r['shape']} | {'on' if r['act_order'] else 'off'} | {r['ours_s']:.3f} | "
                     f"{r['reference_s']:.3f} | **{r['reference_s'] / r['ours_s']:.2f}x** | "
                     f"{meta['lapack'][in_f]:.3f} | {ok} |")
    return lines + [""]


def _job(meta: dict) -> list[str]:
    job = meta["job"]
    c, e = job["calibration"], job["eval"]
    lines = ["## Whole SmolLM2-135M GPTQ job", "",
             f"SmolLM2-135M-Instruct (weights stored as GGUF Q4_1, dequantized to float32), w4 g128 asym, "
             f"true-sequential, calibration {c['dataset']} {c['n_samples']} x {c['seqlen']} (seed {c['seed']}, ids "
             f"hash {c['hash']}), perplexity on {e['dataset']}, first {e['chunks']} chunks of {e['seqlen']}. "
             f"FP perplexity {job['fp_ppl']:.3f}.", "",
             "*Ours*: `methods/gptq.py` (batch 8 block forwards, one Hessian and one inverse factor per input group, "
             "replayed outputs of final submodules, the last group forward gives the block output). *Reference-style*:"
             " the reference's llama.py loop with `--true-sequential` (per linear group, a full batch-1 block forward "
             "of every sample feeding one Hessian per linear, its `fasterquant` per linear, then one more batch-1 "
             "forward of every sample), on the same model, windows and threads. The two Hessians sum the same tokens "
             "in a different order (batches of 8 vs 1, tokens vs samples in the running mean), so the codes are "
             "not bit-identical: the perplexities are compared.", "",
             "| act-order | ours s | reference-style s | reference-style / ours | ours ppl | reference-style ppl | "
             "replay peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in job["rows"]:
        mib = (r["replay_peak_bytes"] or 0) / 2**20
        lines.append(f"| {'on' if r['act_order'] else 'off'} | {r['ours_s']:.0f} | {r['reference_style_s']:.0f} | "
                     f"**{r['reference_style_s'] / r['ours_s']:.2f}x** | {r['ours_ppl']:.3f} | "
                     f"{r['reference_style_ppl']:.3f} | {mib:.0f} |")
    return lines + [""]


def markdown(meta: dict) -> str:
    m = meta["machine"]
    lines = ["# GPTQ: ours vs the reference implementation (IST-DASLab/gptq)", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), torch {m['torch']}, "
             f"**{m['threads']} torch thread(s)** for both; load average at start {_load(m['load_start'])}, at end "
             f"{_load(m['load_end'])}. Commit {m['commit']}; reference commit {m['reference_commit']} "
             f"(gptq.py + quant.py, not vendored).", "",
             "Regenerate: `flock /tmp/qresearch-heavy.lock python experiments/bench_gptq_vs_reference.py "
             + " ".join(meta["argv"]) + "`", ""]
    if meta["solver"]:
        lines += _solver(meta)
    if meta["job"]:
        lines += _job(meta)
    return "\n".join(lines)
