"""Rendering of the learned-methods table (experiments/learned_table.py): per-cell summaries from each run's
metrics.json and layers.csv, then markdown sections per model with commands, step counts and wall times."""
from __future__ import annotations

import csv
import os
import platform
from pathlib import Path

HEADER = """# Learned rounding and clipping, data-free quantization (issue 13)

wikitext2 test perplexity, harness protocol (GPTQ protocol: test split joined, tokenized once, non-overlapping
chunks of the model's seqlen; the first `eval.max_chunks` chunks), fake-quant (dequantized weights) in float32 on
CPU. Weights asymmetric min-max per group unless stated. Calibration / training windows: random C4 validation
windows (documents 1100..2000), seed 0; evaluation never sees them. SmolLM2-135M's weights were stored as GGUF
Q4_1 (dequantized to float on load): its FP row is that model. Machine: {machine}; every run used
OMP_NUM_THREADS=1 on a 2-core box shared with other jobs, so wall times are upper bounds. One seed per cell
(no repeats).
"""


def machine() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "cpu"
    return f"{platform.machine()} {name}"


def _mean(xs):
    xs = [float(x) for x in xs if x not in (None, "")]
    return sum(xs) / len(xs) if xs else None


def layer_summary(run_dir: Path) -> dict:
    """Means over layers of what AdaRound / QAT / DFQ record per layer (layers.csv), when present."""
    path = run_dir / "layers.csv"
    if not path.is_file():
        return {}
    rows = list(csv.DictReader(open(path)))
    out = {}
    for key in ("block_rel_mse", "block_rel_mse_rtn", "changed_vs_rtn", "out_rel_err", "rtn_out_rel_err"):
        vals = [r.get(key) for r in rows if r.get("method") == "adaround"]
        if any(vals):
            out[f"adaround_{key}"] = _mean(vals)
    kept = [r.get("kept_rtn") for r in rows if r.get("method") == "adaround" and r.get("kept_rtn") not in (None, "")]
    if kept:
        out["adaround_kept_rtn"] = sum(k in ("True", "true", "1") for k in kept) / len(kept)
    clips = [(r.get("act_clip"), r.get("act_clip_init")) for r in rows if r.get("act_clip")]
    if clips:
        out["act_clip_over_init"] = _mean(float(a) / float(b) for a, b in clips)
    return out


def provenance(run_dir: Path) -> dict:
    import json

    path = run_dir / "provenance.json"
    p = json.loads(path.read_text()) if path.is_file() else {}
    return {"commit": (p.get("git_commit") or "?")[:10] + ("+dirty" if p.get("git_dirty") else ""),
            "torch_threads": p.get("torch_threads")}


def summarize(m: dict, run_dir: Path) -> dict:
    ppl = m["ppl"]["wikitext2"]
    steps = []
    for s in m["run"]["steps"]:
        d = {"name": s["name"], "seconds": s.get("seconds")}
        if "train" in s:
            t = s["train"]
            d["train"] = {k: t.get(k) for k in ("steps", "resumed_from", "seconds", "s_per_step", "first_loss",
                                                 "last_loss", "weight_shape_before", "weight_shape_after",
                                                 "fp_weight_shape_after")}
        if "engine" in s:
            d["engine_seconds"] = s["engine"].get("seconds")
        steps.append(d)
    return {"ppl": ppl["ppl"], "fp_ppl": ppl["fp_ppl"], "n_tokens": ppl["n_tokens"], "seqlen": ppl["seqlen"],
            "tag": m["run"]["tag"], "quantize_seconds": m["timing"]["quantize_seconds"], "steps": steps,
            "calibration": {k: (m.get("calibration") or {}).get(k) for k in ("n_samples", "seqlen", "hash")},
            "weights_note": m["model"]["weights_note"], "layers": layer_summary(run_dir), **provenance(run_dir),
            "load": _load(run_dir)}


def _load(run_dir: Path) -> dict | None:
    """1-min load average before / after the run, as the table script wrote it (None for older cells)."""
    import json

    path = run_dir / "load.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt_cell(c: dict | None) -> str:
    if c is None:
        return "n/a"
    return f"{c['ppl']:.2f}"


