"""Driver for Nsight Compute on the M = 1 kernels (GPU only): tunes each path outside the profiled range, then
runs one call per path (and the streaming-read floor kernel) inside the NVTX range 'prof'.

    ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats python3 experiments/ncu_small_m.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import bench_kernels as bk  # noqa: E402
from experiments.gpusuite import lib  # noqa: E402
from experiments.gpusuite.floor import read_words  # noqa: E402

dev = torch.device("cuda")
shape = sys.argv[1] if len(sys.argv) > 1 else "4096x11008"
out_f, in_f = map(int, shape.split("x"))
mod = bk.build("w4a16_g128", out_f, in_f, dev, torch.float16)
x = torch.randn(1, in_f, device=dev, dtype=torch.float16)
words = torch.randint(-2**31, 2**31 - 1, (out_f * in_f // 8,), dtype=torch.int32, device=dev)
paths = ("gemv", "small")
for p in paths:
    with lib.small_m_path(p):
        mod(x)
read_words(words, 1024, 4, 8)
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("prof")
for p in paths:
    with lib.small_m_path(p):
        mod(x)
read_words(words, 1024, 4, 8)
torch.cuda.synchronize()
torch.cuda.nvtx.range_pop()
print("done")
