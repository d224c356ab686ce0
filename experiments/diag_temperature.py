"""Is a quantized model's perplexity below FP a better model, or only softer predictions? A diagnostic for the
learned-methods table (issue 13), where AWQ + AdaRound on stories260K reports wikitext2 perplexity below FP.

For FP and a few table cells (the learned table's exact run arguments, rebuilt in this process), the eval chunks'
logits are scored at softmax temperatures T (logits / T): perplexity at T = 1 (the table's number, rechecked), the
best T on a grid and the perplexity there, and the mean predictive entropy. A model that only looks better because
its predictions are flatter loses its lead once every model gets its best temperature; one that models the text
better keeps it. Writes results/diag_temperature_<model>.{md,json}.

    python experiments/diag_temperature.py --model stories260k
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments import learned_table as lt  # noqa: E402

TEMPS = [round(0.8 + 0.05 * i, 2) for i in range(65)]  # 0.8 .. 4.0
CELLS = [("weight_only", "RTN", "w3 g128"), ("weight_only", "GPTQ", "w3 g128"), ("weight_only", "AWQ", "w3 g128"),
         ("weight_only", "AdaRound", "w3 g128"), ("weight_only", "AWQ + AdaRound (AWQ grid)", "w3 g128"),
         ("weight_only", "AWQ + AdaRound (AWQ grid)", "w2 g64"), ("dfq", "RTN per-tensor (naive)", "w6 per-tensor")]


def compose(overrides: list[str]):
    from hydra import compose as hcompose, initialize_config_dir

    import qresearch.config  # noqa: F401 - registers the config's resolvers

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hcompose(config_name="config", overrides=overrides)


@torch.no_grad()
def temperature_scores(model, chunks: torch.Tensor, temps: list[float]) -> dict:
    """Summed NLL per temperature and mean entropy at T = 1 over every next-token prediction of the chunks."""
    nll = torch.zeros(len(temps), dtype=torch.float64)
    ent, n = 0.0, 0
    for x in chunks:
        logits = model(input_ids=x[None]).logits[0, :-1].float()  # [seqlen - 1, vocab]
        y = x[1:]
        for i, t in enumerate(temps):
            nll[i] += F.cross_entropy(logits / t, y, reduction="sum").double()
        logp = F.log_softmax(logits, -1)
        ent += float(-(logp.exp() * logp).sum(-1).double().sum())
        n += y.numel()
    ppl = [math.exp(float(v) / n) for v in nll]
    best = min(range(len(temps)), key=lambda i: ppl[i])
    return {"ppl_t1": ppl[temps.index(1.0)], "best_t": temps[best], "ppl_best_t": ppl[best], "entropy": ent / n,
            "ppl_by_t": dict(zip(map(str, temps), ppl)), "n_predicted": n}


def cell_model(overrides: list[str]):
    """The cell's quantized model (fake-quant), built as runner.execute builds it; and its eval chunks."""
    from qresearch.config import plan
    from qresearch.data.tokens import eval_streams
    from qresearch.eval.ppl import chunk_ids
    from qresearch.models.arch import arch_for
    from qresearch.models.load import load_model
    from qresearch.nn.swap import swap_linears
    from qresearch.runner import _quantize, _seed

    p = plan(compose(overrides))
    _seed(p.seed)
    model, tok = load_model(p.model, p.device, p.seed)
    ids, _ = eval_streams(p.eval.datasets, tok, p.eval.seqlen)["wikitext2"]
    chunks = chunk_ids(ids, p.eval.seqlen, p.eval.max_chunks)
    if p.steps:
        result = _quantize(p, model, arch_for(model), tok, p.device)[0]
        swap_linears(model, result, p.modules)
    return model.eval(), chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stories260k", choices=list(lt.MODELS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for section, row, col in [("fp", "FP", "-"), *CELLS]:
        if section == "fp":
            argv = lt.run_args(args.model, "weight_only", "RTN", "w3 g128")
            argv = [a for a in argv if not a.startswith(("method=", "bits=", "group_size="))] + ["method=fp16"]
        else:
            argv = lt.run_args(args.model, section, row, col)
        overrides = argv[2:]  # drop "python run.py"
        model, chunks = cell_model(overrides)
        r = {"section": section, "row": row, "col": col, "command": shlex.join(argv),
             **temperature_scores(model, chunks, TEMPS)}
        print(f"{row} {col}: ppl {r['ppl_t1']:.2f}, best T {r['best_t']} -> {r['ppl_best_t']:.2f}, "
              f"entropy {r['entropy']:.3f}", flush=True)
        rows.append(r)
    out = REPO / "results" / f"diag_temperature_{args.model}"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(markdown(args.model, rows))
    print(out.with_suffix(".md").read_text())


def markdown(model: str, rows: list[dict]) -> str:
    from qresearch.tracking.provenance import commit_label, provenance

    fp = rows[0]
    n = fp["n_predicted"]
    lines = [f"# Temperature diagnostic: {model}, wikitext2 (learned-methods table cells)", "",
             f"Each model's eval-chunk logits (the table's protocol: {n} predicted tokens) scored at softmax "
             f"temperature T (logits / T), T on a grid {TEMPS[0]}..{TEMPS[-1]} step 0.05 (a best T at the grid's "
             "edge would be marked). *ppl* is the table's "
             "number (T = 1), *best T* / *ppl at best T* the grid's minimum (T fitted on the eval text itself: a "
             "diagnostic, not a protocol), *entropy* the mean predictive entropy (nats) at T = 1. Quantized models "
             f"rebuilt in this process from each cell's run arguments; one torch thread. Commit "
             f"{commit_label(provenance(torch.device('cpu'), 0))}.", "",
             "Regenerate: `python experiments/diag_temperature.py --model " + model + "`", "",
             "| cell | ppl (T = 1) | vs FP | best T | ppl at best T | vs FP at its best T | entropy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = "FP" if r["section"] == "fp" else f"{r['row']} ({r['col']})"
        edge = " (grid edge)" if r["best_t"] in (TEMPS[0], TEMPS[-1]) else ""
        lines.append(f"| {label} | {r['ppl_t1']:.2f} | {r['ppl_t1'] / fp['ppl_t1'] - 1:+.1%} | {r['best_t']}{edge} | "
                     f"{r['ppl_best_t']:.2f} | {r['ppl_best_t'] / fp['ppl_best_t'] - 1:+.1%} | {r['entropy']:.3f} |")
    lines += ["", "Commands of the cells: " + "; ".join(f"`{r['command']}`" for r in rows[1:]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
