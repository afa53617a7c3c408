"""Evaluate a trained run's checkpoint again: `python eval.py run_dir=<run folder>`.

The model and data are rebuilt from the run's config.yaml; `run.<key>=value` overrides it in
Hydra's syntax (`run.attn=softmax` swaps the attention), `-m` sweeps such overrides. Options in
mra_lra/conf/eval.yaml. One device: the run's GPU when there is one, else the CPU in float32.
"""

from __future__ import annotations

import csv
import logging
import pickle
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from mra_lra.dashboard import accuracy_by_length
from mra_lra.errors import ConfigError, RunFolderError, reported, run_app
from mra_lra.train import build
from mra_lra.utils import CONF_DIR, atomic_open, atomic_write_json, ensure_writable_dir

SPLITS = ("val", "test")
# The sections a run is built from, each a mapping in the config.yaml train.py writes.
RUN_SECTIONS = ("task", "data", "model", "optimizer", "trainer", "attn")
RUN_FOLDER = "run_dir must be a run folder train.py wrote (or a folder of them)"

log = logging.getLogger(__name__)

# eval.yaml's `run` section is open (Hydra takes any `run.<key>=value`); its overrides are applied
# to the run's own config by `run_config`, which refuses a key the run does not have.
_open = OmegaConf.create({"run": {}})
OmegaConf.set_struct(_open.run, False)
ConfigStore.instance().store(name="eval_run_section", node=_open)


class MissingKeyError(ConfigError):
    """An override of a key the run's config lacks (attn.block_per_row of a softmax run)."""


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint's contents, weights on the CPU; a file that is none (text, another
    zip, one cut short) is a RunFolderError naming it."""
    problem = None if zipfile.is_zipfile(path) else "not a zip archive, as torch.save writes"
    if problem is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
            problem = _one_line(err)
        else:
            if not isinstance(state, dict) or "state_dict" not in state:
                problem = "no state_dict"
    if problem is not None:
        raise RunFolderError(
            f"{path} is not a checkpoint train.py wrote ({problem}): pass a run's "
            "checkpoints/best.ckpt or last.ckpt"
        )
    return state


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (Hydra's search-path listing left out)."""
    return " ".join(str(err).split("Config search path")[0].split()) or type(err).__name__


def read_run_config(run_dir: Path) -> DictConfig:
    """<run_dir>/config.yaml, as train.py wrote it: resolved, with the sections a run is built
    from; anything else is a RunFolderError naming the file."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {RUN_FOLDER}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # YAML, encoding or OmegaConf errors: not a file train.py wrote
        raise RunFolderError(f"{path} is not YAML ({_one_line(err)}): {RUN_FOLDER}") from None
    missing = [s for s in RUN_SECTIONS if not isinstance(cfg, DictConfig) or s not in cfg]
    if missing:
        raise RunFolderError(f"{path} has no {', '.join(missing)} section: {RUN_FOLDER}")
    if "${" in OmegaConf.to_yaml(cfg):  # Hydra's own copy in .hydra/ is not resolved
        raise RunFolderError(f"{path} is not resolved (Hydra's own copy?): {RUN_FOLDER}")
    return cfg


def run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's config.yaml with Hydra `overrides` (`attn.block_per_row=16`, `attn=softmax`,
    `+trainer.benchmark=false`), composed by Hydra against the packaged configs: a key the run
    lacks is a MissingKeyError. A GPU run falls back to the CPU in float32 on a machine without
    one, unless the overrides say otherwise."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if saved.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        log.warning("the run trained on a GPU and there is none here: evaluating on the CPU")
        overrides = ["trainer.accelerator=cpu", "++trainer.precision=32-true", *overrides]
    # The run's attention becomes the attn group's option `as_trained`, so that attn=<name>
    # swaps it for conf/attn/<name>.yaml; model.attn (a resolved copy) follows it again.
    node = OmegaConf.to_container(saved)
    store = ConfigStore.instance()
    store.store(group="attn", name="as_trained", node=node.pop("attn"))
    node["model"]["attn"] = "${attn}"
    store.store(name="run_config", node={"defaults": [{"attn": "as_trained"}, "_self_"], **node})
    try:
        if GlobalHydra.instance().is_initialized():  # inside eval.py, whose configs these are
            return compose("run_config", overrides=list(overrides))
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose("run_config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        missing = isinstance(err.__cause__, ConfigAttributeError | ConfigKeyError)
        raise (MissingKeyError if missing else ConfigError)(
            f"{run_dir / 'config.yaml'}: {_one_line(err)}"
        ) from None


def checkpoint_path(run_dir: Path, ckpt: str) -> Path:
    """best/last name the run's own checkpoints; anything else is a path to a checkpoint file."""
    if ckpt not in ("best", "last"):
        path = Path(ckpt)
        if path.is_dir():
            raise ConfigError(f"ckpt={path} is a folder; pass a checkpoint file in it")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found (a path is taken from here)")
        return path
    path = run_dir / "checkpoints" / f"{ckpt}.ckpt"
    if path.is_file():
        return path
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    if not saved:
        raise FileNotFoundError(
            f"{run_dir} holds no checkpoints: its run stopped before its first validation (or "
            "is still running). Train it again with train.py, or pass ckpt=<checkpoint file>"
        )
    raise FileNotFoundError(f"checkpoint {path} not found; the run saved {', '.join(saved)}")