def _train_note(c: dict) -> str:
    notes = []
    for s in c["steps"]:
        t = s.get("train")
        if t:
            shared = ", reused from a checkpoint of an identical cell" if t["resumed_from"] == t["steps"] else ""
            notes.append(f"{s['name']}: {t['steps']} steps, {t['seconds']:.0f} s ({t['s_per_step']:.2f} s/step), "
                         f"loss {t['first_loss']:.3g} -> {t['last_loss']:.3g}{shared}")
        elif s.get("seconds") is not None:
            notes.append(f"{s['name']}: {s['seconds']:.0f} s")
    ly = c["layers"]
    if "adaround_block_rel_mse" in ly:
        notes.append(f"AdaRound block rel. MSE {ly['adaround_block_rel_mse']:.4f} vs RTN "
                     f"{ly['adaround_block_rel_mse_rtn']:.4f} (calibration windows), "
                     f"{100 * ly['adaround_changed_vs_rtn']:.1f}% of weights rounded differently from RTN"
                     + (f"; RTN's rounding kept (keep_best: learned one worse on the calibration windows) for "
                        f"{100 * ly['adaround_kept_rtn']:.0f}% of the linears" if ly.get("adaround_kept_rtn") else ""))
    if "act_clip_over_init" in ly:
        notes.append(f"mean clip / min-max clip {ly['act_clip_over_init']:.2f}")
    for s in c["steps"]:
        t = s.get("train") or {}
        b, a = t.get("weight_shape_before"), t.get("weight_shape_after")
        if b and a:
            notes.append(f"kurtosis {b['kurtosis']:.2f} -> {a['kurtosis']:.2f}, max|w|/rms per group "
                         f"{b['absmax_over_rms']:.2f} -> {a['absmax_over_rms']:.2f}")
    return "; ".join(notes)


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def section_md(model: str, section: str, cols: dict, rows: dict, cells: dict) -> list[str]:
    shown = [c for c in cols if any((row, c) in cells for row in rows)]
    if not shown:
        return []
    any_cell = next((v for v in cells.values() if v), None)
    fp = f"{any_cell['fp_ppl']:.2f}" if any_cell else "n/a"
    lines = [f"| {section} | " + " | ".join(f"{c} ppl | {c} wall s" for c in shown) + " |",
             "|---|" + "---|---|" * len(shown), "| FP | " + " | ".join(f"{fp} | -" for _ in shown) + " |"]
    notes = []
    for row in rows:
        if not any((row, c) in cells for c in shown):
            continue
        vals = []
        for c in shown:
            cell = cells.get((row, c))
            vals += [_fmt_cell(cell), f"{cell['quantize_seconds']:.0f}" if cell else "n/a"]
            if cell and _train_note(cell):
                notes.append(f"- {row} ({c}): {_train_note(cell)}")
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    return lines + ["", *notes, ""]


def _load_range(done: list[dict]) -> str:
    loads = [v for c in done if c.get("load") for v in c["load"].values()]
    return (f"1-min load average at cell start / end {min(loads):.1f} .. {max(loads):.1f} on {os.cpu_count()} cores"
            if loads else "load average not recorded")


def render(results: list[dict], sections: dict, models: dict, findings: str = "", argv: str = "") -> tuple[str, dict]:
    data: dict = {}
    for r in results:
        run_dir = Path(r["run_dir"])
        summ = r.get("summary") or (summarize(r["metrics"], run_dir) if r["metrics"] else None)
        data.setdefault(r["model"], {}).setdefault(r["section"], []).append(
            {"row": r["row"], "col": r["col"], "command": r["command"], **({"result": summ} if summ else {})})
    md = [HEADER.format(machine=machine()), findings, ""]
    for model, secs in data.items():
        done = [c["result"] for cs in secs.values() for c in cs if "result" in c]
        first = next((c for c in done if c["calibration"]["n_samples"]), done[0] if done else None)
        spec = models[model]
        md += [f"## {model}", ""]
        if first:
            cal = first["calibration"]
            md += [f"wikitext2 test, seqlen {first['seqlen']}, {first['n_tokens']} tokens evaluated; calibration C4 "
                   f"{cal['n_samples']} x {cal['seqlen']} (ids hash {cal['hash']}). Settings for this model: "
                   f"`{' '.join(o for k, v in spec.items() if k != 'columns' for o in (v or []))}`. "
                   f"{first['weights_note']}", "",
                   "Cells ran at commits " + ", ".join(f"{k} ({v} cells)" for k, v in _count(
                       c["commit"] for c in done).items()) + "; torch threads " + ", ".join(
                       str(k) for k in _count(c["torch_threads"] for c in done)) + "; " + _load_range(done) + ".", ""]
        for section, entries in secs.items():
            cols, rows, _ = (*sections[section], None)
            cells = {(e["row"], e["col"]): e.get("result") for e in entries}
            md += [f"### {model}: {section}", "", *section_md(model, section, cols, rows, cells)]
    md += ["## Commands", "", f"Table: `{argv or 'python experiments/learned_table.py'}` (reruns missing cells; "
           "`--collect-only` tabulates). Each cell is one run:", "", "```"]
    md += [e["command"] for secs in data.values() for es in secs.values() for e in es] + ["```", ""]
    return "\n".join(md), data
