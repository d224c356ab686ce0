"""The kernel benchmark script runs end to end (CPU: reference path, labelled as such)."""
import importlib.util

from tests._qhelpers import REPO, cpu_w8a8_kernel


def test_bench_script_writes_labelled_table(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "experiments" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--device", "cpu", "--shapes", "48x256", "--m", "1", "3", "--repeats", "1", "--warmup", "1",
                      "--copy-mib", "8", "--out", str(tmp_path / "k.md"), "--candidates", "32x256",
                      "--candidate-m", "2", "130", "--cold-mib", "1"])
    text = out.read_text()
    assert "NOT measured" in text and "CPU" in text.splitlines()[0]
    rows = [line for line in text.splitlines() if line.startswith("| 48x256")]
    assert len(rows) == 2 * 3 and "c_lowbit_w4a16" in text and f"{cpu_w8a8_kernel()}_w8a8" in text
    cand = [line for line in text.splitlines() if line.startswith("| w")]
    kernels = {line.split("|")[4].strip(" *") for line in cand}
    assert kernels == {"aten_int4", "aten_int8", "c_lowbit", "panels"} and len(cand) > len(bench.CPU_VARIANTS) * 4
    picks = [line.split("|")[2:5] for line in cand if "<- dispatch" in line]
    assert len(picks) == len(bench.CPU_VARIANTS) * 2 * 2  # one per (variant, M, activation dtype)
    assert all((k.strip(" *") == "panels") == (m.strip() == "130" and d.strip() == "bfloat16") for m, d, k in picks)
    cold = text[text.index("## Cold weights"):].splitlines()
    assert sum(line.startswith("| w") for line in cold) == len(bench.COLD_VARIANTS) * 2  # x 2 activation dtypes
    assert abs(bench.memory_bound_limit(4, 128, 4096, True) - 16 / (4 + 16 / 128)) < 1e-12  # 3.88x


def test_packed_memory_table_counts_what_kernels_hold(tmp_path):
    """stories260K: the C kernel's in-place rows hold less than the same layers with their codes copied; every
    weight-only row holds its stored buffers plus something (fp32 scales at least); W8A8 rows through the VNNI
    kernel hold the stored buffers alone."""
    spec = importlib.util.spec_from_file_location("bench_packed_memory", REPO / "experiments" / "bench_packed_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.main(["--model", "stories260k", "--out", str(tmp_path / "m.md")]).read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| w")]
    assert len(rows) == 8
    for r in rows:
        held = float(r[6].rstrip("x"))
        assert held == 1.0 if r[3].startswith("c_vnni_w8a8") else held > 1, r
    assert sum(r[3].startswith(f"{cpu_w8a8_kernel()}_w8a8") for r in rows) == 2
    for variant in ("w4_g128", "w8_perchannel"):
        fp32 = {r[2]: float(r[5]) for r in rows if r[0] == variant and r[1] == "float32"}
        assert fp32["dispatch"] < fp32["C kernel codes copied (in-place path off)"], fp32
