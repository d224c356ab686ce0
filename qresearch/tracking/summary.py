"""End-of-run terminal summary and the flat index row that reports read."""
from __future__ import annotations

from pathlib import Path


def index_row(metrics: dict, run_dir: Path) -> dict:
    """One flat row per run: identity, config hash, headline numbers."""
    r, fpt = metrics["run"], metrics["footprint"]
    row = {"run_dir": str(run_dir), "model": r["model"], "method": r["method"], "tag": r["tag"], "bits": r["bits"],
           "group_size": r["group_size"], "sym": r["sym"], "format": r["format"], "config_hash": r["config_hash"],
           "time": r["time"], "bits_per_weight": fpt["bits_per_weight"], "weight_bytes": fpt["weight_bytes"],
           "quantize_seconds": metrics["timing"]["quantize_seconds"],
           "peak_rss_bytes": metrics["memory"].get("peak_rss_bytes"),
           "peak_cuda_bytes": metrics["memory"].get("peak_cuda_bytes"),
           "weights_note": metrics["model"]["weights_note"]}
    le = metrics.get("lm_eval", {})
    row["eval"] = "; ".join([f"{_text_label(ds, p)} {p['protocol']} L{p['seqlen']} {p['n_tokens']} tok"
                             for ds, p in sorted(metrics.get("ppl", {}).items())] +
                            [f"lm-eval {t} n={v['n_samples']} {le['protocol']['num_fewshot']}-shot"
                             for t, v in sorted(le.get("tasks", {}).items())])
    for ds, p in metrics.get("ppl", {}).items():
        row[f"ppl_{ds}"] = p["ppl"]
        if "fp_ppl" in p:
            row[f"fp_ppl_{ds}"] = p["fp_ppl"]
    for key, val in _flat(metrics.get("latency", {}), "latency_").items():
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            row[key] = val
    for task, t in metrics.get("lm_eval", {}).get("tasks", {}).items():
        for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            if k in t:
                row[f"{task}_{k}"] = t[k]
    return row


def _text_label(ds: str, p: dict) -> str:
    """'wikitext2/test'; an own text also carries its hash ('tinystories/file#1a2b3c4d'): one name, one text."""
    from ..data.text import EVAL_SETS

    own = ds not in EVAL_SETS and p.get("text_sha256")
    return f"{ds}/{p['split']}" + (f"#{p['text_sha256'][:8]}" if own else "")


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"
    return str(x)


def summary_lines(metrics: dict, run_dir: Path) -> list[str]:
    r, fpt = metrics["run"], metrics["footprint"]
    lines = [f"== {r['model']} / {r['tag']} ({r['format']})  ->  {run_dir}"]
    if metrics["model"]["weights_note"]:
        lines.append(f"   note: {metrics['model']['weights_note']}")
    lines.append(f"   {'dataset':<10} {'split':<11} {'seqlen':>6} {'tokens':>8} {'FP ppl':>10} {'ppl':>10} {'delta':>9}")
    for ds, p in metrics.get("ppl", {}).items():
        lines.append(f"   {ds:<10} {p['split']:<11} {p['seqlen']:>6} {p['n_tokens']:>8} "
                     f"{_fmt(p.get('fp_ppl', '-')):>10} {_fmt(p['ppl']):>10} {_fmt(p.get('delta_ppl', '-')):>9}")
    lines.append(f"   weights: {fpt['weight_bytes'] / 2**20:.3f} MiB stored ({fpt['bits_per_weight']:.3f} bits/weight "
                 f"on quantized linears; fp16 {fpt['weight_bytes_fp16'] / 2**20:.3f} MiB, x{fpt['compression']:.2f})")
    t = metrics["timing"]
    lines.append(f"   time: load {t['load_seconds']:.1f}s, quantize {t['quantize_seconds']:.1f}s, "
                 f"eval {t['eval_seconds']:.1f}s; peak RSS {metrics['memory']['peak_rss_bytes'] / 2**30:.2f} GiB; "
                 f"wandb: {metrics['wandb']}")
    return lines


def print_summary(metrics: dict, run_dir: Path) -> None:
    print("\n".join(summary_lines(metrics, run_dir)), flush=True)
