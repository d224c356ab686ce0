"""experiments/bench_dispatch_overhead.py runs (fresh process: it sets TRITON_INTERPRET before triton loads) and
every timed call reaches the stubbed kernel launch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_overhead_benchmark_runs_and_reaches_the_launch(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, "experiments/bench_dispatch_overhead.py", "--shape", "256x256", "--calls",
                           "50", "--repeats", "2", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "QRESEARCH_SMALL_M"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["launches"] == 20 + 50 * 2 and row["us_per_call_median"] > 0
