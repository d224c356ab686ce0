"""wandb logging that never sinks a run: if wandb cannot start, the run goes on and says so in its metrics."""
from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError
from .metrics import WandbRun

log = logging.getLogger(__name__)
MODES = ("online", "offline", "disabled")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class WandbLogger:
    """Thin wrapper: start / summary / table / finish. `status` ends up in the run's metrics."""

    def __init__(self, project: str, mode: str = "offline", entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, name: str | None = None, dir: str | None = None,
                 init_timeout: float = 60.0):
        if mode not in MODES:
            raise ConfigError(f"logger.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        self.kw = dict(project=project, entity=entity, group=group, tags=tags, name=name, dir=dir, mode=mode)
        self.init_timeout = init_timeout
        self.run = None
        self.status = "not started"

    def start(self, config: dict) -> None:
        try:
            import wandb

            self.run = wandb.init(config=flatten(config), settings=wandb.Settings(init_timeout=self.init_timeout,
                                                                                    console="off", silent=True),
                                  reinit="finish_previous", **self.kw)
            self.status = self.kw["mode"]
        except Exception as e:  # noqa: BLE001 - any wandb failure must not lose the run
            self.status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            log.warning("wandb could not start (%s); results are still written locally", self.status)

    def ref(self) -> WandbRun | None:
        """Project / group / id of the started run (what dashboards select runs by); None if it did not start."""
        if self.run is None or self.kw["mode"] == "disabled":
            return None
        return WandbRun(project=self.run.project, entity=self.kw["entity"], group=self.kw["group"], id=self.run.id,
                        name=self.run.name or "", mode=self.kw["mode"])

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(flatten(metrics))

    def table(self, key: str, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        data = [[r.get(c) if not isinstance(r.get(c), (list, dict)) else str(r.get(c)) for c in cols] for r in rows]
        self.run.log({key: wandb.Table(columns=cols, data=data)})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class NullLogger:
    """logger=none: the same interface, doing nothing."""

    status = "off"

    def start(self, config): ...
    def ref(self): return None
    def summary(self, metrics): ...
    def table(self, key, rows): ...
    def finish(self, exit_code=0): ...


def make_logger(lg: dict, name: str, tags: list[str]) -> "WandbLogger | NullLogger":
    """The run's logger from the logger config group (tags: the group's plus those the runner adds)."""
    if lg["name"] != "wandb":
        return NullLogger()
    return WandbLogger(project=lg["project"], mode=lg["mode"], entity=lg["entity"], group=lg["group"],
                       tags=list(lg["tags"]) + tags, name=name, dir=lg["dir"], init_timeout=lg["init_timeout"])
