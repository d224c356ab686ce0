"""Reports from the local results index: markdown table per model (FP row first) + Pareto plots as PNG.

    python -m qresearch.report                      # reads $QRESEARCH_RESULTS (else results/)/runs/index.jsonl
    python -m qresearch.report --out results/sweep_stories --models stories260k --wandb offline

A damaged index line, metrics.json or provenance.json is skipped with a warning naming the file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

from .config import ROOT
from .tracking.metrics import Metrics
from .tracking.store import HASH_EXCLUDE, config_hash, hashed, read_index, read_metrics

log = logging.getLogger(__name__)

LATENCY_KEY = "latency_decode_1_ms_per_step"  # decode ms/token at batch 1 (eval.latency), plotted when present


def latest_complete(rows: list[dict]) -> list[dict]:
    """One row per config hash: the newest whose run dir still holds a readable metrics.json, rebuilt from it."""
    best: dict[str, dict] = {}
    for r in rows:
        d = Path(r["run_dir"])
        m = read_metrics(d)
        if m is None:
            continue
        r = Metrics.from_dict(m, str(d / "metrics.json")).row(d)
        cfg = _run_config(d)
        r["max_chunks"] = (cfg.get("eval") or {}).get("max_chunks") if cfg is not None else "?"
        r["setting"] = setting_hash(cfg) if cfg is not None else r["config_hash"]
        if r["config_hash"] not in best or r["time"] >= best[r["config_hash"]]["time"]:
            best[r["config_hash"]] = r
    return list(best.values())


def _run_config(run_dir: Path) -> dict | None:
    """The composed config a run wrote (config.yaml); None when absent or damaged (a subset of the text or the
    seed grouping is then unknown, and said so)."""
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        return cfg if isinstance(cfg, dict) else None
    except Exception:  # noqa: BLE001 - absent, unreadable or not YAML: all mean "unknown"
        return None


def setting_hash(cfg: dict) -> str:
    """What a run computes apart from its seed: runs of one setting at several seeds share it."""
    return config_hash(hashed(cfg, HASH_EXCLUDE + ("seed",)))


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(xs) / len(xs)
    return m, ((sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0)


SEED_MEAN = ("ppl_", "fp_ppl_", "latency_")  # prefixes of numbers averaged over seeds (with an sd for ppl_)


def collapse_seeds(rows: list[dict]) -> list[dict]:
    """One row per setting: runs that differ only in their seed become their mean, with the sd over seeds in
    `<key>_sd` for perplexities and task accuracies, `seeds` listing them. A single run keeps its numbers."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r.get("setting") or r["config_hash"]].append(r)
    out = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r.get("seed") if isinstance(r.get("seed"), int) else -1)
        row = dict(max(runs, key=lambda r: r["time"]))
        row["seeds"] = [r.get("seed") for r in runs]
        if len(runs) > 1:
            keys = {k for r in runs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and (k.startswith(SEED_MEAN) or k.endswith(("_acc", "_acc_norm")) or k == "quantize_seconds")}
            for k in keys:
                vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
                if len(vals) < len(runs):  # not measured in every run: no mean that mixes in fewer seeds
                    row.pop(k, None)
                    continue
                row[k], sd = mean_sd(vals)
                if k.startswith("ppl_") or k.endswith(("_acc", "_acc_norm")):
                    row[f"{k}_sd"] = sd
            for k in [k for k in row if k.endswith("_stderr")]:  # a per-run stderr does not describe a mean
                row.pop(k)
        out.append(row)
    return out


def eval_label(rows: list[dict], dataset: str | None = None) -> str:
    """Protocol and subset of a group of rows, e.g. 'wikitext2/test gptq_chunks L256 1024 tok; first 4 chunks'."""
    sigs = sorted({r.get("eval", "?") for r in rows})
    if dataset:
        sigs = sorted({p for s in sigs for p in s.split("; ") if p.startswith(dataset)}) or sigs
    subset = sorted({str(r.get("max_chunks")) for r in rows if r.get("max_chunks") is not None})
    note = f"; subset: first {'/'.join(subset)} chunks (eval.max_chunks)" if subset else "; full split"
    return " | ".join(sigs) + note


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


def _with_sd(r: dict, key: str, fmt: str) -> str:
    """A number, with its sd over seeds or its own stderr when the row has one."""
    spread = r.get(f"{key}_sd", r.get(f"{key}_stderr"))
    return _cell(r.get(key), fmt) + (f" ± {fmt.format(spread)}" if spread and r.get(key) is not None else "")


