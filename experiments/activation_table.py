"""Issue 12 table: activation quantization on stories260K and SmolLM2-135M: FP, naive W8A8 (per-token dynamic,
per-tensor dynamic, per-tensor static), SmoothQuant O1/O2/O3 (+ variants), LLM.int8(), ZeroQuant W8A8 / W4A8 with and
without LKD, SmoothQuant + GPTQ / RTN at W4A8, W6A6 and W4A4, integer-only static. Each cell is one `python run.py`
run (subprocess, resumable: a cell whose run dir holds metrics.json is not rerun). Writes
results/activation_methods.{md,json} and the outlier pictures results/activation_outliers_<model>.png.

    python experiments/activation_table.py                      # everything (CPU: about three hours under load)
    python experiments/activation_table.py --models stories260k --rows fp naive_tok sq_o1
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments import cells as table_cells  # noqa: E402
from experiments.activation_report import render  # noqa: E402

RUNS = REPO / "results" / "runs" / "activation"
LAT = ["eval.latency.enabled=true", "eval.latency.prompt_lengths=[128]", "eval.latency.batch_sizes=[1]",
       "eval.latency.decode_tokens=16", "eval.latency.repeats=5", "eval.latency.warmup=2"]
SQ = "method.smoothquant."
ZQ = "method.zeroquant."
# key -> (section, label, method, overrides, modules, latency)
ROWS = {
    "fp": ("W16A16", "FP", "fp16", [], "fake", True),
    "naive_tok": ("W8A8", "naive W8A8, per-token dynamic", "w8a8", [], "packed", True),
    "naive_tdyn": ("W8A8", "naive W8A8, per-tensor dynamic", "w8a8", ["method.rtn.act_granularity=tensor"], "packed",
                   True),
    "naive_static": ("W8A8", "naive W8A8, per-tensor static", "w8a8",
                     ["method.rtn.act_granularity=tensor", "method.rtn.act_static=true"], "packed", True),
    "sq_o1": ("W8A8", "SmoothQuant O1 (per-token dynamic)", "smoothquant", [f"{SQ}scheme=O1"], "packed", True),
    "sq_o2": ("W8A8", "SmoothQuant O2 (per-tensor dynamic)", "smoothquant", [f"{SQ}scheme=O2"], "packed", True),
    "sq_o3": ("W8A8", "SmoothQuant O3 (per-tensor static)", "smoothquant", [f"{SQ}scheme=O3"], "packed", True),
    "sq_o3_all": ("W8A8", "SmoothQuant O3, pairs=all (also v->o, up->down)", "smoothquant",
                  [f"{SQ}scheme=O3", f"{SQ}pairs=all"], "packed", False),
    "sq_o3_wt": ("W8A8", "SmoothQuant O3, per-tensor weights (the paper's O3)", "smoothquant",
                 [f"{SQ}scheme=O3", f"{SQ}weight_granularity=tensor"], "packed", False),
    "sq_o3_search": ("W8A8", "SmoothQuant O3, alpha searched on calibration NLL", "smoothquant",
                     [f"{SQ}scheme=O3", f"{SQ}alpha_grid=[0.3,0.5,0.7,0.85]", f"{SQ}search_samples=8"], "fake",
                     False),
    "llm_int8": ("W8A8", "LLM.int8() (threshold 6.0)", "llm_int8", [], "packed", True),
    "zq_w8": ("W8A8", "ZeroQuant W8 g128 A8, no LKD", "zeroquant", ["bits=8", f"{ZQ}lkd=false"], "fake", False),
    "zq_w8_lkd": ("W8A8", "ZeroQuant W8 g128 A8 + LKD", "zeroquant", ["bits=8"], "fake", False),
    "int_only": ("W8A8", "integer-only static (uint8 in/out, int32 acc.)", "integer", [], "integer", False),
    "sq_int_only": ("W8A8", "SmoothQuant (alpha 0.5) + integer-only static", "smoothquant_integer", [], "integer",
                    False),
    "rtn_w4a8": ("W4A8", "naive RTN W4 g128 + A8 per-token", "rtn", ["bits=4", "act_bits=8"], "fake", False),
    "zq_w4": ("W4A8", "ZeroQuant W4 g128 A8, no LKD", "zeroquant", ["bits=4", f"{ZQ}lkd=false"], "fake", False),
    "zq_w4_lkd": ("W4A8", "ZeroQuant W4 g128 A8 + LKD", "zeroquant", ["bits=4"], "fake", False),
    "sq_rtn_w4a8": ("W4A8", "SmoothQuant O1 + RTN W4 g128", "smoothquant_rtn", ["bits=4"], "fake", False),
    "sq_gptq_w4a8": ("W4A8", "SmoothQuant O1 + GPTQ W4 g128", "smoothquant_gptq", ["bits=4"], "fake", False),
    "naive_w6a6": ("W6A6", "naive W6A6 (per-channel, per-token)", "rtn",
                   ["bits=6", "group_size=-1", "sym=true", "act_bits=6"], "fake", False),
    "sq_w6a6": ("W6A6", "SmoothQuant O1 W6A6", "smoothquant", [f"{SQ}bits=6", f"{SQ}act_bits=6"], "fake", False),
    "naive_w4a4": ("W4A4", "naive W4A4 (per-channel, per-token)", "rtn",
                   ["bits=4", "group_size=-1", "sym=true", "act_bits=4"], "fake", False),
    "sq_w4a4": ("W4A4", "SmoothQuant O1 W4A4", "smoothquant", [f"{SQ}bits=4", f"{SQ}act_bits=4"], "fake", False),
}
# per-model protocol (CPU budget), stated in the table
MODELS = {
    "stories260k": ["eval.max_chunks=400", "data.n_samples=64", "data.seqlen=256"],
    "smollm2_135m": ["eval.max_chunks=20", "data.n_samples=16", "data.seqlen=512", f"{ZQ}steps=30",
                     f"{ZQ}batch_size=1"],
}


def cell_dir(model: str, key: str) -> Path:
    return RUNS / model / key


def command(model: str, key: str) -> list[str]:
    _, _, method, over, modules, lat = ROWS[key]
    model_over = [o for o in MODELS[model] if not o.startswith(ZQ) or method == "zeroquant"]
    return ["python", "run.py", f"model={model}", f"method={method}", *over, f"modules={modules}", "seed=0",
            "data=c4", "logger=none", *model_over, *(LAT if lat else []), f"out_dir={cell_dir(model, key)}"]


def run_cell(model: str, key: str) -> dict | None:
    out = cell_dir(model, key)
    m = table_cells.run_cell(out, command(model, key), f"{model} {key}", one_thread=True, record_load=True)
    if m is not None:
        m["_run_dir"] = str(out)
    return m


def main() -> None:
    args = table_cells.table_parser(MODELS, "rows", ROWS).parse_args()
    results: dict = {}
    for model in args.models:
        for key in args.rows:
            done = (cell_dir(model, key) / "metrics.json").is_file()
            m = run_cell(model, key) if (done or not args.collect_only) else None
            results.setdefault(model, {})[key] = m
        pic = cell_dir(model, "sq_o3") / "outliers.png"
        if pic.is_file():
            shutil.copy(pic, REPO / "results" / f"activation_outliers_{model}.png")
    cmds = {m: {k: shlex.join(command(m, k)) for k in args.rows} for m in args.models}
    notes = args.notes.read_text() if args.notes else ""
    md, js = render(results, ROWS, MODELS, cmds, REPO, notes, shlex.join(["python", *(a for a in sys.argv if a != "--collect-only")]))
    (REPO / "results" / "activation_methods.json").write_text(json.dumps(js, indent=1, default=str))
    (REPO / "results" / "activation_methods.md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
