"""Markdown for experiments/bench_gptq_vs_reference.py (machine, load, threads and repeats stated)."""
from __future__ import annotations


def _load(v) -> str:
    return " ".join(f"{x:.1f}" for x in v)


def _solver(meta: dict) -> list[str]:
    lines = ["## Solver: same weight and Hessian", "",
             "`gptq_quantize` vs the reference's `GPTQ.fasterquant`, w4 g128 asym, blocksize 128, percdamp 0.01; "
             "W ~ N(0, 0.02^2), H = M^T M + diag (rank-256 correlation, uneven channel scales). Seconds are the best "
             "of the alternating runs (ours exact, ours fast, reference); the reference's are its `fasterquant` call "
             "alone (its layer holding W and its GPTQ object holding a copy of H are set up untimed, as its own "
             "pipeline has them), ours include copying H (`gptq_quantize` leaves the caller's H as it was). "
             "*Identical* (ours, `inverse=exact`, the "
             "default): our codes, scales and zeros equal the integer codes and (scale, zero) the reference rounds "
             "with (recorded through its `quantize` in one more untimed run), and our dequantized weight equals its "
             "output, bit for bit. *Fast* (`method.gptq.inverse=fast`): the inverse-Hessian factor from one "
             "Cholesky of the reversed H and a triangular inverse (half the flops of the reference's Cholesky, "
             "inverse, Cholesky); the same matrix in exact arithmetic but other last bits, so a few codes differ: "
             "*fast codes differ* is their share, *fast loss* GPTQ's objective tr(dW H dW^T) of the fast result over "
             "the reference's (1 = as good).", "",
             "| layer | W [out x in] | act-order | ours s | reference s | reference / ours | identical | fast s | "
             "reference / fast | fast codes differ (max step) | fast loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in meta["solver"]:
        same = r["identical"]
        ok = "yes" if all(same.values()) else "NO: " + ", ".join(k for k, v in same.items() if not v) + \
            f" ({r['codes_differing']} codes)"
        lines.append(f"| {r['layer']} | {r['shape']} | {'on' if r['act_order'] else 'off'} | {r['ours_s']:.3f} | "
                     f"{r['reference_s']:.3f} | **{r['reference_s'] / r['ours_s']:.2f}x** | {ok} | {r['fast_s']:.3f} | "
                     f"**{r['reference_s'] / r['fast_s']:.2f}x** | {r['fast_codes_differing']:.3%} "
                     f"({r['fast_max_code_step']}) | {r['fast_loss_vs_reference']:.5f} |")
    lines += ["", "The inverse factor alone (one run each). *torch's chain*: the reference's own calls "
              "(`cholesky`, `cholesky_inverse`, `cholesky(upper=True)`), each copying its input to column-major and "
              "masking its output. *Exact*: ours, the same LAPACK routines in place on one buffer "
              "(`qresearch/kernels/cpu_lapack.py`); *= torch* says whether its factor equals torch's bit for bit. "
              "These routines bound the exact ratio on wide inputs. Relative error is against the float64 factor.", "",
              "| in features | torch's chain s | exact s | = torch | torch / exact | fast s | exact / fast | "
              "exact rel. error | fast rel. error |",
              "|---|---|---|---|---|---|---|---|---|"]
    for in_f, r in meta["lapack"].items():
        if "torch_s" not in r:  # tables before the direct path
            r = dict(r, torch_s=float("nan"), exact_is_torch=None)
        same = {True: "yes", False: "**no**", None: "-"}[r["exact_is_torch"]]
        lines.append(f"| {in_f} | {r['torch_s']:.3f} | {r['exact_s']:.3f} | {same} | "
                     f"{r['torch_s'] / r['exact_s']:.2f}x | {r['fast_s']:.3f} | {r['exact_s'] / r['fast_s']:.2f}x | "
                     f"{r['exact_err']:.2e} | {r['fast_err']:.2e} |")
    return lines + [""]


def _job(meta: dict) -> list[str]:
    job = meta["job"]
    c, e = job["calibration"], job["eval"]
    lines = ["## Whole SmolLM2-135M GPTQ job", "",
             f"SmolLM2-135M-Instruct (weights stored as GGUF Q4_1, dequantized to float32), w4 g128 asym, "
             f"true-sequential, calibration {c['dataset']} {c['n_samples']} x {c['seqlen']} (one row per seed), "
             f"perplexity on {e['dataset']}, first {e['chunks']} chunks of {e['seqlen']}. "
             f"FP perplexity {job['fp_ppl']:.3f}.", "",
             "*Ours*: `methods/gptq.py` (batch 8 block forwards, one Hessian and one inverse factor per input group, "
             "replayed outputs of final submodules, the last group forward gives the block output). *Reference-style*:"
             " the reference's llama.py loop with `--true-sequential` (per linear group, a full batch-1 block forward "
             "of every sample feeding one Hessian per linear, its `fasterquant` per linear, then one more batch-1 "
             "forward of every sample), on the same model, windows and threads. The two Hessians sum the same tokens "
             "in a different order (batches of 8 vs 1, tokens vs samples in the running mean), so the codes are "
             "not bit-identical: the perplexities are compared, across calibration seeds.", "",
             "| act-order | seed (ids hash) | ours s | reference-style s | reference-style / ours | ours ppl | "
             "reference-style ppl | replay peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in job["rows"]:
        mib = (r["replay_peak_bytes"] or 0) / 2**20
        lines.append(f"| {'on' if r['act_order'] else 'off'} | {r.get('seed', 0)} ({r.get('calib_hash', '-')}) | "
                     f"{r['ours_s']:.0f} | {r['reference_style_s']:.0f} | "
                     f"**{r['reference_style_s'] / r['ours_s']:.2f}x** | {r['ours_ppl']:.3f} | "
                     f"{r['reference_style_ppl']:.3f} | {mib:.0f} |")
    rows = job["rows"]
    if len(rows) > 1:
        lines += ["", _spread("ours", [r["ours_ppl"] for r in rows]) + "; " +
                  _spread("reference-style", [r["reference_style_ppl"] for r in rows]) + "; time ratio " +
                  _spread("", [r["reference_style_s"] / r["ours_s"] for r in rows]).strip()]
    return lines + [""]


def _spread(name: str, v: list[float]) -> str:
    """'name mean +- sd (min..max)' over the seeds."""
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / max(len(v) - 1, 1)) ** 0.5
    return f"{name} {mean:.3f} +- {sd:.3f} ({min(v):.3f}..{max(v):.3f}, {len(v)} seeds)"


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
