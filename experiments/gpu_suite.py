"""GPU suite: one command that measures everything the performance issue asks of a GPU, within a time budget.

Device command (first thing whenever a GPU machine is lent; device tool `run` with timeout_s=590, which leaves the
machine's start and the transfers inside the session's 15 device minutes; on an H100 the 450 s budget was spent
with the e2e section cut short (2026-11-26), hence 520):

    set -o pipefail; PYTHONUNBUFFERED=1 QRESEARCH_COMMIT=<git rev-parse --short=12 HEAD, clean tree> \
        python3 experiments/gpu_suite.py --out $OUT --budget-s 520 --triton-cache .triton_cache \
        --reference .reference/gptq 2>&1 | tee $OUT/gpu_suite.log

with carry [".reference/gptq"] (IST-DASLab/gptq's gptq.py + quant.py, git-ignored: section 6; leave --reference
out where the folder is missing) and ".triton_cache" when that folder exists here: the compiled kernels of the
last GPU run (the triton_cache.tar.gz it returned, saved as .triton_cache/cache.tar.gz; git-ignored), so
unchanged kernels are not compiled again on the device (gpusuite/tcache.py). Later calls on the same warm machine
keep passing --triton-cache .triton_cache but carry nothing: the device's folder then still holds what the first
call compiled.

It writes gpu_<device-slug>.md and .json under --out (default results/) after every step, so a timeout still
leaves partial results; at --budget-s the running step is interrupted (recorded as such) and the report finished.
QRESEARCH_COMMIT names the commit (it wins over git: a device copy's .git can be a stale snapshot). A rerun of
some sections on a warm machine: `--sections kernels e2e --budget-s 200 --tag rerun`.
Sections, in order (each skips itself, with the reason recorded, when the budget left is too short):
  1 env          device, driver, CUDA, torch / triton / transformers, commit (+dirty), measured copy bandwidth
  2 correctness  every Triton kernel family vs float64 truth (gpusuite/correctness.py)
  3 kernels      (after 1 s of matmuls that bring the clocks up, and the host time per eager call at M = 1 by
                 launch path: gpusuite/launch.py)
                 fp16 vs W4A16 g128 / W8A16 / W8A8 at Llama-2-7B shapes, M = 1, 16, 256, 2048; the small-M paths
                 auto did not pick and the M = 1 GEMV with int-to-float code conversions (gemv-i2f: an A/B of
                 its default unpacking); act-order W4 permuted vs gathered (4096x11008); the W8A8 call in parts
                 beside cuBLAS int8 and cuBLAS fp8, the activation quantizer by row block (gpusuite/w8a8_parts.py);
                 the streaming-read floor per shape (gpusuite/floor.py); torch's int4 GEMM (tinygemm, bf16) at
                 M = 1 / 16 beside bf16 matmul and, at 4096x11008, our W4 in bf16 (gpusuite/peer.py)
  4 e2e          7B- and SmolLM2-shaped models: prefill / decode, fp16 vs packed W4 g128 vs W8A8 (every prefill
                 repeat kept: a slow first one shows a warm-up left in the timing)
  5 gptq         GPTQ calibration time of one 7B-shaped block
  6 gptq_ref     with --reference DIR (the original GPTQ's gptq.py + quant.py, carried, never committed): its
                 solver vs ours on the same W and H at Llama-2-7B layer shapes, act-order off / on, output identity
                 (gpusuite/gptq_reference.py); skipped without it. Alone on a warm machine:
                 `--sections gptq_ref --reference .reference/gptq --budget-s 150 --tag gptqref`
and a goals table (goals vs reached). Needs only torch, triton, transformers (no hydra, omegaconf, wandb, lm-eval,
datasets, gguf, pandas, pyarrow; tests/test_gpu_suite.py checks it). Exit status 1 when a correctness case fails.

CPU quick mode (CI): `python experiments/gpu_suite.py --quick --out /tmp/x` - tiny shapes; correctness under the
Triton interpreter, benchmark / e2e through the torch reference kernels, all labelled as such.
Library internals are used only in experiments/gpusuite/lib.py (marked call sites).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION_NAMES = ("env", "correctness", "kernels", "e2e", "gptq", "gptq_ref")
# least seconds of budget a section needs to start (GPU, CPU quick mode)
MIN_S = {"env": (5, 1), "correctness": (40, 5), "kernels": (45, 3), "e2e": (30, 3), "gptq": (25, 2),
         "gptq_ref": (20, 2)}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default results/; --quick: a temp folder)")
    ap.add_argument("--budget-s", type=float, default=520.0, help="wall-clock budget of the whole suite")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes; on CPU (implied without a GPU): Triton interpreter + torch reference")
    ap.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    ap.add_argument("--sections", nargs="+", default=list(SECTION_NAMES), choices=SECTION_NAMES,
                    help="sections to run (env always runs: the others use its measured copy bandwidth)")
    ap.add_argument("--tag", default="", help="suffix of the report's file name (e.g. for a partial rerun)")
    ap.add_argument("--triton-cache", default=None, metavar="DIR",
                    help="carry Triton's compile cache: restore DIR/cache.tar.gz, write <out>/triton_cache.tar.gz "
                         "(gpusuite/tcache.py)")
    ap.add_argument("--reference", default=None, metavar="DIR",
                    help="folder with the original GPTQ's gptq.py and quant.py (IST-DASLab/gptq): section gptq_ref")
    args = ap.parse_args(argv)
    args.sections = ["env"] + [s for s in args.sections if s != "env"]
    if args.reference is not None:
        missing = [f for f in ("gptq.py", "quant.py") if not (Path(args.reference) / f).is_file()]
        if missing:
            ap.error(f"--reference {args.reference}: {', '.join(missing)} missing; allowed: a folder holding "
                     f"IST-DASLab/gptq's gptq.py and quant.py")
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        ap.error(f"--tag={args.tag!r}: allowed letters, digits, '-' and '_'")
    if args.budget_s <= 0:
        ap.error(f"--budget-s={args.budget_s} must be > 0 seconds")
    return args


def _device(args):
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(args.device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here; allowed: auto, cpu")
    return d


def device_alive(device) -> bool:
    """False when the CUDA context is gone (a faulting kernel): later GPU sections would only repeat the error."""
    import torch

    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


def run_sections(args, ctx, state: dict, modules: dict) -> None:
    from experiments.gpusuite.common import BudgetExceeded

    quick_idx = 0 if ctx.full else 1
    lost = None
    for i, name in enumerate(SECTION_NAMES):
        sec = state["sections"][name] = {"status": "running"}
        ctx.reserve_s = sum(MIN_S[n][quick_idx] for n in SECTION_NAMES[i + 1:] if n in args.sections
                            and (n != "gptq_ref" or ctx.reference))
        why = ("not selected (--sections)" if name not in args.sections else lost
               or ("no --reference folder given" if name == "gptq_ref" and not ctx.reference else None)
               or ctx.skip_reason(MIN_S[name][quick_idx], name, reserve=False))
        if why:
            sec.update(status="skipped", reason=why)
            print(f"[{ctx.budget.used():5.0f} s] {name}: skipped ({why})", flush=True)
            ctx.save()
            continue
        print(f"[{ctx.budget.used():5.0f} s] {name}: start", flush=True)
        t0 = time.monotonic()
        try:
            modules[name].run(ctx, sec)
            sec["status"] = "done"
        except BudgetExceeded as exc:
            sec.update(status="interrupted", reason=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded; the next sections still run
            sec.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500],
                       traceback=traceback.format_exc()[-3000:])
            if not device_alive(ctx.device):
                lost = f"the CUDA context was lost after an error in section {name}"
        sec["seconds"] = time.monotonic() - t0
        print(f"[{ctx.budget.used():5.0f} s] {name}: {sec['status']} in {sec['seconds']:.0f} s"
              + (f" ({sec.get('error') or sec.get('reason')})" if sec["status"] != "done" else ""), flush=True)
        ctx.save()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(ROOT))
    import torch  # (does not import triton)

    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        args.quick = True  # without a GPU there is only the quick mode
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    from experiments.gpusuite import tcache

    carried = tcache.restore(Path(args.triton_cache)) if args.triton_cache else None  # before triton's import

    from experiments.gpusuite import correctness, e2e, env, gptq_block, gptq_reference, kernels, lib, report
    from experiments.gpusuite.common import Budget, BudgetExceeded, Ctx

    budget = Budget(args.budget_s)
    device = _device(args)
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(1)  # tiny shapes: threads only add overhead (and CI boxes are shared)
    out = Path(args.out) if args.out else (Path("/tmp/qresearch_gpu_suite") if args.quick else ROOT / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_{env.slug(device, args.quick)}{'_' + args.tag if args.tag else ''}"
    cmd = "python experiments/gpu_suite.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    state = {"meta": {"command": cmd, "quick": args.quick, "gpu": device.type == "cuda", "device": str(device),
                      "budget_s": args.budget_s, "used_s": 0.0, "finished": False}, "sections": {}}

    def save() -> None:  # write-then-rename: a kill mid-write leaves the previous complete files
        state["meta"]["used_s"] = budget.used()
        _write(stem.with_suffix(".json"), json.dumps(state, indent=1, default=str))
        try:
            md = report.markdown(state)
        except Exception:  # noqa: BLE001 - the JSON holds the numbers; never lose them to a rendering bug
            md = f"# GPU suite: the markdown rendering failed\n\n```\n{traceback.format_exc()}```\n"
        _write(stem.with_suffix(".md"), md)

    ctx = Ctx(device, args.quick, budget, save, reference=args.reference)
    modules = {"env": env, "correctness": correctness, "kernels": kernels, "e2e": e2e, "gptq": gptq_block,
               "gptq_ref": gptq_reference}
    budget.arm()
    # CPU: the benchmark / e2e measure the torch reference (correctness calls the interpreted kernels directly)
    forced = lib.forced_kernels("torch") if not ctx.gpu else contextlib.nullcontext()
    try:
        with forced:
            run_sections(args, ctx, state, modules)
    except BudgetExceeded as exc:  # between two steps: the sections not reached say so
        state["meta"]["interrupted"] = str(exc)
    finally:
        budget.disarm()
    state["meta"]["finished"] = True
    if carried is not None:
        state["meta"]["triton_cache"] = tcache.save(carried, out)
    state["goals"] = report.goals(state)
    save()
    print(stem.with_suffix(".md").read_text())
    print(report.short_summary(state))  # last: the device tool returns the end of the output
    print(f"wrote {stem}.md and .json", flush=True)
    failed = state["sections"].get("correctness", {}).get("failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
