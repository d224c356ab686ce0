"""Does the committed GPTQ/AWQ table reproduce after the method-platform refactor? Reruns a subset of its cells
(stories260K, the table's exact commands) into their own run dirs and writes results/platform_repro.md:
committed perplexity vs rerun, per cell.

    python experiments/platform_repro.py                    # stories260K: rtn, gptq, gptq act_order, awq, awq_gptq
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))
import gptq_awq_table as table  # noqa: E402

from qresearch.tracking.provenance import provenance  # noqa: E402

ROWS = ["rtn", "gptq", "gptq act_order", "awq", "awq_gptq"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["stories260k"])
    ap.add_argument("--rows", nargs="+", default=ROWS)
    args = ap.parse_args()
    table.RUNS = REPO / "results" / "runs" / "platform_repro"
    committed = json.loads((REPO / "results" / "gptq_awq.json").read_text())
    lines, cmds = [], []
    for model in args.models:
        for row in args.rows:
            for bits in table.BITS:
                m = table.run_cell(model, row, bits, [])
                cmds.append(shlex.join(table.command(model, row, bits, [])).replace(str(REPO) + "/", ""))
                old = (committed.get(model, {}).get(row) or {}).get(bits)
                new = table.summarize(m)["ppl"] if m else None
                rel = f"{(new - old['ppl']) / old['ppl'] * 100:+.3f}%" if (new and old) else "n/a"
                lines.append(f"| {model} | {row} | {bits} | {old['ppl'] if old else float('nan'):.3f} | "
                             f"{new if new else float('nan'):.3f} | {rel} |")
    prov = provenance(__import__("torch").device("cpu"), 0)
    md = ["# Method-platform refactor: committed GPTQ/AWQ cells rerun", "",
          f"Commit {prov['git_commit'][:12]} (dirty: {prov['git_dirty']}), torch {prov['versions']['torch']}, "
          f"transformers {prov['versions']['transformers']}, {prov['cpu']}, {prov['torch_threads']} threads "
          "(2-core CPU shared with other jobs: timings are not compared here, only perplexities).",
          "Committed = results/gptq_awq.json (before the refactor); rerun = the same command after it.", "",
          "| model | method | bits | committed ppl | rerun ppl | change |", "|---|---|---|---|---|---|", *lines, "",
          "Commands:", "", "```", *cmds, "```"]
    (REPO / "results" / "platform_repro.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
