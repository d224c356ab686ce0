"""Test helpers: compose configs with Hydra's API, run run.py in a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import qresearch.config  # noqa: F401 (resolvers)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def run_cli(*args, env=None, timeout=600):
    """python run.py <args> in the repo; returns CompletedProcess (text)."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout)


def run_dirs(results: Path) -> list[Path]:
    return sorted(p.parent for p in (results / "runs").rglob("metrics.json"))
