"""Reports from the local results index: markdown table per model (FP row first) + Pareto plots as PNG.

    python -m qresearch.report                      # reads results/runs/index.jsonl, writes results/report*
    python -m qresearch.report --out results/sweep_stories --models stories260k --wandb offline
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from .config import ROOT
from .tracking.metrics import Metrics
from .tracking.store import read_index

LATENCY_KEY = "latency_decode_1_ms_per_step"  # decode ms/token at batch 1 (eval.latency), plotted when present


def latest_complete(rows: list[dict]) -> list[dict]:
    """One row per config hash: the newest whose run dir still holds metrics.json, rebuilt from that file."""
    best: dict[str, dict] = {}
    for r in rows:
        f = Path(r["run_dir"]) / "metrics.json"
        if not f.is_file():
            continue
        r = Metrics.from_dict(json.loads(f.read_text()), str(f)).row(r["run_dir"])
        if r["config_hash"] not in best or r["time"] >= best[r["config_hash"]]["time"]:
            best[r["config_hash"]] = r
    return list(best.values())


def _fp_row(rows: list[dict], datasets: list[str]) -> dict | None:
    """The FP reference: an fp16 run if there is one, else the cached FP baseline recorded with quantized runs."""
    fp = [r for r in rows if r["method"] == "fp16"]
    if fp:
        return fp[0]
    base = next((r for r in rows if any(f"fp_ppl_{d}" in r for d in datasets)), None)
    if base is None:
        return None
    return {"method": "fp (baseline)", "tag": "fp16", "bits": 16, "group_size": "-", "sym": "-",
            "bits_per_weight": 16.0, "weight_bytes": None, **{f"ppl_{d}": base.get(f"fp_ppl_{d}") for d in datasets}}


def _sort_key(r: dict):
    return (r["method"] != "fp16", -int(r["bits"]) if str(r["bits"]).isdigit() else 0, r["method"], r["tag"])


def _cell(v, fmt="{:.3f}") -> str:
    if v is None:
        return "-"
    return fmt.format(v) if isinstance(v, float) else str(v)


def model_table(model: str, rows: list[dict], eval_sig: str = "") -> list[str]:
    datasets = sorted({k[4:] for r in rows for k in r if k.startswith("ppl_")})
    tasks = sorted({k for r in rows for k in r if k.endswith("_acc")})
    head = ["method", "tag", "modules", "bits/weight", "MiB"] + [f"{d} ppl" for d in datasets] + tasks
    has_lat = any(LATENCY_KEY in r for r in rows)
    head += ["decode ms/tok (b1)"] if has_lat else []
    head += ["quantize s"]
    lines = [f"### {model}", "", f"Eval: {eval_sig}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = _fp_row(rows, datasets)
    body = ([fp] if fp and fp.get("method") != "fp16" else []) + sorted(rows, key=_sort_key)
    for r in body:
        mib = r.get("weight_bytes") / 2**20 if r.get("weight_bytes") else None
        cells = [r["method"], r["tag"], r.get("modules", "-"), _cell(r.get("bits_per_weight")), _cell(mib)]
        cells += [_cell(r.get(f"ppl_{d}"), "{:.2f}") for d in datasets]
        cells += [_cell(r.get(t), "{:.3f}") + (f" ± {r[t + '_stderr']:.3f}" if r.get(t + "_stderr") else "")
                  for t in tasks]
        cells += [_cell(r.get(LATENCY_KEY), "{:.2f}")] if has_lat else []
        cells += [_cell(r.get("quantize_seconds"), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = {r.get("weights_note") for r in rows if r.get("weights_note")}
    if has_lat:
        notes.add("decode latency: median of repeats after warm-up, batch 1, through each run's own modules "
                  "(modules fake = dequantized weights in a plain matmul; packed = the dispatched kernel); "
                  "CPU timings on a shared machine are noisy: compare within one run of the sweep only")
    lines += [""] + [f"Note: {n}." for n in sorted(notes)]
    return lines


def provenance_lines(rows: list[dict]) -> list[str]:
    """Protocol and code/library versions of the runs in the table (from each run's files)."""
    commits, versions, protocols = set(), set(), set()
    for r in rows:
        d = Path(r["run_dir"])
        prov = json.loads((d / "provenance.json").read_text())
        commits.add(f"{(prov.get('git_commit') or '?')[:10]}{'+dirty' if prov.get('git_dirty') else ''}")
        v = prov.get("versions", {})
        versions.add(f"torch {v.get('torch')}, transformers {v.get('transformers')}, lm-eval {v.get('lm_eval')}, "
                      f"device {prov.get('gpu') or prov.get('device')}")
        for ds, p in json.loads((d / "metrics.json").read_text()).get("ppl", {}).items():
            protocols.add(f"{ds}/{p['split']} {p['protocol']} seqlen {p['seqlen']}, {p['n_tokens']} tokens, "
                          f"{p['origin']}")
    return (["", "Provenance:", ""] + [f"- code: {', '.join(sorted(commits))}"] +
            [f"- {v}" for v in sorted(versions)] + [f"- eval: {p}" for p in sorted(protocols)])


def plot(rows_by_model: dict[str, list[dict]], x_key: str, x_label: str, path: Path, dataset: str) -> bool:
    """Scatter ppl vs x per model, labelled by tag; returns False if no row has x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {m: [r for r in rows if r.get(x_key) is not None and r.get(f"ppl_{dataset}") is not None]
           for m, rows in rows_by_model.items()}
    if not any(pts.values()):
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model, rows in pts.items():
        if not rows:
            continue
        xs, ys = [r[x_key] for r in rows], [r[f"ppl_{dataset}"] for r in rows]
        ax.scatter(xs, ys, label=model)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["tag"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{dataset} perplexity (lower is better)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build(results: Path, out: Path, models: list[str] | None = None, dataset: str = "wikitext2",
          command: str | None = None) -> dict:
    """Write <out>.md, <out>_ppl_vs_bits.png, <out>_ppl_vs_latency.png; returns what was written."""
    rows = latest_complete(read_index(results / "runs" / "index.jsonl"))
    if models:
        rows = [r for r in rows if r["model"] in models]
    if not rows:
        raise SystemExit(f"no complete runs in {results / 'runs' / 'index.jsonl'}" + (f" for {models}" if models else ""))
    by_group = defaultdict(list)
    for r in rows:
        by_group[(r["model"], r.get("eval", "?"))].append(r)  # only numbers of one protocol share a table
    lines = [f"# Results ({len(rows)} runs)", ""]
    if command:
        lines += ["Reproduce:", "", "```", command, "```", ""]
    for (m, ev) in sorted(by_group):
        lines += model_table(m, by_group[(m, ev)], ev) + [""]
    lines += provenance_lines(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    written = {"markdown": md}
    for key, label, name in (("bits_per_weight", "bits per weight (as stored)", "ppl_vs_bits"),
                             (LATENCY_KEY, "decode latency, ms/token, batch 1", "ppl_vs_latency")):
        png = out.with_name(f"{out.name}_{name}.png")
        series = {(m if sum(1 for g in by_group if g[0] == m) == 1 else f"{m} [{ev.split(';')[0]}]"): rs
                  for (m, ev), rs in by_group.items()}
        if plot(series, key, label, png, dataset):
            written[name] = png
    return written


def log_to_wandb(written: dict, mode: str, project: str = "qresearch") -> None:
    """Log the report (table as text, plots as images) into a wandb run of job_type 'report'."""
    import wandb

    run = wandb.init(project=project, job_type="report", mode=mode, dir=str(ROOT / "results"))
    run.log({k: wandb.Image(str(v)) for k, v in written.items() if str(v).endswith(".png")})
    run.log({"report": wandb.Html("<pre>" + Path(written["markdown"]).read_text() + "</pre>")})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="results root (holds runs/index.jsonl)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "report", help="output path stem")
    ap.add_argument("--models", nargs="*", help="only these models")
    ap.add_argument("--dataset", default="wikitext2", help="perplexity dataset for the plots")
    ap.add_argument("--wandb", choices=["online", "offline"], help="also log the report to wandb")
    ap.add_argument("--command", help="the command(s) that produced the runs, printed in the report")
    a = ap.parse_args(argv)
    written = build(a.results, a.out, a.models, a.dataset, a.command)
    if a.wandb:
        log_to_wandb(written, a.wandb)
    for k, v in written.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
