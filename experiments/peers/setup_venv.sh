#!/usr/bin/env bash
# Build the llm-compressor virtual environment used by experiments/peers.py (it pins transformers<=5.17 and
# compressed-tensors 0.19, which the harness's own environment does not have). CPU torch first, so llm-compressor
# does not pull a CUDA build. Idempotent: a venv that already imports llmcompressor is kept.
set -euo pipefail
VENV="${1:?usage: setup_venv.sh <venv dir>}"
LLMC_VERSION="${LLMC_VERSION:-0.14.0.1}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import llmcompressor" 2>/dev/null; then
  echo "venv $VENV ready"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "llmcompressor==$LLMC_VERSION" pyarrow
"$VENV/bin/python" -c "import llmcompressor, transformers, compressed_tensors, torch; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__, 'compressed-tensors', compressed_tensors.__version__, 'torch', torch.__version__)"
