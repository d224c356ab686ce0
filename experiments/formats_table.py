"""Issue 14 table: wikitext2 perplexity of every numeric format at comparable bits per weight (scales counted), with
RTN and GPTQ, plus KV-cache rows and mixed-precision rows, on stories260K and SmolLM2-135M. Each cell is one
`python run.py` run (subprocess, resumable: a cell whose run dir holds metrics.json is not rerun). Writes
results/formats.{md,json} and results/formats_ppl_vs_bpw.png (perplexity against bits per weight, Pareto frontier).

    python experiments/formats_table.py                                  # everything
    python experiments/formats_table.py --models stories260k --collect-only
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments import cells as table_cells  # noqa: E402
from qresearch.tracking.metrics import Metrics  # noqa: E402

RUNS = REPO / "results" / "runs" / "formats"
GPTQ_OPTS = ["method.gptq.act_order=true", "method.gptq.static_groups=true"]
# label -> (family, weight-format overrides)
FORMATS = {
    "int4 g128 asym": ("4-bit", ["bits=4", "group_size=128", "sym=false"]),
    "int4 g32 sym": ("4-bit", ["bits=4", "group_size=32", "sym=true"]),
    "int4 g32 sym, 8-bit scales / tensor": ("4-bit", ["bits=4", "group_size=32", "sym=true", "scale_bits=8",
                                                       "scale_level2=tensor"]),
    "fp4_e2m1 g32": ("4-bit", ["qformat=fp4_e2m1", "bits=4", "group_size=32"]),
    "mxfp4 (g32, E8M0 scales)": ("4-bit", ["qformat=mxfp4", "bits=4", "group_size=32"]),
    "nvfp4 (g16, E4M3 + fp32 scales)": ("4-bit", ["qformat=nvfp4", "bits=4", "group_size=16"]),
    "nf4 g64 (double quant)": ("4-bit", ["qformat=nf4", "bits=4", "group_size=64"]),
    "nf4 g64 (fp16 scales)": ("4-bit", ["qformat=nf4", "bits=4", "group_size=64", "scale_bits=16"]),
    "kmeans 16 / row": ("4-bit", ["qformat=kmeans", "bits=4", "group_size=-1"]),
    "int3 g128 asym": ("3-bit", ["bits=3", "group_size=128", "sym=false"]),
    "kmeans 8 / row": ("3-bit", ["qformat=kmeans", "bits=3", "group_size=-1"]),
    "ternary / channel": ("2-bit", ["qformat=ternary", "bits=2", "group_size=-1"]),
    "kmeans 4 / row": ("2-bit", ["qformat=kmeans", "bits=2", "group_size=-1"]),
    "binary / channel": ("1-bit", ["qformat=binary", "bits=1", "group_size=-1"]),
    "int8 / channel sym": ("8-bit", ["bits=8", "group_size=-1", "sym=true"]),
    "fp8_e4m3 / channel": ("8-bit", ["qformat=fp8_e4m3", "bits=8", "group_size=-1"]),
    "fp8_e5m2 / channel": ("8-bit", ["qformat=fp8_e5m2", "bits=8", "group_size=-1"]),
}
# extra rows: label -> (recipe, overrides); mixed precision uses the int g128 asym grid
MIXED = ["bits=4", "group_size=128", "sym=false", "method.mixed.budget=3.5", "method.mixed.candidates=[3,4,5,6,8]"]
EXTRA = {
    "kmeans 8 / row + palette fine-tune (gptq)": ("gptq", FORMATS["kmeans 8 / row"][1] + GPTQ_OPTS +
                                                  ["method.gptq.lut_finetune=true"]),
    "mixed 3.5 bits, widths 3-8, sensitivity (rtn)": ("mixed_rtn", MIXED),
    "mixed 3.5 bits, widths 3-8, sensitivity (gptq)": ("mixed_gptq", MIXED + GPTQ_OPTS),
    "mixed 3.5 bits, widths 3-8, random allocation (gptq)": ("mixed_gptq", MIXED + GPTQ_OPTS +
                                                             ["method.mixed.allocator=random"]),
    "mixed 3.5 bits, widths 2-8, sensitivity (gptq)": ("mixed_gptq", MIXED + GPTQ_OPTS +
                                                       ["method.mixed.candidates=[2,3,4,5,6,8]"]),
    "kv cache int8 (fp16 weights)": ("fp16", ["eval.kv_cache.bits=8"]),
    "kv cache int4 (fp16 weights)": ("fp16", ["eval.kv_cache.bits=4"]),
    "kv cache fp8_e4m3 (fp16 weights)": ("fp16", ["eval.kv_cache.bits=8", "eval.kv_cache.qformat=fp8_e4m3"]),
    "kv cache int4 + gptq int4 g128 asym": ("gptq", FORMATS["int4 g128 asym"][1] + GPTQ_OPTS + ["eval.kv_cache.bits=4"]),
}
MODELS = {
    "stories260k": ["eval.max_chunks=800", "data.n_samples=128", "data.seqlen=512"],
    "smollm2_135m": ["eval.max_chunks=40", "data.n_samples=32", "data.seqlen=512"],
}
SKIP = {("smollm2_135m", "gptq", "8-bit")}  # 8-bit GPTQ on SmolLM2 skipped (CPU budget; RTN is already within noise)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def cells(models: list[str]) -> list[tuple[str, str, str, list[str]]]:
    """(model, row label, recipe, overrides) of every cell."""
    out = []
    for model in models:
        for label, (family, over) in FORMATS.items():
            for method in ("rtn", "gptq"):
                if (model, method, family) not in SKIP:
                    out.append((model, f"{label} | {method}", method, over + (GPTQ_OPTS if method == "gptq" else [])))
        out += [(model, label, recipe, over) for label, (recipe, over) in EXTRA.items()]
    return out


def cell_dir(model: str, label: str) -> Path:
    return RUNS / model / slug(label)


def command(model: str, label: str, recipe: str, over: list[str]) -> list[str]:
    model_over = [o for o in MODELS[model] if not (recipe in ("rtn", "fp16") and o.startswith("data."))]
    return ["python", "run.py", f"model={model}", f"method={recipe}", "seed=0", "data=c4", "logger=none",
            *model_over, *over, f"out_dir={cell_dir(model, label).relative_to(REPO)}"]


def run_cell(model: str, label: str, recipe: str, over: list[str], collect_only: bool) -> dict | None:
    return table_cells.run_cell(cell_dir(model, label), command(model, label, recipe, over), f"{model} {label}",
                          collect_only)


def _mean_col(run_dir: Path, col: str) -> float | None:
    f = run_dir / "layers.csv"
    if not f.is_file():
        return None
    vals = [float(r[col]) for r in csv.DictReader(f.open()) if r.get(col) not in (None, "")]
    return sum(vals) / len(vals) if vals else None


def summarize(data: dict, run_dir: Path) -> dict:
    m = Metrics.from_dict(data)
    p = m.ppl["wikitext2"]
    steps = {s["name"]: s for s in m.run.steps}
    mixed = steps.get("mixed")
    return {"ppl": p.ppl, "fp_ppl": p.fp_ppl, "n_tokens": p.n_tokens, "seqlen": p.seqlen, "tag": m.run.tag,
            "bits_per_weight": m.footprint.bits_per_weight, "quantize_seconds": m.timing.quantize_seconds,
            "eval_seconds": m.timing.eval_seconds, "weight_rel_err": _mean_col(run_dir, "weight_rel_err"),
            "out_rel_err": _mean_col(run_dir, "out_rel_err"), "calibration": m.calibration,
            "weights_note": m.model.weights_note, "kv_cache": m.kv_cache,
            "bits_map": None if mixed is None else mixed["bits_map"],
            "bits_histogram": None if mixed is None else mixed["bits_histogram"],
            "mixed_total_error": None if mixed is None else mixed["total_error"]}


def _f(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_rows(model: str, res: dict) -> list[str]:
    lines = ["| format | family | bits/weight | RTN ppl | GPTQ ppl | RTN weight err | GPTQ output err |",
             "|---|---|---|---|---|---|---|"]
    for label, (family, _) in FORMATS.items():
        r, g = res.get(f"{label} | rtn"), res.get(f"{label} | gptq")
        bpw = (r or g or {}).get("bits_per_weight")
        skipped = (model, "gptq", family) in SKIP
        lines.append(f"| {label} | {family} | {_f(bpw)} | {_f((r or {}).get('ppl'), '.2f')} | "
                     f"{'skipped' if skipped else _f((g or {}).get('ppl'), '.2f')} | "
                     f"{_f((r or {}).get('weight_rel_err'), '.4f')} | {_f((g or {}).get('out_rel_err'), '.4f')} |")
    return lines


def extra_rows(res: dict) -> list[str]:
    lines = ["| row | bits/weight | ppl | KV cache bits/value | KV MiB at eval length | KV MiB fp16 |",
             "|---|---|---|---|---|---|"]
    for label in EXTRA:
        c = res.get(label)
        if c is None:
            lines.append(f"| {label} | n/a | n/a | | | |")
            continue
        kv = (c["kv_cache"] or {}).get("cache", [{}])[0]
        lines.append(f"| {label} | {_f(c['bits_per_weight'])} | {c['ppl']:.2f} | {_f(kv.get('bits_per_value'), '.2f')}"
                     f" | {_f(kv.get('bytes', 0) / 2**20 if kv else None)} | "
                     f"{_f(kv.get('fp16_bytes', 0) / 2**20 if kv else None)} |")
    return lines


def bits_map_lines(res: dict) -> list[str]:
    c = res.get("mixed 3.5 bits, widths 3-8, sensitivity (gptq)")
    if not c or not c["bits_map"]:
        return []
    by_block: dict[str, dict[str, int]] = {}
    for layer, b in c["bits_map"].items():
        parts = layer.split(".")
        blk = next((p for p in parts if p.isdigit()), "?")
        by_block.setdefault(blk, {})[".".join(parts[-2:])] = b
    names = sorted({n for d in by_block.values() for n in d})
    lines = [f"Allocation (sensitivity, output-error proxy; widths {c['bits_histogram']}; RTN-proxy total output "
             f"error {c['mixed_total_error']['allocated']:.3g} vs uniform w3 {c['mixed_total_error']['uniform_w3']:.3g}"
             f" / w4 {c['mixed_total_error']['uniform_w4']:.3g}):", "", "| block | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for blk in sorted(by_block, key=lambda s: int(s) if s.isdigit() else -1):
        lines.append(f"| {blk} | " + " | ".join(str(by_block[blk].get(n, "")) for n in names) + " |")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 5.5), squeeze=False)
    for ax, (model, res) in zip(axes[0], results.items()):
        pts = [(c["bits_per_weight"], c["ppl"], k) for k, c in res.items() if c and not c.get("kv_cache")]
        if not pts:
            continue
        fp = next(c["fp_ppl"] for c in res.values() if c and c.get("fp_ppl"))
        cap = 8 * fp
        for bpw, ppl, k in pts:
            marker = "^" if "gptq" in k else "o"
            ax.scatter(bpw, min(ppl, cap), marker=marker, s=28, color="C1" if "mixed" in k else "C0" if "gptq" in k
                       else "C2", zorder=3)
            ax.annotate(k.replace(" | ", " ").replace(" (fp16 weights)", ""), (bpw, min(ppl, cap)), fontsize=5.5,
                        xytext=(3, 2), textcoords="offset points")
        front, best = [], float("inf")
        for bpw, ppl, _ in sorted(pts):
            if ppl < best:
                front.append((bpw, min(ppl, cap)))
                best = ppl
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, label="Pareto frontier")
        ax.axhline(fp, color="gray", ls="--", lw=0.8, label=f"FP {fp:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (codes + scales + zeros + palettes)")
        ax.set_ylabel(f"wikitext2 perplexity (capped at {cap:.0f})")
        ax.set_title(f"{model}: o RTN, ^ GPTQ (act-order + static groups)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--collect-only", action="store_true", help="only tabulate runs that already finished")
    args = ap.parse_args()
    results: dict = {}
    for model, label, recipe, over in cells(args.models):
        m = run_cell(model, label, recipe, over, args.collect_only)
        results.setdefault(model, {})[label] = summarize(m, cell_dir(model, label)) if m else None
    out = REPO / "results"
    (out / "formats.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out / "formats_ppl_vs_bpw.png")
    from formats_notes import HEADER, NOTES, protocol_line  # experiments/ is on sys.path (script dir)

    cmds = [shlex.join(command(*c)) for c in cells(args.models)]
    md = [HEADER, ""]
    for model, res in results.items():
        md += [f"## {model}", "", protocol_line(model, res, MODELS[model]), "", *format_rows(model, res), "",
               *extra_rows(res), "", *bits_map_lines(res), ""]
    md += [NOTES, "", "Every cell is one run (resumable: `python experiments/formats_table.py`; `--collect-only` "
           "tabulates finished runs):", "", "```", *cmds, "```", ""]
    (out / "formats.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
