"""The dirty flag of a run's provenance: tracked code changes count, tables being written under results/ do not."""
import subprocess

import torch

from qresearch.tracking import provenance as prov


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_results_tables_do_not_make_the_code_dirty(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.md").write_text("a\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(prov, "REPO", tmp_path)
    assert prov.provenance(torch.device("cpu"), 0)["git_dirty"] is False
    (tmp_path / "results" / "t.md").write_text("b\n")
    assert prov.provenance(torch.device("cpu"), 0)["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert prov.provenance(torch.device("cpu"), 0)["git_dirty"] is True
