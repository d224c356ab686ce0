"""Markdown + JSON for experiments/activation_table.py: one table per model, the issue's checks computed from the
numbers (holds / does NOT hold), outlier facts, and every command."""
from __future__ import annotations

import json
import os
from pathlib import Path

HEADER = """# Activation quantization: naive W8A8, SmoothQuant, LLM.int8(), ZeroQuant (+LKD), integer-only (issue 12)

wikitext2 test perplexity, GPTQ protocol (joined text, non-overlapping chunks of the model's seqlen: 256 for
stories260K, 512 for SmolLM2; `eval.max_chunks` per model below). Calibration: random C4 windows (validation docs
1100..2000), seed 0, sizes per model below; never the eval text. CPU, float32 models, one torch thread per run
(`OMP_NUM_THREADS=1`) on a 2-core machine shared with other jobs (load averages in the provenance line): the seconds and
latencies are single measurements under load; compare latencies within one model's table only, as ratios.
SmolLM2-135M's weights were stored as GGUF Q4_1 and dequantized to float on load: "FP" means those dequantized weights.

Settings. Weights symmetric int8 per output channel unless a row says otherwise (the SmoothQuant paper's O1-O3 use
per-tensor weights: the `per-tensor weights` row); the attention BMMs (q.k^T, attn.v) stay float in every row (the
paper quantizes them too). Naive W8A8 = RTN weights + the same activation scheme without smoothing. SmoothQuant:
alpha 0.5, the paper's norm -> linear pairs (q/k/v and gate/up or fc1 inputs; o_proj / down_proj inputs are not
smoothed) unless `pairs=all`. LLM.int8(): per-call decomposition at |x| >= 6.0; the float part uses the dequantized
int8 weight columns (bitsandbytes' inference form), so no extra bytes are stored. ZeroQuant: symmetric group-128
weights, per-token dynamic int8 activations; LKD = Adam on each block's latent weights against the FP block's
outputs (steps / batch per model below, lr 1e-4), FP inputs. Integer-only: uint8 inputs with a zero point, int8
weights, int32 accumulation with an int32 bias, fixed-point requantization of the output to uint8 (static ranges
from calibration), then dequantized for the float parts of the model.

Columns. "MiB" = the whole model as stored (quantized linears by their codes + scales, everything else at 16 bits);
"lin. MiB" = bytes of the packed linear buffers, measured (packed rows only). Latency (rows marked with a kernel):
`eval.latency`, random tokens, median of 5 after 2 warm-ups, prefill of 128 tokens and decode ms per token at batch 1,
through each run's own modules: FP = `nn.Linear` fp32 matmuls; packed W8A8 = per-token int8 quantization +
`torch._int_mm` (int8 x int8 -> int32, exact) + rescale. Outliers: max |x| over all linear inputs and the number of
channels reaching 6.0 (summed over inputs), on the first 8 calibration windows, FP model before -> after the method's
folds (outlier report of each run: outliers.csv / outliers.png in its run dir).
"""


def summarize(m: dict) -> dict:
    ppl = m["ppl"]["wikitext2"]
    lat = m.get("latency") or {}
    acts = m.get("activations") or {}
    fpt = m["footprint"]
    steps = {s["name"]: s for s in m["run"]["steps"]}
    out = {"tag": m["run"]["tag"], "ppl": ppl["ppl"], "fp_ppl": ppl["fp_ppl"], "n_tokens": ppl["n_tokens"],
           "seqlen": ppl["seqlen"], "weight_bytes": fpt["weight_bytes"],
           "packed_bytes": fpt.get("measured_packed_bytes"), "kernels": m["kernels"],
           "prefill_ms": (lat.get("prefill") or {}).get("128", {}).get("ms"),
           "decode_ms": (lat.get("decode") or {}).get("1", {}).get("ms_per_step"),
           "quantize_seconds": m["timing"]["quantize_seconds"], "calibration": m.get("calibration"),
           "weights_note": m["model"]["weights_note"], "outliers": {k: acts.get(k) for k in ("before", "after")},
           "decomposition": acts.get("decomposition")}
    if "smoothquant" in steps:
        s = steps["smoothquant"]
        out["smoothquant"] = {k: s.get(k) for k in ("alpha", "alpha_search", "folds_applied", "folds_refused")}
    if "zeroquant" in steps and steps["zeroquant"].get("lkd"):
        blocks = steps["zeroquant"]["lkd"]["blocks"]
        out["lkd"] = {"enabled": steps["zeroquant"]["lkd"].get("enabled"), "blocks": len(blocks),
                      "mse_before_mean": sum(b["mse_before"] for b in blocks) / len(blocks),
                      "mse_after_mean": sum(b["mse_after"] for b in blocks) / len(blocks)}
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _mib(b) -> str:
    return "-" if not b else (f"{b / 2**20:.3f}" if b < 10 * 2**20 else f"{b / 2**20:.1f}")