def model_table(model: str, rows: list[dict], eval_sig: str = "") -> list[str]:
    """Markdown table of one model's runs; runs of one setting at several seeds share a row (mean ± sd)."""
    rows = collapse_seeds(rows)
    datasets = sorted({k[4:] for r in rows for k in r if k.startswith("ppl_") and not k.endswith("_sd")})
    tasks = sorted({k for r in rows for k in r if k.endswith("_acc")})
    seeded = any(len(r.get("seeds", [])) > 1 for r in rows)
    head = ["method", "tag", "modules"] + (["seeds"] if seeded else []) + ["bits/weight", "MiB"]
    head += [f"{d} ppl" for d in datasets] + tasks
    has_lat = any(LATENCY_KEY in r for r in rows)
    head += ["decode ms/tok (b1)"] if has_lat else []
    head += ["quantize s"]
    lines = [f"### {model}", "", f"Eval: {eval_sig}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp = _fp_row(rows, datasets)
    body = ([fp] if fp and fp.get("method") != "fp16" else []) + sorted(rows, key=_sort_key)
    for r in body:
        mib = r.get("weight_bytes") / 2**20 if r.get("weight_bytes") else None
        cells = [r["method"], r["tag"], r.get("modules", "-")]
        cells += [",".join(str(x) for x in r.get("seeds", [])) or "-"] if seeded else []
        cells += [_cell(r.get("bits_per_weight")), _cell(mib)]
        cells += [_with_sd(r, f"ppl_{d}", "{:.2f}") for d in datasets]
        cells += [_with_sd(r, t, "{:.3f}") for t in tasks]
        cells += [_cell(r.get(LATENCY_KEY), "{:.2f}")] if has_lat else []
        cells += [_cell(r.get("quantize_seconds"), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = {r.get("weights_note") for r in rows if r.get("weights_note")}
    if seeded:
        notes.add("a row with several seeds (calibration draws) gives the mean over them of perplexity, accuracy, "
                  "latency and quantize seconds, perplexity and accuracy ± their sample sd over the seeds")
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
        try:
            prov = json.loads((d / "provenance.json").read_text())
        except (ValueError, OSError) as e:
            log.warning("%s is missing or damaged (%s); its provenance is left out", d / "provenance.json",
                        type(e).__name__)
            continue
        commits.add(f"{(prov.get('git_commit') or '?')[:10]}{'+dirty' if prov.get('git_dirty') else ''}")
        v = prov.get("versions", {})
        versions.add(f"torch {v.get('torch')}, transformers {v.get('transformers')}, lm-eval {v.get('lm_eval')}, "
                      f"device {prov.get('gpu') or prov.get('device')}")
        for ds, p in (read_metrics(d) or {}).get("ppl", {}).items():
            protocols.add(f"{ds}/{p['split']} {p['protocol']} seqlen {p['seqlen']}, {p['n_tokens']} tokens, "
                          f"{p['origin']}")
    return (["", "Provenance:", ""] + [f"- code: {', '.join(sorted(commits))}"] +
            [f"- {v}" for v in sorted(versions)] + [f"- eval: {p}" for p in sorted(protocols)])


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (lower x and lower y are better), sorted by x."""
    front, best_y = [], float("inf")
    for x, y in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


def _log_ticks(ax, values: list[float]) -> None:
    """Plain-number labels on a log y axis: 1-2-5 steps over wide spans, 1-1.5-2-3-5-7 over a few-fold span,
    evenly chosen values over a narrow one (where a log locator would label nothing)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    lo, hi = min(values), max(values)
    if hi / lo > 30:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    elif hi / lo > 2.5:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    else:
        ticks = [t for t in MaxNLocator(nbins=6).tick_values(lo / 1.02, hi * 1.02) if t > 0]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot(rows_by_model: dict[str, list[dict]], x_key: str, x_label: str, path: Path, dataset: str) -> str | None:
    """ppl vs x per series with its Pareto frontier drawn; None when drawn, else why it was not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {m: [r for r in rows if r.get(x_key) is not None and r.get(f"ppl_{dataset}") is not None]
           for m, rows in rows_by_model.items()}
    if not any(pts.values()):
        with_ppl = any(r.get(f"ppl_{dataset}") is not None for rows in rows_by_model.values() for r in rows)
        return f"no run has {x_key}" if with_ppl else f"no run has {dataset} perplexity (--dataset)"
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ys_all = []
    for model, rows in pts.items():
        if not rows:
            continue
        xs, ys = [r[x_key] for r in rows], [r[f"ppl_{dataset}"] for r in rows]
        ys_all += ys
        dots = ax.scatter(xs, ys, label=model, alpha=0.8)
        front = pareto_front(list(zip(xs, ys)))
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=dots.get_facecolor()[0],
                linewidth=1.2)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["tag"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    all_rows = [r for rows in pts.values() for r in rows]
    ax.set_title(f"{dataset}: {eval_label(all_rows, dataset)}", fontsize=8, wrap=True)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"{dataset} perplexity (log scale, lower is better)")
    ax.set_yscale("log")
    _log_ticks(ax, ys_all)
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(matplotlib.lines.Line2D([], [], color="gray", drawstyle="steps-post"))
    ax.legend(handles, labels + ["Pareto frontier (per series: no point is both smaller and better)"], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


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
        lines += model_table(m, by_group[(m, ev)], eval_label(by_group[(m, ev)])) + [""]
    written, not_drawn = {}, {}

    def series_name(m: str, ev: str) -> str:  # the model, with its protocol when it has rows under several
        return m if sum(1 for g in by_group if g[0] == m) == 1 else f"{m} [{ev.split(';')[0].split(' ', 1)[-1]}]"

    series = {series_name(m, ev): collapse_seeds(rs) for (m, ev), rs in by_group.items()}  # seeds: one point
    for key, label, name in (("bits_per_weight", "bits per weight (as stored)", "ppl_vs_bits"),
                             (LATENCY_KEY, "decode latency, ms/token, batch 1", "ppl_vs_latency")):
        png = out.with_name(f"{out.name}_{name}.png")
        why = plot(series, key, label, png, dataset)
        if why is None:
            written[name] = png
        else:
            if name == "ppl_vs_latency" and why.startswith("no run has"):
                why = "latency was not measured in these runs (run them with eval.latency.enabled=true)"
            not_drawn[name] = why
            png.unlink(missing_ok=True)  # never leave an older plot that looks like this report's
    lines += [f"Plot {n} not drawn: {why}." for n, why in not_drawn.items()] + [""] if not_drawn else []
    lines += provenance_lines(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return {"markdown": md, **written, **({"not_drawn": not_drawn} if not_drawn else {})}


def log_to_wandb(written: dict, mode: str, project: str = "qresearch") -> None:
    """Log the report (table as text, plots as images) into a wandb run of job_type 'report'."""
    import wandb

    run = wandb.init(project=project, job_type="report", mode=mode, dir=str(ROOT / "results"))
    run.log({k: wandb.Image(str(v)) for k, v in written.items() if isinstance(v, Path) and v.suffix == ".png"})
    run.log({"report": wandb.Html("<pre>" + Path(written["markdown"]).read_text() + "</pre>")})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("QRESEARCH_RESULTS") or ROOT / "results")
    ap.add_argument("--results", type=Path, default=default,
                    help="results root holding runs/index.jsonl (default: $QRESEARCH_RESULTS, where run.py writes, "
                         "else results/)")
    ap.add_argument("--out", type=Path, help="output path stem (default: <results>/report)")
    ap.add_argument("--models", nargs="*", help="only these models")
    ap.add_argument("--dataset", default="wikitext2", help="perplexity dataset for the plots")
    ap.add_argument("--wandb", choices=["online", "offline"], help="also log the report to wandb")
    ap.add_argument("--command", help="the command(s) that produced the runs, printed in the report")
    a = ap.parse_args(argv)
    written = build(a.results, a.out or a.results / "report", a.models, a.dataset, a.command)
    for k, v in written.items():
        if k == "not_drawn":
            for name, why in v.items():
                print(f"{name}: not drawn: {why}")
        else:
            print(f"{k}: {v}")
    if a.wandb:
        try:
            log_to_wandb(written, a.wandb)
        except Exception as e:  # noqa: BLE001 - wandb's own errors (no API key, no network): one line, exit 1
            why = str(e).splitlines()[0] if str(e) else ""
            raise SystemExit(f"error: the report is written above, but logging it to wandb ({a.wandb}) failed: "
                             f"{type(e).__name__}: {why}; allowed: --wandb offline, or `wandb login` first")


if __name__ == "__main__":
    main()
