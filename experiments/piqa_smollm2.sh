#!/usr/bin/env bash
# Issue 3: lm-eval PIQA (first 500 of the 1,838 validation items: CPU budget; offline local task, 0-shot) on SmolLM2-135M-Instruct
# (weights stored as GGUF Q4_1) for fp16, rtn w4 g128 and rtn w3 g128; report into results/piqa_smollm2.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${QRESEARCH_SHARED:-$(cd .. && pwd)/shared}"
export QRESEARCH_RESULTS="$PWD/results/runs/piqa_smollm2"
python run.py -m model=smollm2_135m method=fp16,rtn bits=3,4 data.root="$SHARED/data" eval.datasets=[] \
  eval.lm_eval.tasks=[piqa_local] eval.lm_eval.limit=500 logger=none
python -m qresearch.report --results "$QRESEARCH_RESULTS" --out results/piqa_smollm2 --models smollm2_135m \
  --command "bash experiments/piqa_smollm2.sh   # python run.py -m model=smollm2_135m method=fp16,rtn bits=3,4 eval.datasets=[] eval.lm_eval.tasks=[piqa_local] eval.lm_eval.limit=500"
