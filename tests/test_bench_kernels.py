"""The kernel benchmark script runs end to end (CPU: reference path, labelled as such)."""
import importlib.util

from tests._qhelpers import REPO


def test_bench_script_writes_labelled_table(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "experiments" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--device", "cpu", "--shapes", "48x256", "--m", "1", "3", "--repeats", "1", "--warmup", "1",
                      "--copy-mib", "8", "--out", str(tmp_path / "k.md")])
    text = out.read_text()
    assert "NOT measured" in text and "CPU" in text.splitlines()[0]
    rows = [line for line in text.splitlines() if line.startswith("| 48x256")]
    assert len(rows) == 2 * 3 and "torch_ref_w4a16" in text and "torch_int_mm_w8a8" in text  # CPU int8: torch._int_mm
    assert abs(bench.memory_bound_limit(4, 128, 4096, True) - 16 / (4 + 16 / 128)) < 1e-12  # 3.88x