@dataclass
class LoadedRun:
    """A trained run rebuilt: its config (with overrides), data, and LightningModule with the
    checkpoint's weights (on the CPU, in training mode until you call .eval())."""

    cfg: DictConfig
    datamodule: pl.LightningDataModule
    module: pl.LightningModule
    checkpoint: Path
    step: int | None

    @property
    def net(self) -> torch.nn.Module:
        """The classifier: a batch dict ({"input_ids", "mask"}, and "_2" for two towers) to
        logits."""
        return self.module.net


def load_run(run_dir: str | Path, ckpt: str = "best", overrides: Sequence[str] = ()) -> LoadedRun:
    """A run's model and data from its config.yaml and checkpoint, for a notebook or a script:

        run = load_run("runs/2026-11-28/12-00-00_listops_mra")
        logits = run.net.eval()(batch)

    `ckpt` as in eval.yaml; `overrides` are Hydra overrides of the run's config, as eval.py's
    `run.<key>=value` without `run.`."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    path = checkpoint_path(run_dir, ckpt)
    state = read_checkpoint(path)
    datamodule, module = build(cfg)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise ConfigError(
            f"{path} does not fit the model built from {run_dir / 'config.yaml'} "
            f"{' '.join(overrides)}: {str(err).splitlines()[0]}"
        ) from None
    return LoadedRun(cfg, datamodule, module, path, state.get("global_step"))


def eval_trainer(cfg: DictConfig) -> pl.Trainer:
    """The run's trainer on one device, without loggers or checkpointing."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(
        devices=1, num_nodes=1, logger=False, enable_checkpointing=False, callbacks=[]
    )
    trainer_cfg.pop("strategy", None)
    return hydra.utils.instantiate(trainer_cfg)


def write_predictions(
    trainer: pl.Trainer, module: pl.LightningModule, loader, path: Path
) -> dict[str, np.ndarray]:
    """Every example's prediction, in the split's order, to `path` (CSV, atomically)."""
    parts = trainer.predict(module, dataloaders=loader)
    columns = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    columns["correct"] = (columns["prediction"] == columns["label"]).astype(np.int64)
    with atomic_open(path) as f:
        f.write(",".join(["index", *columns]) + "\n")
        for i, row in enumerate(zip(*columns.values(), strict=True)):
            f.write(",".join(map(str, (i, *row))) + "\n")
    return columns


