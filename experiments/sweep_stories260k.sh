#!/usr/bin/env bash
# Issue 3 acceptance: fp16/rtn x bits 3,4 on stories260K (full wikitext2 test, seqlen 256) with latency,
# then the report (markdown + ppl-vs-bits and ppl-vs-latency PNGs) into results/. Re-running skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${QRESEARCH_SHARED:-$(cd .. && pwd)/shared}"
export QRESEARCH_RESULTS="$PWD/results/runs/sweep_stories260k"   # run dirs (git-ignored)
SWEEP="python run.py -m model=stories260k method=fp16,rtn bits=3,4 data.root=$SHARED/data eval.latency.enabled=true eval.latency.prompt_lengths=[128,512] logger=wandb logger.mode=offline"
$SWEEP
python -m qresearch.report --results "$QRESEARCH_RESULTS" --out results/sweep_stories260k --models stories260k \
  --command "bash experiments/sweep_stories260k.sh   # = $SWEEP ; python -m qresearch.report ..."
