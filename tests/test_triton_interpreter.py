"""Runs the Triton kernel cases (tests/interp_*.py) under TRITON_INTERPRET=1 on CPU in a fresh process.

Triton decorates its own standard library when first imported, so the interpreter flag must be set before any
`import triton` in the process; a subprocess keeps the flag out of every other test.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cases", ["interp_kernels.py", "interp_quantlinear.py", "interp_gemv.py",
                                   "interp_small.py", "interp_dequant.py", "interp_gptq.py"])
def test_triton_kernels_under_interpreter(cases):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/{cases}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"interpreter cases failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