def _outl(c: dict) -> tuple[str, str]:
    b, a = (c["outliers"] or {}).get("before"), (c["outliers"] or {}).get("after")
    if not b:
        return "-", "-"
    mx = f"{b['max_abs']:.1f}" + (f" -> {a['max_abs']:.1f}" if a else "")
    ch = f"{b['channels_over']}" + (f" -> {a['channels_over']}" if a else "")
    return mx, ch


def model_table(cells: dict, rows: dict) -> list[str]:
    head = "| setting | method | ppl | vs FP | MiB | lin. MiB | prefill 128 ms | decode ms/tok | kernel | max abs x | " \
           "ch >= 6 | quant s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, (section, label, *_rest) in rows.items():
        c = cells.get(key)
        if c is None:
            lines.append(f"| {section} | {label} | n/a (not run / failed) |" + " |" * 9)
            continue
        rel = 100 * (c["ppl"] / (c["fp_ppl"] or c["ppl"]) - 1)  # the FP run records no separate FP ppl
        kern = ", ".join(f"{k} x{n}" for k, n in c["kernels"].items())
        mx, ch = _outl(c)
        lines.append(f"| {section} | {label} | {c['ppl']:.3f} | {rel:+.1f}% | {_mib(c['weight_bytes'])} | "
                     f"{_mib(c['packed_bytes'])} | {_f(c['prefill_ms'], '{:.1f}')} | "
                     f"{_f(c['decode_ms'], '{:.1f}')} | {kern} | {mx} | {ch} | {c['quantize_seconds']:.0f} |")
    return lines


CHECKS = [("SmoothQuant O1 closer to FP than naive per-token", "sq_o1", "naive_tok"),
          ("SmoothQuant O2 closer to FP than naive per-tensor dynamic", "sq_o2", "naive_tdyn"),
          ("SmoothQuant O3 closer to FP than naive per-tensor static", "sq_o3", "naive_static"),
          ("SmoothQuant W6A6 closer to FP than naive W6A6", "sq_w6a6", "naive_w6a6"),
          ("SmoothQuant W4A4 closer to FP than naive W4A4", "sq_w4a4", "naive_w4a4"),
          ("SmoothQuant + RTN W4A8 closer to FP than RTN W4A8", "sq_rtn_w4a8", "rtn_w4a8"),
          ("SmoothQuant + GPTQ W4A8 closer to FP than RTN W4A8", "sq_gptq_w4a8", "rtn_w4a8"),
          ("LLM.int8() closer to FP than naive per-token (same int8 path, no decomposition)", "llm_int8", "naive_tok"),
          ("ZeroQuant W8A8: LKD better than without", "zq_w8_lkd", "zq_w8"),
          ("ZeroQuant W4A8: LKD better than without", "zq_w4_lkd", "zq_w4")]


def checks(cells: dict) -> list[str]:
    out = []
    for text, a, b in CHECKS:
        if cells.get(a) and cells.get(b):
            pa, pb = cells[a]["ppl"], cells[b]["ppl"]
            out.append(f"- {text}: {'holds' if pa < pb else '**does NOT hold**'} ({pa:.3f} vs {pb:.3f})")
    c = cells.get("llm_int8")
    if c:
        rel = 100 * (c["ppl"] / c["fp_ppl"] - 1)
        out.append(f"- LLM.int8() within 2% of FP: {'holds' if abs(rel) <= 2 else '**does NOT hold**'} ({rel:+.2f}%)")
    return out


