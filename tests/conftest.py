"""Shared test setup: locate ../shared, isolate caches and results in a temp dir per session."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QRESEARCH_SHARED", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token/baseline caches are shared across the session (speed) but never touch the user's home."""
    if "QRESEARCH_CACHE" not in os.environ:
        os.environ["QRESEARCH_CACHE"] = str(tmp_path_factory.mktemp("qcache"))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    yield


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    """A fresh results root for one test (runs write under <it>/runs)."""
    monkeypatch.setenv("QRESEARCH_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def require_shared():
    if not STORIES.is_dir():
        pytest.fail(f"shared assets not found at {SHARED}; set QRESEARCH_SHARED")
