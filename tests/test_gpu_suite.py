"""experiments/gpu_suite.py: the CPU quick mode end to end (with the packages the GPU image lacks made
unimportable), its import graph, that its correctness check can fail, the budget, and the goals table."""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from tests._qhelpers import REPO

BLOCKED = ("hydra", "omegaconf", "wandb", "lm_eval", "datasets", "gguf", "pandas", "pyarrow")
# None in sys.modules: `import x` raises ImportError and importlib.util.find_spec(x) is None, as if not installed
BLOCKER = f"import sys\nfor m in {BLOCKED!r}:\n    sys.modules[m] = None\n"


def _py(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QRESEARCH_KERNELS")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=timeout)


def test_importing_the_suite_pulls_none_of_the_missing_packages():
    code = ("import sys; sys.path.insert(0, '.')\nimport experiments.gpu_suite\n"
            "from experiments.gpusuite import common, correctness, e2e, env, gptq_block, kernels, lib, report\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}))")
    proc = _py(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _fake_cache_archive(folder: Path) -> None:
    """folder/cache.tar.gz holding one Triton cache entry (a metadata group file and a binary)."""
    from experiments.gpusuite import tcache

    entry = folder / "src" / "abc123"
    entry.mkdir(parents=True)
    (entry / "__grp__k.json").write_text("{}")
    (entry / "k.cubin").write_bytes(b"\0" * 64)
    (folder / tcache.ARCHIVE).write_bytes(tcache.pack(folder / "src"))


REFERENCE_STANDIN = {
    "quant.py": """import torch


def quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


class Quantizer(torch.nn.Module):
    def configure(self, bits, perchannel=True, sym=False, mse=False):
        self.maxq = torch.tensor(2 ** bits - 1)

    def find_params(self, x, weight=True):
        lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        self.scale = ((hi - lo) / self.maxq).clamp(min=1e-8)[:, None]
        self.zero = torch.round(-lo[:, None] / self.scale)
""",
    "gptq.py": """from quant import *


class GPTQ:
    \"\"\"Test stand-in with the reference's interface: round-to-nearest per group, no error feedback.\"\"\"

    def __init__(self, layer):
        self.layer = layer

    def fasterquant(self, blocksize=128, percdamp=.01, groupsize=-1, actorder=False):
        W = self.layer.weight.data.clone().float()
        Q = torch.zeros_like(W)
        for i in range(W.shape[1]):
            if i % groupsize == 0:
                self.quantizer.find_params(W[:, i:i + groupsize])
            Q[:, i] = quantize(W[:, i:i + 1], self.quantizer.scale, self.quantizer.zero, self.quantizer.maxq)[:, 0]
        self.layer.weight.data = Q
"""}


def _reference_standin(folder: Path) -> Path:
    """A folder with gptq.py + quant.py of the reference's interface (the real one is never in the repo or CI)."""
    folder.mkdir()
    for name, text in REFERENCE_STANDIN.items():
        (folder / name).write_text(text)
    return folder


def test_quick_mode_writes_every_section_without_the_missing_packages(tmp_path):
    _fake_cache_archive(tmp_path / "tc")
    ref = _reference_standin(tmp_path / "ref")
    code = BLOCKER + (f"import runpy\nsys.argv = ['experiments/gpu_suite.py', '--quick', '--out', {str(tmp_path)!r}, "
                      f"'--triton-cache', {str(tmp_path / 'tc')!r}, '--reference', {str(ref)!r}]\n"
                      "runpy.run_path('experiments/gpu_suite.py', run_name='__main__')")
    proc = _py(code)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (js,) = tmp_path.glob("gpu_quick_*.json")
    state = json.loads(js.read_text())
    tc = state["meta"]["triton_cache"]  # the carried entry is restored, counted and written back
    assert tc["carried_entries"] == 1 and tc["entries"] >= 1 and tc["written"], tc
    with tarfile.open(tmp_path / "triton_cache.tar.gz") as tar:
        assert "abc123/k.cubin" in tar.getnames()
    secs = state["sections"]
    assert {k: v["status"] for k, v in secs.items()} == {k: "done" for k in
                                                         ("env", "correctness", "kernels", "e2e", "gptq", "gptq_ref")}
    corr = secs["correctness"]
    assert corr["passed"] == corr["n_cases"] == len(corr["rows"]) and not corr["failed"]
    assert {r["family"] for r in corr["rows"]} == {"wq", "gemv2", "dequant", "small", "act_perm", "w8a8",
                                                  "act_quant", "gptq_loop", "rtn_device"}
    assert {r["path"] for r in corr["rows"] if r["family"] == "wq"} == {"gemv", "splitk", "prefill"}
    assert {r["bits"] for r in corr["rows"] if r["family"] == "wq"} == set(range(2, 9))
    assert all(r["kernel"].startswith("torch_ref_") for r in secs["kernels"]["rows"])
    assert {(r["model"], r["variant"]) for r in secs["e2e"]["rows"] if "decode" in r} == {
        (m, v) for m in ("llama2_7b", "smollm2_135m") for v in ("fp16", "w4_g128", "w8a8")}
    assert secs["gptq"]["method_total_s"] > 0 and secs["gptq"]["solve_total_s"] > 0
    ab = secs["gptq"]["loop_ab"]  # the column-loop A/B: both paths ran and gave the same codes and qparams
    assert [r["layer"] for r in ab] == ["self_attn.q_proj", "mlp.down_proj"] and all(r["identical"] for r in ab)
    ref_rows = secs["gptq_ref"]["rows"]  # every cell timed; the RTN stand-in's output is not GPTQ's
    assert [(r["shape"], r["act_order"]) for r in ref_rows] == [(s, a) for s in ("96x160", "160x96")
                                                                for a in (False, True)]
    assert all(r["ours_s"] > 0 and r["reference_s"] > 0 and not r["identical"]["codes"] for r in ref_rows)
    assert all(0 < r["codes_differing"] < 1 for r in ref_rows)
    assert set(secs["gptq_ref"]["files_sha256"]) == {"gptq.py", "quant.py"}
    assert [g["status"] for g in state["goals"]] == ["NOT MEASURED"] * 6
    graph = [r["graph_decode"]["1"] for r in secs["e2e"]["rows"] if "decode" in r]
    assert all(g["graph"] is False and g["ms_per_step"] > 0 for g in graph)  # the static-cache loop, eager on CPU
    md = js.with_suffix(".md").read_text()
    assert "CPU quick mode" in md.splitlines()[0] and "the goals are NOT measured" in md
    assert "Triton compile cache: 1 kernels carried in" in md
    assert "| 96x160 | on |" in md and "NO: codes" in md
    for heading in ("## Goals", "## 1. Environment", "## 2. Kernel correctness", "## 3. Kernel benchmark",
                    "## 4. End to end", "## 5. GPTQ", "## 6. GPTQ solver vs the reference"):
        assert heading in md


def _wq_case(m=3):
    from experiments.gpusuite.correctness import QUICK_SHAPE, Case

    return Case("wq", m, *QUICK_SHAPE, torch.float32, bits=4, group=128, sym=False)


def _reference_kernel(transform):
    """A stand-in for the Triton launch: the torch reference's output, passed through `transform`."""
    from experiments.gpusuite import lib

    def kernel(case, tile, meta, bufs, x, bias, static):
        return transform(lib.wa16_reference(x, meta, bufs, bias))
    return kernel


def test_correctness_check_passes_the_reference_and_fails_wrong_outputs():
    from experiments.gpusuite import lib
    from experiments.gpusuite.correctness import QUICK_TILES, run_case

    cpu = torch.device("cpu")
    assert run_case(_wq_case(), cpu, QUICK_TILES, kernel=_reference_kernel(lambda y: y))["status"] == "PASS"
    scaled = run_case(_wq_case(), cpu, QUICK_TILES, kernel=_reference_kernel(lambda y: y * 1.001))
    assert scaled["status"] == "FAIL" and scaled["rel"] > scaled["tol"]

    def one_nan(y):
        y = y.clone()
        y[0, 5] = float("nan")
        return y
    nan = run_case(_wq_case(), cpu, QUICK_TILES, kernel=_reference_kernel(one_nan))
    assert nan["status"] == "FAIL" and nan["note"] == "non-finite output"
    short = run_case(_wq_case(), cpu, QUICK_TILES, kernel=_reference_kernel(lambda y: y[:, :-1]))
    assert short["status"] in ("FAIL", "ERROR")

    def boom(*_):
        raise RuntimeError("kernel crashed")
    assert run_case(_wq_case(), cpu, QUICK_TILES, kernel=boom)["status"] == "ERROR"

    calls = []

    def drifts(case, tile, meta, bufs, x, bias, static):  # right at the first call, one ulp off at the second
        calls.append(1)
        y = lib.wa16_reference(x, meta, bufs, bias)
        return y if len(calls) == 1 else torch.nextafter(y, y + 1)
    row = run_case(_wq_case(), cpu, QUICK_TILES, kernel=drifts)
    assert row["status"] == "FAIL" and "second call" in row["note"] and len(calls) == 2


def test_act_quant_check_wants_bit_identical_codes():
    from experiments.gpusuite import lib
    from experiments.gpusuite.correctness import QUICK_TILES, Case, run_case

    case = Case("act_quant", 5, 16, 64, torch.float32)

    def off_by_one(case, tile, meta, bufs, x, bias, static):
        q, s = lib.act_quant_reference(x)
        q = q.clone()
        q[0, 0] += 1 if q[0, 0] < 127 else -1
        return q, s
    row = run_case(case, torch.device("cpu"), QUICK_TILES, kernel=off_by_one)
    assert row["status"] == "FAIL" and row["max_abs"] == 1


class _Sleeper:
    @staticmethod
    def run(ctx, sec):
        sec["started"] = True
        time.sleep(5)


class _Quick:
    @staticmethod
    def run(ctx, sec):
        sec["ran"] = True


def test_budget_skips_sections_and_interrupts_a_running_one():
    import argparse

    from experiments.gpu_suite import SECTION_NAMES, run_sections
    from experiments.gpusuite.common import Budget, Ctx

    args = argparse.Namespace(sections=list(SECTION_NAMES))
    budget = Budget(1.5)  # enough for env (1 s in quick mode), not for correctness (5 s)
    ctx = Ctx(torch.device("cpu"), True, budget, reference="ref")  # gptq_ref runs only with a reference
    state = {"sections": {}}
    budget.arm()
    try:
        run_sections(args, ctx, state, {n: _Sleeper if n == "env" else _Quick for n in SECTION_NAMES})
    finally:
        budget.disarm()
    secs = state["sections"]
    assert secs["env"]["status"] == "interrupted" and secs["env"]["started"]
    assert secs["env"]["seconds"] < 4
    for n in SECTION_NAMES[1:]:
        assert secs[n]["status"] == "skipped" and "budget left" in secs[n]["reason"] and "ran" not in secs[n]


def _kernel_row(variant, shape, m, speedup, kernel):
    return {"variant": variant, "shape": shape, "M": m, "speedup": speedup, "kernel": kernel}


def test_goals_table_met_missed_not_measured():
    from experiments.gpusuite.report import goals

    rows = [_kernel_row("w4a16_g128", "4096x11008", 1, 3.6, "triton_w4a16"),
            _kernel_row("w4a16_g128", "4096x11008", 16, 2.0, "triton_w4a16"),
            _kernel_row("w8a8", "4096x11008", 2048, 1.7, "torch_ref_w8a8")]
    state = {"meta": {"quick": False}, "sections": {"kernels": {"status": "done", "rows": rows},
                                                    "e2e": {"status": "skipped", "reason": "no time"}}}
    got = [g["status"] for g in goals(state)]
    assert got == ["MET", "MISSED", "NOT A GPU KERNEL", "NOT MEASURED", "NOT MEASURED", "NOT MEASURED"]
    assert "no time" in goals(state)[3]["note"]
    e2e = [{"model": "llama2_7b", "variant": v, "layers": 32, "decode": {"1": tps}, "kernels": k,
            "decode_ms_per_step": {"1": 1e3 / tps}, "step_floor_ms": 1.2}
           for v, tps, k in (("fp16", 20.0, {"torch.nn.Linear (cuBLAS)": 224}), ("w4_g128", 45.0,
                                                                              {"triton_w4a16": 224}))]
    state["sections"]["e2e"] = {"status": "done", "rows": e2e}
    decode = goals(state)[3]
    assert decode["status"] == "MISSED" and decode["reached"] == "2.25x"
    e2e[0]["graph_decode"] = {"1": {"ms_per_step": 4.0, "tokens_per_s": 250.0, "graph": True}}
    e2e[1]["graph_decode"] = {"1": {"error": "RuntimeError: capture"}}
    assert goals(state)[4]["status"] == "NOT MEASURED" and "capture" in goals(state)[4]["note"]
    e2e[1]["graph_decode"] = {"1": {"ms_per_step": 1.25, "tokens_per_s": 800.0, "graph": True}}
    assert goals(state)[4]["status"] == "MET" and goals(state)[4]["reached"] == "3.20x"
    # fuse=true rows: the faster of fused / unfused W4 counts, and the note says which
    e2e[1]["fused"] = {"decode": {"1": 54.0}, "graph_decode": {"1": {"ms_per_step": 1.0, "tokens_per_s": 1e3,
                                                                          "graph": True}}}
    g3, g4 = goals(state)[3:5]
    assert g3["reached"] == "2.70x" and g3["note"].startswith("fused (fuse=true)")
    assert g4["reached"] == "4.00x" and g4["note"].startswith("fused (fuse=true)") and "unfused W4 1.25" in g4["note"]
    e2e[1]["fused"]["graph_decode"]["1"]["ms_per_step"] = 2.0  # slower than unfused: unfused stands
    assert goals(state)[4]["reached"] == "3.20x" and "fused" not in goals(state)[4]["note"]
    del e2e[1]["fused"]
    state["sections"]["kernels"]["floor"] = [{"shape": "4096x11008", "w4_us": 16.0, "w4_gbs": 1400.0,
                                              "fp16_us": 46.2, "fp16_gbs": 1950.0, "ratio": 2.89}]
    notes = [g["note"] for g in goals(state)]
    assert "read floor 16.0 us" in notes[0] and "2.89x" in notes[1] and "read floor" not in notes[2]
    from experiments.gpusuite.report import _kernels

    table = "\n".join(_kernels({"floor": state["sections"]["kernels"]["floor"]}))
    assert "| 4096x11008 | 16.0 | 1400 | 46.2 | 1950 | 2.89x |" in table
    part = {"shape": "4096x11008", "M": 2048, "fp16_us": 237.0, "call_us": 300.0, "speedup": 0.79,
            "act_quant_us": 20.0, "gemm_us": 270.0, "cublas_int8_us": 140.0, "gemm_vs_cublas": 0.52,
            "cublas_bound": 1.48, "gemm_rel_err": 1e-4}
    state["sections"]["kernels"]["w8a8_parts"] = [part]
    assert "cuBLAS bound 1.48x" in goals(state)[2]["note"] and "cuBLAS" not in goals(state)[0]["note"]
    table = "\n".join(_kernels({"w8a8_parts": [part]}))
    assert "| 4096x11008 | 2048 | 237.0 | 300.0 | 0.79x | 20.0 | - | 270.0 | 140.0 | 0.52x | 1.48x | 1.0e-04 |" in table
    part["act_quant_blocks"] = [{"block": 1024, "us": 31.5, "identical": True},
                                {"block": 2048, "us": 18.25, "identical": False}]
    assert "| 20.0 | 1024: 31.5 / 2048: 18.2! | 270.0 |" in "\n".join(_kernels({"w8a8_parts": [part]}))
    failed = {**part, "cublas_int8_us": None, "gemm_vs_cublas": None, "cublas_bound": None, "gemm_rel_err": None,
              "cublas_error": "RuntimeError: layout"}
    state["sections"]["kernels"]["w8a8_parts"] = [failed]
    assert "cuBLAS" not in goals(state)[2]["note"]
    assert "| 270.0 | - | - | - | RuntimeError: layout |" in "\n".join(_kernels({"w8a8_parts": [failed]}))
    fp8 = {**part, "fp8_us": 120.0, "fp8_bound": 237.0 / 140.0, "fp8_rel_err": 2e-3}
    assert "| 1.0e-04 | 120.0 | 1.69x |" in "\n".join(_kernels({"w8a8_parts": [fp8]}))
    fp8 = {**part, "fp8_us": None, "fp8_bound": None, "fp8_error": "RuntimeError: no fp8"}
    assert "| 1.0e-04 | RuntimeError: no fp8 | - |" in "\n".join(_kernels({"w8a8_parts": [fp8]}))


def _ref_row(shape, act_order, ours, theirs, identical=True):
    return {"shape": shape, "act_order": act_order, "ours_s": ours, "reference_s": theirs, "speedup": theirs / ours,
            "identical": {"codes": identical, "scales": True, "zeros": True, "dequantized": identical},
            "codes_differing": 0.0 if identical else 0.001}


def test_gptq_reference_goal_wants_speed_and_identical_output():
    from experiments.gpusuite.report import gptq_ref_goal

    state = {"meta": {"quick": False}, "sections": {"gptq_ref": {"status": "skipped",
                                                                 "reason": "no --reference folder given"}}}
    g = gptq_ref_goal(state)
    assert g["status"] == "NOT MEASURED" and "no --reference" in g["note"]
    rows = [_ref_row("4096x4096", False, 0.2, 0.9), _ref_row("4096x11008", True, 0.5, 1.0)]
    state["sections"]["gptq_ref"] = {"status": "done", "rows": rows}
    g = gptq_ref_goal(state)
    assert (g["status"], g["reached"]) == ("MET", "2.00x") and "4096x11008 act-order on" in g["note"]
    assert "2 of 6 cells" in g["note"]
    rows.append(_ref_row("11008x4096", False, 0.5, 0.6))
    assert gptq_ref_goal(state)["status"] == "MISSED"
    rows[-1] = _ref_row("11008x4096", False, 0.1, 0.6, identical=False)
    g = gptq_ref_goal(state)
    assert g["status"] == "NOT IDENTICAL" and "11008x4096 ao=0: 0.100% codes differ" in g["note"]


def test_reference_folder_without_its_files_is_refused(tmp_path):
    proc = _py(f"import sys; sys.path.insert(0, '.')\nfrom experiments.gpu_suite import parse\n"
               f"parse(['--quick', '--reference', {str(tmp_path)!r}])")
    assert proc.returncode == 2 and "gptq.py, quant.py missing" in proc.stderr.strip().splitlines()[-1]


def test_markdown_renders_partial_and_failed_states():
    from experiments.gpusuite.report import markdown, short_summary

    state = {"meta": {"quick": False, "gpu": True, "command": "x", "budget_s": 450, "used_s": 460,
                      "finished": True},
             "sections": {"env": {"status": "done", "device": "GPU"},
                          "correctness": {"status": "interrupted", "reason": "budget", "rows": [
                              {"case": "c", "path": "gemv", "tol": 2e-3, "status": "ERROR", "note": "boom"}]},
                          "kernels": {"status": "error", "error": "RuntimeError: x"},
                          "e2e": {"status": "running", "rows": [{"model": "llama2_7b", "variant": "w8a8",
                                                                 "error": "OOM"}]},
                          "gptq": {"status": "skipped", "reason": "no time"}}}
    md = markdown(state)
    assert "ERROR OOM" in md and "status: **skipped**" in md and "RuntimeError: x" in md
    assert "interrupted" in short_summary(state)


def test_triton_cache_too_large_is_not_written(tmp_path, monkeypatch):
    from experiments.gpusuite import tcache

    _fake_cache_archive(tmp_path / "tc")
    monkeypatch.setenv("TRITON_CACHE_DIR", "unset")
    monkeypatch.setenv("TRITON_STORE_BINARY_ONLY", "0")
    info = tcache.restore(tmp_path / "tc")
    assert info["carried_entries"] == 1 and os.environ["TRITON_CACHE_DIR"].endswith("kernels")
    got = tcache.save(info, tmp_path, max_bytes=10)
    assert got["written"] is None and "MiB >" in got["why_not"] and not (tmp_path / tcache.OUT_NAME).exists()
    assert tcache.pack(tmp_path / "tc" / "kernels") == tcache.pack(tmp_path / "tc" / "kernels")  # deterministic


def test_gptq_section_runs_the_method_on_the_format_path_when_the_int_loop_fails(monkeypatch):
    """A column loop that fails on the device costs the A/B table only: the error is recorded, the method runs with
    INT_LOOP off, and the report names the path it took."""
    import methods.gptq as gptq_method
    import methods.gptq_solver as solver
    from experiments.gpusuite import gptq_block, lib, report
    from experiments.gpusuite.common import Budget, Ctx

    def broken(*a, **k):
        raise RuntimeError("PTX assembly failed")

    seen = []
    real = solver.gptq_quantize
    monkeypatch.setattr(lib, "gptq_loop_ab", broken)
    monkeypatch.setattr(gptq_method, "gptq_quantize", lambda *a, **k: seen.append(solver.INT_LOOP) or real(*a, **k))
    state = {}
    gptq_block.run(Ctx(torch.device("cpu"), True, Budget(600)), state)
    assert "PTX assembly failed" in state["loop_ab_error"] and seen and not any(seen) and solver.INT_LOOP
    assert state["method_total_s"] > 0 and "loop_ab" not in state
    assert "format path's torch ops: the int loop failed (RuntimeError: PTX assembly failed)" in "\n".join(
        report._gptq(state))


def test_step_split_puts_the_block_linears_at_the_w4_read_floor():
    """The CUDA-graph goal's bound: fp16 step = its block linears (M = 1 kernel times x Llama counts) + the rest;
    with every block linear at the W4 read floor the step would be rest + floor."""
    from experiments.gpusuite.report import step_split

    fp16 = {"4096x4096": 0.02, "11008x4096": 0.05, "4096x11008": 0.05}  # ms
    floor = {"4096x4096": 10.0, "11008x4096": 20.0, "4096x11008": 20.0}  # us
    rows = [{"shape": s, "M": 1, "variant": "w4a16_g128", "fp16_ms": v} for s, v in fp16.items()]
    state = {"sections": {"kernels": {"rows": rows, "floor": [{"shape": s, "w4_us": v} for s, v in floor.items()]}}}
    got = step_split(state, 8.0, 32)
    lin = 32 * (4 * 0.02 + 2 * 0.05 + 0.05)  # 7.36 ms
    w4 = 32 * (4 * 10 + 2 * 20 + 20) / 1e3  # 3.2 ms
    assert got["fp16_linears_ms"] == pytest.approx(lin) and got["w4_floor_ms"] == pytest.approx(w4)
    assert got["bound"] == pytest.approx(8.0 / (8.0 - lin + w4))
    state["sections"]["kernels"]["floor"].pop()
    assert step_split(state, 8.0, 32) is None


def test_host_launch_diagnosis_runs_on_cpu(tmp_path):
    """experiments/diag_host_launch.py (run on a GPU machine) in its CPU form: probe rows, profile, cached-vs-JIT
    identity and the eager decode A/B written as JSON and markdown."""
    proc = subprocess.run([sys.executable, "experiments/diag_host_launch.py", "--calls", "5", "--decode", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads((tmp_path / "host_launch_cpu.json").read_text())
    assert d["commit"] and all(r["identical"] for r in d["cached_vs_jit"])
    assert {r["variant"] for r in d["eager_decode"]} == {"fp16", "w4_g128", "w8a8"}
    assert "| w8a8 | 1 | jit |" in (tmp_path / "host_launch_cpu.md").read_text()


def test_tuned_tiles_record_each_tuners_pick_and_render(monkeypatch):
    """The kernel section lists the tile each tuner chose per layer key (what a GPU run's numbers came from), JSON-
    serializable, and the report shows them."""
    import triton

    from experiments.gpusuite.kernels import tuned_tiles
    from experiments.gpusuite.report import markdown
    from qresearch.kernels import triton_gemv, triton_small, triton_w8a8, triton_wq

    monkeypatch.setattr(triton_gemv, "_BEST", {(4096, 11008, 128, 4, False, torch.float16):
                                               ({"BLOCK_N": 64, "BLOCK_K_CODES": 128, "SPLIT_K": 8}, 4)})
    monkeypatch.setattr(triton_small, "TUNED", {("dot", 4096, 11008): {"best": (64, 8, 4, 2, 2), "ms": {}}})
    monkeypatch.setattr(triton_wq, "_BEST", {("prefill", 64, 4096): triton.Config({"BLOCK_M": 64}, num_warps=4,
                                                                                    num_stages=4)})
    monkeypatch.setattr(triton_w8a8, "_BEST", {})
    tiles = tuned_tiles()
    assert [t["kernel"] for t in tiles] == ["triton_gemv", "triton_small", "triton_wq"]
    assert tiles[0]["tile"]["SPLIT_K"] == 8 and tiles[2]["tile"] == {"BLOCK_M": 64, "num_warps": 4, "num_stages": 4}
    json.dumps(tiles)
    state = {"meta": {"quick": True, "gpu": False, "command": "x", "budget_s": 1, "used_s": 1, "finished": True},
             "sections": {"kernels": {"status": "done", "rows": [], "tuned": tiles}}}
    assert "Tiles the tuned kernels chose" in markdown(state) and "'SPLIT_K': 8" in markdown(state)


def test_e2e_prefill_cell_lists_repeats_only_where_they_spread():
    """A slow first repeat (warm-up left in the timing) must be visible in the report, steady repeats stay terse."""
    from experiments.gpusuite.report import _e2e_row

    row = {"model": "m", "variant": "w4_g128", "layers": 2, "hidden": 64, "dtype": "float16", "kernels": {"k": 14},
           "prefill": {"128": 69.0, "2048": 69.9}, "prefill_all_ms": {"128": [140.2, 69.0, 68.7],
                                                                      "2048": [70.1, 69.9, 69.5]},
           "decode": {"1": 25.8}, "decode_ms_per_step": {"1": 38.7}, "step_floor_ms": 1.3, "weight_bytes": 2**30}
    cell = _e2e_row(row, None)[4]
    assert cell == "128: 69.0 (140.2, 69.0, 68.7) / 2048: 69.9"
    del row["prefill_all_ms"]  # rows of runs before the repeats were recorded
    assert _e2e_row(row, None)[4] == "128: 69.0 / 2048: 69.9"


def test_peer_rows_check_torch_int4_against_float64(monkeypatch):
    """The peer rows (torch's int4 GEMM; the CPU op stands in here) are timed only when the op's output matches
    float64 on the same codes and qparams; a wrong output (e.g. the other nibble order) is a FAIL row, untimed."""
    from experiments.gpusuite import peer
    from experiments.gpusuite.report import _peer

    rows = peer.peer_rows("48x256", torch.device("cpu"), None, 1, 0, False)
    assert [(r["M"], r["status"]) for r in rows] == [(1, "PASS"), (16, "PASS")]
    assert all(r["rel_err"] < peer.TOL and r["q_ms"] > 0 for r in rows)
    monkeypatch.setattr(peer, "int4_mm", lambda x, p, sz: torch.ones(x.shape[0], 48, dtype=x.dtype))
    bad = peer.peer_rows("48x256", torch.device("cpu"), None, 1, 0, False, ms=(1,))
    assert bad[0]["status"] == "FAIL" and "q_ms" not in bad[0] and list(bad[0]["rel_err_by_order"].values())[0] > 0.5
    table = "\n".join(_peer({"peer": rows + bad, "peer_errors": ["64x384: RuntimeError: x"]}))
    assert "| 48x256 | 1 | aten._weight_int4pack_mm_for_cpu (stand-in) |" in table and "| FAIL |" in table
    assert "- peer error: 64x384: RuntimeError: x" in table
