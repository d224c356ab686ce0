"""Entry point: `python run.py method=rtn model=stories260k bits=4` (Hydra; `-m` for sweeps)."""
import logging
import sys

import hydra
from omegaconf import DictConfig

import qresearch.config  # noqa: F401  (registers the config resolvers)
from qresearch.quant.spec import ConfigError

log = logging.getLogger("qresearch")


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qresearch.runner import run

    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if not _multirun():
            sys.exit(2)
    except Exception as e:  # in a sweep one crashed run (failure.json written) must not stop the others
        if not _multirun():
            raise
        log.error("run failed (%s: %s); failure.json is in its run dir; the sweep continues", type(e).__name__, e)
        print(f"error: run failed: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
