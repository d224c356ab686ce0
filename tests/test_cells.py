"""experiments/cells.py: a table cell runs once into its own folder, even when an identical finished run sits
elsewhere in the results index (skip_done would otherwise leave the cell folder empty)."""
import sys

from experiments.cells import run_cell

from .conftest import DATA, require_shared


def test_identical_cells_each_get_their_own_run(tmp_path):
    require_shared()
    base = [sys.executable, "run.py", "model=stories260k", "method=rtn", "bits=4", "logger=none", "eval.max_chunks=2",
            f"data.root={DATA}", f"paths.results={tmp_path / 'results'}"]
    a, b = tmp_path / "a", tmp_path / "b"
    ma = run_cell(a, [*base, f"out_dir={a}"], "a")
    mb = run_cell(b, [*base, f"out_dir={b}"], "b")  # same config hash as a, already in the index
    assert ma is not None and mb is not None and (b / "metrics.json").is_file()
    assert mb["ppl"]["wikitext2"]["ppl"] == ma["ppl"]["wikitext2"]["ppl"]
    assert run_cell(tmp_path / "c", [*base, f"out_dir={tmp_path / 'c'}"], "c", collect_only=True) is None
