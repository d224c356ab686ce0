"""Entry point: `python run.py method=rtn model=stories260k bits=4` (Hydra; `-m` for sweeps)."""
import sys

import hydra
from omegaconf import DictConfig

import qresearch.config  # noqa: F401  (registers the config resolvers)
from qresearch.quant.spec import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qresearch.runner import run

    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
