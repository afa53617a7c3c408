"""Prepare LRA data once: find (or generate) the files, verify them, cache them as arrays.

    python -m mra_lra.data.prepare task=<name>|all [source=<path>] [config overrides...]
    make data TASK=<name> [SOURCE=<path>]

`task` is a name under conf/task/ (listops, text, retrieval, image, pathfinder, pathx) or `all`.
`source` points at a folder or archive holding the task's files (the `lra_release.gz` tar, an
extracted `lra_release`, `aclImdb` or its tarball, `cifar-10-python.tar.gz` or its folder); without
it the files are looked for under `data.data_dir`. Any other argument is a Hydra override of the
training config (e.g. `data.data_dir=/scratch/lra data.text_length=1000`), so the cache built here
is exactly the one `python train.py` with the same overrides reads: training calls the same
`ensure_cache()` when its cache is missing.

Every step writes atomically: an interrupted run leaves no half-written cache entry, and a rerun
goes on from what is complete (generated Pathfinder shards, finished cache entries).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from mra_lra.utils import CONF_DIR

USAGE = "usage: python -m mra_lra.data.prepare task=<name>|all [source=<path>] [overrides...]"

log = logging.getLogger("mra_lra.data.prepare")


def task_names() -> list[str]:
    """The tasks with a config under conf/task/."""
    return sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """conf/train.yaml with Hydra `overrides`, composed outside a Hydra app (as `python train.py
    <overrides>` would compose it, minus Hydra's own runtime fields)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def prepare_task(task: str, source: str | None, overrides: Sequence[str]) -> Path:
    """Compose the training config for `task`, build its datamodule and its cache; returns the
    cache entry's folder."""
    extra = [f"data.source={source}"] if source else []
    cfg = compose_train([f"task={task}", *overrides, *extra])
    datamodule = hydra.utils.instantiate(cfg.data)
    return datamodule.ensure_cache()


def parse_args(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(tasks, source, other overrides) from `key=value` arguments."""
    tasks, source, overrides = None, None, []
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SystemExit(f"{USAGE}\n\n{__doc__}")
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"{arg!r} is not key=value. {USAGE}")
        if key == "task":
            known = task_names()
            tasks = known if value == "all" else [value]
            if value != "all" and value not in known:
                raise SystemExit(f"unknown task {value!r}; choose one of {known} or all")
        elif key in ("source", "data.source"):
            source = value
        else:
            overrides.append(arg)
    if tasks is None:
        raise SystemExit(f"say which task: task=<name> or task=all. {USAGE}")
    return tasks, source, overrides


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks, source, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    failures = {}
    for task in tasks:
        log.info("preparing %s", task)
        try:
            entry = prepare_task(task, source, overrides)
        except (FileNotFoundError, PermissionError, ValueError, RuntimeError) as err:
            if len(tasks) == 1:
                raise SystemExit(f"{task}: {err}") from None
            failures[task] = str(err)
            continue
        print(f"{task}: ready, cached arrays in {entry}", flush=True)
    for task, message in failures.items():
        print(f"{task}: NOT prepared: {message}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