def evaluate(
    run_dir: str | Path,
    ckpt: str = "best",
    splits: Sequence[str] = ("test",),
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    predictions: bool = False,
) -> dict:
    """Rebuild the run's model from its config (plus overrides), load `ckpt`, and measure
    accuracy and loss on `splits`; writes the results to `out` (default: <run_dir>/eval_<ckpt
    name>[__<override>...].json, so that other settings never overwrite them) and returns them.
    `predictions`: also every example's prediction to <out stem>_<split>_predictions.csv, and
    accuracy by input length."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    if not splits or any(s not in SPLITS for s in splits):
        raise ConfigError(f"split={','.join(splits)}: choose from {', '.join(SPLITS)}")
    run = load_run(run_dir, ckpt, overrides)
    cfg, datamodule, module = run.cfg, run.datamodule, run.module
    if out is None:
        names = [f"eval_{run.checkpoint.stem}", *(o.replace("/", "_") for o in overrides)]
        out = run_dir / f"{'__'.join(names)}.json"
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"out={out} is a folder; give a file name, e.g. out={out / 'eval.json'}")
    ensure_writable_dir(out.parent, "Pass out=<file> in a folder you may write to.")
    trainer = eval_trainer(cfg)
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoint": str(run.checkpoint),
        "checkpoint_step": run.step,
        "overrides": list(overrides),
        "task": cfg.task.name,
        "attn": cfg.attn.name,
    }
    for split in splits:
        run_split = trainer.validate if split == "val" else trainer.test
        metrics = run_split(module, datamodule=datamodule, verbose=False)[0]
        results[f"{split}_acc"] = metrics[f"{split}/acc"]
        results[f"{split}_loss"] = metrics[f"{split}/loss"]
        if predictions:
            loader = getattr(datamodule, f"{split}_dataloader")()
            # The same examples as the accuracy above (a run's limit_<split>_batches included).
            trainer.limit_predict_batches = getattr(trainer, f"limit_{split}_batches")
            csv_path = out.with_name(f"{out.stem}_{split}_predictions.csv")
            columns = write_predictions(trainer, module, loader, csv_path)
            results[f"{split}_predictions"] = str(csv_path)
            results[f"{split}_acc_by_length"] = accuracy_by_length(
                columns["length"], columns["correct"]
            )
    on_gpu = trainer.strategy.root_device.type == "cuda"
    results["device"] = torch.cuda.get_device_name() if on_gpu else "cpu"
    results["precision"] = str(trainer.precision)
    results["wall_seconds"] = time.perf_counter() - start
    atomic_write_json(out, results)
    accs = ", ".join(f"{s} accuracy {results[f'{s}_acc']:.4f}" for s in splits)
    print(
        f"{results['task']} / {results['attn']} at step {run.step} ({run.checkpoint.name}"
        f"{' ' + ' '.join(overrides) if overrides else ''}): {accs}; written to {out}",
        flush=True,
    )
    return results


def find_runs(root: Path) -> list[Path]:
    """`root` itself when it is a run folder (holds config.yaml), else every run folder below it
    (a multirun's numbered jobs, `make reproduce`'s folder), sorted."""
    if (root / "config.yaml").is_file():
        return [root]
    if root.is_file():
        raise ConfigError(f"run_dir={root} is a file; pass the run folder that holds it")
    runs = sorted(
        p.parent for p in root.rglob("config.yaml") if (p.parent / "checkpoints").is_dir()
    )
    if not runs:
        raise FileNotFoundError(
            f"{root / 'config.yaml'} not found, and no run below it: {RUN_FOLDER}"
        )
    return runs


def evaluate_runs(cfg: DictConfig, overrides: Sequence[str]) -> list[dict]:
    """Each run eval.yaml's `cfg` names (one, or every run below a folder) with `overrides`. In a
    folder, runs whose config lacks an overridden key (softmax's beside MRA's) are skipped."""
    if not isinstance(cfg.predictions, bool):
        raise ConfigError(f"predictions={cfg.predictions}: write true or false")
    splits = [cfg.split] if isinstance(cfg.split, str) else list(cfg.split)
    runs = find_runs(Path(cfg.run_dir))
    out = cfg.out
    if out is not None and len(runs) > 1:
        raise ConfigError(f"out= names one file, and {cfg.run_dir} holds {len(runs)} runs")
    if out is not None and HydraConfig.get().mode == RunMode.MULTIRUN:  # a file per job
        out = Path(out).with_name("__".join([Path(out).stem, *overrides]) + ".json")
    results = []
    for run in runs:
        try:
            results.append(evaluate(run, cfg.ckpt, splits, overrides, out, cfg.predictions))
        except MissingKeyError as err:
            if len(runs) == 1:
                raise
            print(f"skipped {run}: {err}", flush=True)
    if not results:
        raise ConfigError(f"no run below {cfg.run_dir} has every key {' '.join(overrides)} sets")
    return results


class ResultsTable(Callback):
    """eval.yaml's Hydra callback: a command that evaluates more than once (a folder of runs, a
    -m sweep) also writes all its evaluations as one CSV table, a row each, to table.csv in
    hydra.sweep.dir (<run_dir>/evals/<date>_<time>/)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.path: Path | None = None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.COMPLETED:
            self.rows += job_return.return_value
            self.path = Path(config.hydra.sweep.dir) / "table.csv"

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.write()

    def write(self) -> None:
        if len(self.rows) < 2:
            return
        metrics = [k for k in self.rows[0] if k.endswith(("_acc", "_loss"))]
        ensure_writable_dir(self.path.parent, "Set hydra.sweep.dir to a folder you may write to.")
        with atomic_open(self.path) as f:
            writer = csv.DictWriter(f, ["run_dir", "overrides", *metrics, "wall_seconds"])
            writer.writeheader()
            for row in self.rows:
                writer.writerow(
                    {k: row[k] for k in writer.fieldnames}
                    | {"overrides": " ".join(row["overrides"])}
                )
        print(f"{len(self.rows)} evaluations: {self.path}", flush=True)


def command_line_overrides() -> list[str]:
    """This job's `run.<key>=value` overrides (one value of each swept list in a -m sweep), as
    overrides of the run's config: `attn.block_per_row=16`, `+trainer.benchmark=false`."""
    found = (re.match(r"([+~]*)run\.(.+)", o) for o in HydraConfig.get().overrides.task)
    return [m[1] + m[2] for m in found if m]


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> list[dict]:
    """eval.py: evaluate the run (or the runs below a folder) that `cfg` names."""
    with reported(cpu_fix="run.trainer.accelerator=cpu"):
        if OmegaConf.is_missing(cfg, "run_dir"):
            raise ConfigError("say which run: run_dir=<run folder>")
        return evaluate_runs(cfg, command_line_overrides())


def cli() -> None:
    """eval.py and its console script: the Hydra app, with a user's mistake (also a command line
    that does not compose) as one `error:` line (errors.run_app)."""
    run_app(main)


if __name__ == "__main__":
    cli()