def outlier_lines(cells: dict) -> list[str]:
    base = next((c for c in cells.values() if c and (c["outliers"] or {}).get("before")), None)
    out = []
    if base:
        b = base["outliers"]["before"]
        out.append(f"- FP model, {b['inputs']} linear inputs: max |x| {b['max_abs']:.1f}; {b['inputs_with_outliers']} "
                   f"inputs hold {b['channels_over']} channels reaching 6.0; kurtosis mean {b['kurtosis_mean']:.1f}, "
                   f"max {b['kurtosis_max']:.1f} (Gaussian: 3).")
    d = (cells.get("llm_int8") or {}).get("decomposition")
    if d:
        out.append(f"- LLM.int8() at eval: {d['layers_with_outliers']} of {d['layers']} layers decomposed something; "
                   f"at most {d['max_columns_seen']} columns in one layer, {d['mean_columns_per_call']:.2f} columns per "
                   f"call on average, at most {100 * d['max_fraction_rows_affected']:.1f}% of a layer's tokens held "
                   f"an outlier.")
    for key in ("sq_o3", "sq_o3_all", "sq_o3_search"):
        s = (cells.get(key) or {}).get("smoothquant")
        if s:
            search = s.get("alpha_search")
            extra = f"; calibration NLL by alpha {search['calib_nll']}" if search else ""
            out.append(f"- {key}: alpha {s['alpha']}, folds applied {s['folds_applied']}, refused "
                       f"{s['folds_refused']}{extra}.")
    for key in ("zq_w8_lkd", "zq_w4_lkd"):
        z = (cells.get(key) or {}).get("lkd")
        if z:
            out.append(f"- {key}: mean block output MSE {z['mse_before_mean']:.4g} -> {z['mse_after_mean']:.4g} "
                       f"over {z['blocks']} blocks.")
    return out


def render(results: dict, rows: dict, models: dict, cmds: dict, repo: Path, notes: str = "",
           argv: str = "") -> tuple[str, dict]:
    js = {m: {k: (summarize(c) if c else None) for k, c in cells.items()} for m, cells in results.items()}
    lines = [HEADER, _provenance(results), "", notes, ""]
    for model, cells in js.items():
        any_cell = next((c for c in cells.values() if c), None)
        if any_cell is None:
            continue
        cal = next((c["calibration"] for c in cells.values() if c and c["calibration"]), {}) or {}
        lines += [f"## {model}", "", f"wikitext2 test, seqlen {any_cell['seqlen']}, {any_cell['n_tokens']} tokens; "
                  f"calibration C4 {cal.get('n_samples')} x {cal.get('seqlen')} (ids hash {cal.get('hash')}); "
                  f"per-model overrides: `{' '.join(models[model])}`. {any_cell['weights_note']}", "",
                  *model_table(cells, rows), "", "Checks (computed from the table):", "", *checks(cells), "",
                  "Outliers and method facts:", "", *outlier_lines(cells), ""]
        if (repo / "results" / f"activation_outliers_{model}.png").is_file():
            lines += [f"![outliers {model}](activation_outliers_{model}.png)", "",
                      "Per-channel max |x| (log10) of every linear input on calibration windows, before (top) and "
                      "after (bottom) SmoothQuant's folds (run sq_o3).", ""]
    lines += ["## Commands", "", f"Regenerate: `{argv or 'python experiments/activation_table.py'}` (resumable; "
              "`--collect-only` "
              "tabulates finished runs). Each cell is one run:", "", "```",
              *[c.replace(str(repo) + "/", "") for m in cmds.values() for c in m.values()], "```", ""]
    return "\n".join(lines), js


def _provenance(results: dict) -> str:
    """Code commits (dirty flag), library versions and machine of the runs in the table."""
    commits, versions, loads = set(), set(), []
    for cells in results.values():
        for m in cells.values():
            if not m:
                continue
            prov = json.loads((Path(m["_run_dir"]) / "provenance.json").read_text())
            load = Path(m["_run_dir"]) / "load.json"
            loads += list(json.loads(load.read_text()).values()) if load.is_file() else []
            commits.add(f"{(prov.get('git_commit') or '?')[:10]}{'+dirty' if prov.get('git_dirty') else ''}")
            v = prov.get("versions", {})
            versions.add(f"torch {v.get('torch')}, transformers {v.get('transformers')}, "
                         f"device {prov.get('gpu') or prov.get('device')}")
    load = (f"1-min load average at cell start / end {min(loads):.1f} .. {max(loads):.1f} on {os.cpu_count()} cores"
            if loads else "load average not recorded")
    return f"Provenance: code {', '.join(sorted(commits))}; {'; '.join(sorted(versions))}; {load}."
