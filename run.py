"""Entry point: `python run.py method=rtn model=stories260k bits=4` (Hydra; `-m` for sweeps)."""
import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import qresearch.config  # noqa: F401  (registers the config resolvers)
from qresearch import sweep
from qresearch.quant.spec import ConfigError

log = logging.getLogger("qresearch")


def _job() -> tuple[bool, str, str]:
    """(multirun?, job label for the sweep summary, run dir)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    label = f"#{hc.job.num} {' '.join(hc.overrides.task)}" if multirun else "run"  # job.num: multirun only
    return multirun, label, hc.runtime.output_dir


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qresearch.runner import run

    sweep.install_sigterm()
    multirun, job, out_dir = _job()
    sweep.record("started", job, out_dir)
    try:
        metrics = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        started = (Path(out_dir) / "failure.json").is_file()
        sweep.record("failed", job, out_dir if started else "(refused before start)", f"error: {e}")
        if not multirun:
            sys.exit(2)
        return
    except Exception as e:  # in a sweep one crashed run (failure.json written) must not stop the others
        sweep.record("failed", job, out_dir, f"{type(e).__name__}: {e}; see failure.json")
        if not multirun:
            raise
        log.error("run failed (%s: %s); failure.json is in its run dir; the sweep continues", type(e).__name__, e)
        print(f"error: run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return
    except BaseException as e:  # SIGTERM / Ctrl-C: failure.json is written; the sweep stops here
        sweep.record("failed", job, out_dir, f"{type(e).__name__}: {e or 'interrupted'}; see failure.json")
        raise
    if (Path(out_dir) / "metrics.json").is_file():
        sweep.record("done", job, out_dir)
    else:
        earlier = sweep.earlier_complete(Path(cfg.paths.results), metrics["run"]["config_hash"])
        sweep.record("skipped", job, earlier, "complete already (skip_done=true)")


if __name__ == "__main__":
    try:
        main()
    except (sweep.Terminated, KeyboardInterrupt) as e:
        stopped = "; the sweep stopped there" if os.environ.get(sweep.ENV) else ""
        print(f"error: {e or 'interrupted (Ctrl-C)'}; the run in progress has a failure.json{stopped}", file=sys.stderr)
        sweep.print_summary()
        sys.exit(143 if isinstance(e, sweep.Terminated) else 130)
