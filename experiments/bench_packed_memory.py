"""What a packed model holds on CPU: the packed linears' stored buffers and, beside them, what their kernels make
(qresearch.kernels.prepared.derived_bytes: a kernel's own weight layout, permuted copies, fp32 scales), per variant
and activation dtype, after one forward has prepared every layer. Bytes, not times: the numbers do not depend on
the machine's load.

    python experiments/bench_packed_memory.py                          # SmolLM2-135M -> results/packed_memory_cpu.md
    python experiments/bench_packed_memory.py --model stories260k --out /tmp/m.md

Each weight-only fp32 variant runs twice: as dispatch runs it (our C kernel reads 4- / 8-bit stored words in place
where groups and width are multiples of 32) and with that in-place path turned off (codes copied into the kernel's
own layout, as every layer was prepared before), so the saving is measured side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.bench_decode_cpu import QUANT, load  # noqa: E402
from experiments.bench_kernels import commit_label  # noqa: E402
from methods.rtn import RTN  # noqa: E402
from qresearch.kernels import cpu_lowbit  # noqa: E402
from qresearch.kernels.prepared import derived_bytes  # noqa: E402
from qresearch.method import Context  # noqa: E402
from qresearch.models.arch import arch_for  # noqa: E402
from qresearch.nn.packed import packed_weight_bytes  # noqa: E402
from qresearch.nn.swap import swap_linears  # noqa: E402


def measure(base, result, dtype: torch.dtype, in_place: bool) -> dict:
    """Stored and kernel-held MiB of `base` packed with `result` in `dtype`, after one 8-token forward."""
    model = copy.deepcopy(base).to(dtype)
    kernels = swap_linears(model, result, "packed")
    off = mock.patch.object(cpu_lowbit, "prepare_lowbit_stored", lambda *a: None)
    with torch.no_grad(), (contextlib.nullcontext() if in_place else off):
        model(torch.arange(8)[None] % model.config.vocab_size)
    row = {"kernels": dict(Counter(kernels.values())), "stored_mib": packed_weight_bytes(model) / 2**20,
           "copies_mib": derived_bytes(model) / 2**20}
    del model
    gc.collect()
    return row


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    base, note = load(args.model)
    ctx = Context(None, arch_for(base), torch.device("cpu"))
    rows = []
    for q, (bits, group, sym, act) in QUANT.items():
        result = RTN(bits, group, sym, act_bits=act).quantize(base, ctx)
        for dtype in (torch.float32, torch.bfloat16):
            rows.append({"variant": q, "dtype": str(dtype)[6:], "path": "dispatch", **measure(base, result, dtype, True)})
            if act == 16 and dtype == torch.float32:
                rows.append({"variant": q, "dtype": "float32", "path": "C kernel codes copied (in-place path off)",
                             **measure(base, result, dtype, False)})
    lines = [f"# Packed weights held on CPU: {args.model}", "",
             "Stored MiB: the packed linears' buffers (codes, scales, zeros) as a checkpoint holds them. Kernel copies "
             "MiB: what their CPU kernels hold beside them after one forward (`derived_bytes`: a kernel's own weight "
             "layout, fp32 scales / zeros); their sum is the packed linears' resident weight memory. Embeddings, "
             "norms and the lm_head stay dense and are not counted.", "",
             f"- model weights: {note or 'as published (float)'}",
             "- variants: RTN w4 g128 asym, w8 per-channel sym, W8A8 (w8 + per-token dynamic int8 activations)",
             f"- command: python experiments/bench_packed_memory.py {' '.join(sys.argv[1:])}",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}, commit {commit_label()}, "
             f"torch {torch.__version__}", "",
             "| variant | activations | path | kernels (layers) | stored MiB | kernel copies MiB | held / stored |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        k = ", ".join(f"{n} ({c})" for n, c in r["kernels"].items())
        lines.append(f"| {r['variant']} | {r['dtype']} | {r['path']} | {k} | {r['stored_mib']:.2f} | "
                     f"{r['copies_mib']:.2f} | {(r['stored_mib'] + r['copies_mib']) / r['stored_mib']:.2f}x |")
    out = Path(args.out) if args.out else ROOT / "results" / "packed_memory_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
