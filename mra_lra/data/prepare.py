"""Prepare LRA data once: find (or generate) the files, verify them, cache them as arrays.

    python -m mra_lra.data.prepare task=<name> [source=<path>] [training overrides...]
    python -m mra_lra.data.prepare -m [task=<name>,<name>...] [source=<path>]   # every task
    make data TASK=<name> [SOURCE=<path>]

A Hydra app on the training config, so that any training override (`data.data_dir=...`) gives
the cache that training with it reads. `source` is a folder or archive holding the task's files
(default: under data.data_dir). With -m, a task that cannot be prepared is reported, and the
next one goes on.
"""

from __future__ import annotations

from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from mra_lra.errors import EXIT_USER_ERROR, print_error, reported, run_app


class Unprepared(Callback):
    """prepare.yaml's Hydra callback: a -m sweep in which some task could not be prepared (each
    reported as it failed) ends with their names and exit status 2."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.COMPLETED and job_return.return_value:
            self.failed.append(job_return.return_value)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.failed:
            print_error(f"not prepared: {', '.join(self.failed)} (see above)")
            raise SystemExit(EXIT_USER_ERROR)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> str | None:
    """Build the task's cache; in a -m sweep a user's mistake returns the task name (Unprepared)."""
    try:
        with reported():
            entry = hydra.utils.instantiate(cfg.data).ensure_cache()
    except SystemExit:
        if HydraConfig.get().mode == RunMode.RUN:
            raise
        return cfg.task.name
    print(f"{cfg.task.name}: ready, cached arrays in {entry}", flush=True)
    return None


def cli() -> None:
    run_app(main)


if __name__ == "__main__":
    cli()
