"""Evaluate a run's checkpoint again, here and now: `python eval.py run_dir=<run folder>`.

    python eval.py run_dir=runs/2026-11-27/21-03-12_listops_mra
    python eval.py run_dir=<run> ckpt=last split=val,test attn.backend=torch
    python eval.py run_dir=<run> attn.block_per_row=16 out=<run>/eval_bpr16.json

The model, data and attention are rebuilt from the run's own `config.yaml` (the resolved config
train.py saved), so nothing has to be typed twice; any other `key=value` changes one of its values
(`data.data_dir=...` after moving the data, `attn.backend=torch`, `data.batch_size=...`,
`trainer.precision=32-true`, or an MRA setting such as `attn.block_per_row` to test a trained model
at another budget). A key the run's config does not have is an error; `+key=value` adds one.
`attn=<name>` swaps in another attention's config (conf/attn/<name>.yaml), e.g. exact softmax for
a model trained with MRA, to see what the approximation costs. A comma list evaluates each value
(`attn.block_per_row=1,2,4,8,16`: one trained model at every budget; several lists: every
combination), each to its own JSON, with a table of all in `<out stem>_sweep.csv`. A run_dir
without config.yaml evaluates every run folder below it (a multirun, `make reproduce`'s folder),
with one table of all runs in `<run_dir>/eval_<ckpt>_sweep.csv`.

Options: `ckpt=best|last|<path>` (default best: checkpoints/best.ckpt, the best validation
accuracy), `split=test|val|val,test` (default test), `out=<file>` (default
`<run_dir>/eval_<ckpt>.json`, with `__<override>` for each override; written atomically),
`predictions=true`: also write every example's prediction to
`<out without .json>_<split>_predictions.csv` (index in the split, length = unmasked tokens,
label, prediction) and add accuracy by length (four equal-width bins from the split's shortest to
its longest input) to the results: does a model fail on the long inputs?

Evaluation runs on one device: the run's GPU when there is one, else the CPU (in float32, since a
GPU run's bf16-mixed autocast would run slowly there); `trainer.accelerator=...` and
`trainer.precision=...` choose otherwise.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mra_lra import errors
from mra_lra.data.sources import SourceError
from mra_lra.errors import CONFIG_ERRORS
from mra_lra.train import build
from mra_lra.utils import CONF_DIR, atomic_open, atomic_write_json, ensure_writable_dir

USAGE = (
    "usage: python eval.py run_dir=<run folder> [ckpt=best|last|<path>] [split=test|val|val,test]"
    " [out=<file>] [predictions=true] [key=value overrides of the run's config...]"
)
SPLITS = ("val", "test")
GPU_ACCELERATORS = ("gpu", "cuda")
ATTN_CONF = CONF_DIR / "attn"
# What a run's config.yaml holds (train.py writes it resolved): the sections the model, data and
# trainer are built from, each a mapping; those with a _target_ are instantiated.
RUN_SECTIONS = ("task", "data", "model", "optimizer", "trainer", "attn")
BUILT_SECTIONS = ("data", "model", "optimizer", "trainer")
RUN_FOLDER = (
    "run_dir must be a run folder written by train.py (runs/<date>/<time>_<task>_<attn>/, or one "
    "numbered folder of a multirun)"
)

log = logging.getLogger("mra_lra.evaluate")
_MISSING = object()


class EvalError(ValueError):
    """A bad argument, run folder or checkpoint; the message names it and the fix."""


class MissingKeyError(EvalError):
    """An override of a key the run's config.yaml lacks (attn.block_per_row of a softmax run)."""


# The user's to fix, printed alone: missing or unreadable files, and eval's own checks.
USER_ERRORS = (EvalError, FileNotFoundError, PermissionError, SourceError)


def user_error(err: BaseException) -> str | None:
    """The message for a user's mistake, as train.py prints it (None: a bug)."""
    return errors.user_error(err, USER_ERRORS, cpu_fix="trainer.accelerator=cpu")


def _one_line(err: BaseException) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        return f"{err.problem} at line {err.problem_mark.line + 1}"
    return " ".join(str(err).split("\n")[0].split()) or type(err).__name__


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(eval options, config overrides) from `key=value` arguments."""
    options: dict[str, str] = {"ckpt": "best", "split": "test"}
    overrides: list[str] = []
    for arg in argv:
        if arg in ("-h", "--help"):
            raise SystemExit(f"{USAGE}\n\n{__doc__}")
        key, sep, _ = arg.partition("=")
        if not sep or not key:
            raise EvalError(f"{arg!r} is not key=value. {USAGE}")
        if key in ("run_dir", "ckpt", "split", "out", "predictions"):
            options[key] = arg[len(key) + 1 :]
        else:
            overrides.append(arg)
    if "run_dir" not in options:
        raise EvalError(f"say which run: run_dir=<folder holding config.yaml>. {USAGE}")
    return options, overrides


def parse_flag(key: str, text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise EvalError(f"{key}={text}: write {key}=true or {key}=false")
    return text.lower() == "true"


def load_run_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The run's saved config with `overrides` applied; each key must already be there (or be
    written `+key=value`), so a misspelt key fails instead of being silently ignored."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {RUN_FOLDER}")
    cfg = read_run_config(path)
    # config.yaml is resolved: model.attn is a copy of attn. Link it again, so that attn.<key>=...
    # and attn=<name> reach the model.
    if "attn" in cfg and cfg.model.get("attn") == cfg.attn:
        cfg.model.attn = "${attn}"
    # attn=<name> first (a whole config group), then the single keys in the order given.
    for arg in sorted(overrides, key=lambda a: not a.startswith("attn=")):
        key, sep, text = arg.partition("=")
        if not sep or not key.lstrip("+"):
            raise EvalError(f"{arg!r} is not key=value. {USAGE}")
        if key == "attn":
            cfg.attn = attention_config(text)
            continue
        add = key.startswith("+")
        key = key.lstrip("+")
        if key.startswith("model.attn.") and OmegaConf.is_interpolation(cfg.model, "attn"):
            raise EvalError(
                f"{arg!r}: model.attn is the run's attn section; write "
                f"{arg.lstrip('+').replace('model.attn.', 'attn.', 1)}"
            )
        parts = key.split(".")
        for prefix in (".".join(parts[:i]) for i in range(1, len(parts))):
            node = OmegaConf.select(cfg, prefix, default=None)
            if node is not None and not isinstance(node, DictConfig):
                raise EvalError(f"{arg!r}: {prefix} is a value ({node!r}), not a config section")
        exists = OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING
        if not exists and not add:
            section = key.rpartition(".")[0]
            known = OmegaConf.select(cfg, section) if section else cfg
            choices = sorted(known.keys()) if isinstance(known, DictConfig) else []
            raise MissingKeyError(
                f"{key!r} is not in {path}"
                + (f"; {section or 'the top level'} has {choices}" if choices else "")
                + f". Write +{key}=... to add it."
            )
        if isinstance(OmegaConf.select(cfg, key, default=None), DictConfig):
            raise EvalError(
                f"{key!r} is a config section; set its keys one by one (e.g. {key}.<name>=...)"
            )
        # Values parse as on Hydra's command line (1e-4 is a float, null is None).
        try:
            value = OmegaConf.from_dotlist([f"value={text}"]).value
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise EvalError(f"{arg!r}: {text!r} is not a value ({_one_line(err)})") from None
        try:
            OmegaConf.update(cfg, key, value, force_add=add)
        except OmegaConfBaseException as err:
            raise EvalError(f"{arg!r}: cannot set {key} ({_one_line(err)})") from None
    return cfg


def read_run_config(path: Path) -> DictConfig:
    """The config.yaml train.py wrote: YAML, resolved, with the sections a run is built from.
    Anything else (a damaged file, another program's YAML, Hydra's unresolved copy in .hydra/)
    is an EvalError naming the file."""
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as err:
        problem = f"not YAML: {_one_line(err)}"
    else:
        problem = _config_problem(cfg)
    if problem is None:
        return cfg
    fix = RUN_FOLDER
    if path.parent.name == ".hydra" and (path.parent.parent / "config.yaml").is_file():
        run = path.parent.parent
        fix = f"that is Hydra's copy; the run's own is in the folder above: run_dir={run}"
    raise EvalError(f"{path} is not a run config written by train.py ({problem}): {fix}")


def _config_problem(cfg: DictConfig | ListConfig) -> str | None:
    """What keeps `cfg` (a loaded config.yaml) from being a run config; None when nothing."""
    if not isinstance(cfg, DictConfig):
        return "it holds a list, not the run's config sections"
    if not cfg:
        return "it is empty"
    missing = [s for s in RUN_SECTIONS if not isinstance(cfg.get(s), DictConfig)]
    if missing:
        return f"no {', '.join(missing)} section{'s' if len(missing) > 1 else ''}"
    untargeted = [s for s in BUILT_SECTIONS if "_target_" not in cfg[s]]
    if untargeted or "name" not in cfg.task or "num_classes" not in cfg.task:
        return f"{', '.join(untargeted) or 'task'} lacks the keys a run is built from"
    # train.py writes it resolved; Hydra's copy in .hydra/ has ${...} (which may even resolve,
    # in a process where Hydra ran).
    unresolved = _interpolations(cfg)
    if unresolved:
        return "it is not resolved: {} is {}".format(*unresolved[0])
    return None


def _interpolations(node: DictConfig | ListConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, text) of each ${...} and ??? (missing) value in `node`."""
    raw = OmegaConf.to_container(node, resolve=False)
    found = []
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            found.append((f"{prefix}{key}", raw[key]))
        elif isinstance(child := node[key], DictConfig | ListConfig):
            found += _interpolations(child, f"{prefix}{key}.")
    return found


def attention_config(name: str) -> DictConfig:
    """conf/attn/<name>.yaml; its interpolations (per-task MRA priors) resolve against the run's
    config when the model is built."""
    path = ATTN_CONF / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in ATTN_CONF.glob("*.yaml"))
        raise EvalError(f"attn={name}: no {path}; choose one of {known}")
    return OmegaConf.load(path)


def checkpoint_path(run_dir: Path, ckpt: str) -> Path:
    """best/last name the run's own checkpoints; anything else is a path to a checkpoint file. A
    missing or wrong one is an error that suggests only checkpoints that are there."""
    if ckpt in ("best", "last"):
        path = run_dir / "checkpoints" / f"{ckpt}.ckpt"
        if path.is_file():
            return path
        saved = saved_checkpoints(run_dir)
        if not saved:
            raise FileNotFoundError(
                f"{run_dir} holds no checkpoints ({run_dir / 'checkpoints'} has no .ckpt file): "
                "its run stopped before its first validation, which writes best.ckpt and "
                "last.ckpt (or it is still running). Train it again with train.py, or pass "
                "ckpt=<path> of a checkpoint file"
            )
        when = " (best.ckpt is written at the first validation)" if ckpt == "best" else ""
        raise FileNotFoundError(
            f"checkpoint {path} not found{when}; the run saved "
            f"{', '.join(p.name for p in saved)}: try {' or '.join(_ckpt_args(saved))}"
        )
    path = Path(ckpt)
    if path.is_dir():
        inside = sorted({*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")})
        example = f", e.g. {' or '.join(f'ckpt={p}' for p in inside[:2])}" if inside else ""
        raise EvalError(f"ckpt={path} is a folder; pass a checkpoint file{example}")
    if not path.is_file():
        hint = ""
        if not path.is_absolute() and (run_dir / path).is_file():
            hint = f" (a path is taken from the current folder: ckpt={run_dir / path})"
        raise FileNotFoundError(f"checkpoint {path} not found{hint}")
    return path


def saved_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints/*.ckpt files, best and last first."""
    order = {"best": 0, "last": 1}
    found = (run_dir / "checkpoints").glob("*.ckpt")
    return sorted((p for p in found if p.is_file()), key=lambda p: (order.get(p.stem, 2), p.name))


def _ckpt_args(paths: Sequence[Path]) -> list[str]:
    return [f"ckpt={p.stem}" if p.stem in ("best", "last") else f"ckpt={p}" for p in paths]


def load_checkpoint(path: Path, run_dir: Path) -> dict:
    """The checkpoint's contents (weights on the CPU); a file that is none is an EvalError."""
    if not os.access(path, os.R_OK):
        raise PermissionError(f"checkpoint {path} is not readable (its permissions)")
    problem = None
    if not zipfile.is_zipfile(path):
        problem = "not a zip archive, as torch.save writes: another file, or one cut short"
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
            problem = f"torch.load failed: {_one_line(err)}"
        else:
            if not isinstance(state, dict) or "state_dict" not in state:
                problem = "no state_dict: not a Lightning checkpoint"
    if problem is None:
        return state
    saved = [p for p in saved_checkpoints(run_dir) if p.resolve() != path.resolve()]
    fix = f"pass {' or '.join(_ckpt_args(saved))}" if saved else "pass a checkpoint train.py wrote"
    raise EvalError(f"{path} is not a checkpoint train.py wrote ({problem}); {fix}")


def eval_trainer(cfg: DictConfig, overrides: Sequence[str] = ()) -> pl.Trainer:
    """One device, no loggers, no checkpointing; a GPU run falls back to the CPU in float32 when
    this machine has no GPU (except for the trainer keys among `overrides`, which are kept)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    given = {o.partition("=")[0].lstrip("+~") for o in overrides}
    if trainer_cfg.get("accelerator") in GPU_ACCELERATORS and not torch.cuda.is_available():
        fallback = {
            key: value
            for key, value in (("accelerator", "cpu"), ("precision", "32-true"))
            if f"trainer.{key}" not in given
        }
        log.warning(
            "the run trained on a GPU (trainer.accelerator=%s) and there is none here: evaluating "
            "with %s (trainer.accelerator/trainer.precision choose otherwise)",
            trainer_cfg["accelerator"],
            " ".join(f"trainer.{k}={v}" for k, v in fallback.items()) or "the settings given",
        )
        trainer_cfg.update(fallback)
    trainer_cfg.update(
        devices=1, num_nodes=1, logger=False, enable_checkpointing=False, callbacks=[]
    )
    trainer_cfg.pop("strategy", None)
    return hydra.utils.instantiate(trainer_cfg)


def accuracy_by_length(lengths: np.ndarray, correct: np.ndarray, bins: int = 4) -> list[dict]:
    """Accuracy in `bins` equal-width length ranges from the shortest to the longest input (one
    range when all have the same length); empty ranges are left out."""
    low, high = int(lengths.min()), int(lengths.max())
    edges = np.unique(np.linspace(low, high + 1, bins + 1).astype(np.int64))
    rows = []
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        inside = (lengths >= start) & (lengths < stop)
        if inside.any():
            rows.append(
                {"min_length": int(start), "max_length": int(stop) - 1, "n": int(inside.sum()),
                 "acc": float(correct[inside].mean())}
            )  # fmt: skip
    return rows


def write_predictions(
    trainer: pl.Trainer, module: pl.LightningModule, loader, path: Path
) -> dict[str, np.ndarray]:
    """Every example's prediction, in the split's order, to `path` (CSV, atomically)."""
    parts = trainer.predict(module, dataloaders=loader)
    columns = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    columns["correct"] = (columns["prediction"] == columns["label"]).astype(np.int64)
    names = ["index", *columns]
    with atomic_open(path) as f:
        f.write(",".join(names) + "\n")
        for i, row in enumerate(zip(*columns.values(), strict=True)):
            f.write(",".join(map(str, (i, *row))) + "\n")
    return columns


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

    `ckpt` and `overrides` as on eval.py's command line."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, overrides)
    path = checkpoint_path(run_dir, ckpt)
    state = load_checkpoint(path, run_dir)
    datamodule, module = build(cfg)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        detail = "\n".join(str(err).splitlines()[:4])
        raise EvalError(
            f"{path} does not fit the model built from {run_dir / 'config.yaml'}"
            f"{' with ' + ' '.join(overrides) if overrides else ''}: an override changed the "
            f"model's shape, or the checkpoint is from another run.\n{detail}"
        ) from None
    return LoadedRun(cfg, datamodule, module, path, state.get("global_step"))


def default_stem(checkpoint: Path, overrides: Sequence[str]) -> str:
    """eval_<checkpoint name>, then each override: evaluations with other settings do not
    overwrite each other."""
    return "__".join([f"eval_{checkpoint.stem}", *(o.replace("/", "_") for o in overrides)])


def evaluate(
    run_dir: str | Path,
    ckpt: str = "best",
    splits: Sequence[str] = ("test",),
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    predictions: bool = False,
) -> dict:
    """Rebuild the run's model from its config (plus overrides), load `ckpt`, and measure
    accuracy and loss on `splits`; writes and returns the results."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise EvalError(f"split={','.join(splits)}: choose from {', '.join(SPLITS)}")
    run = load_run(run_dir, ckpt, overrides)
    cfg, datamodule, module, path = run.cfg, run.datamodule, run.module, run.checkpoint
    out = Path(out) if out else run_dir / f"{default_stem(path, overrides)}.json"
    check_out(out)
    trainer = eval_trainer(cfg, overrides)
    results: dict = {
        "run_dir": str(run_dir),
        "checkpoint": str(path),
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
    results["device"] = (
        torch.cuda.get_device_name() if trainer.strategy.root_device.type == "cuda" else "cpu"
    )
    results["precision"] = str(trainer.precision)
    results["wall_seconds"] = time.perf_counter() - start
    atomic_write_json(out, results)
    accs = ", ".join(f"{s} accuracy {results[f'{s}_acc']:.4f}" for s in splits)
    if predictions:
        accs += " (predictions in " + ", ".join(results[f"{s}_predictions"] for s in splits) + ")"
    print(
        f"{results['task']} / {results['attn']} at step {results['checkpoint_step']} "
        f"({path.name}): {accs}; written to {out}",
        flush=True,
    )
    return results


def check_out(out: Path) -> None:
    """Fail before evaluating, not when writing: `out` must be a file name in a folder we may
    write to (made when missing)."""
    if out.is_dir():
        raise EvalError(f"out={out} is a folder; give a file name, e.g. out={out / 'eval.json'}")
    ensure_writable_dir(out.parent, "Pass out=<file> in a folder you may write to.")


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """`key=a,b,c` (a comma list, not a `[...]` value) becomes one evaluation per value; several
    such keys, one per combination. Without a list: one evaluation with the overrides as given."""
    choices = []
    for arg in overrides:
        key, _, text = arg.partition("=")
        swept = "," in text and not text.lstrip().startswith(("[", "{"))
        choices.append([f"{key}={v}" for v in text.split(",")] if swept else [arg])
    return [list(combo) for combo in itertools.product(*choices)]


def find_runs(root: Path) -> list[Path]:
    """`root` itself when it is a run folder (holds config.yaml), else every run folder below it
    (a multirun's numbered jobs, `make reproduce`'s folder, a folder of runs), sorted."""
    if (root / "config.yaml").is_file():
        return [root]
    if root.is_file():
        run = next((p for p in root.parents[:2] if (p / "config.yaml").is_file()), None)
        if run is None:
            raise EvalError(f"run_dir={root} is a file; {RUN_FOLDER}")
        ckpt = ""
        if root.suffix == ".ckpt":
            own = root.parent == run / "checkpoints" and root.stem in ("best", "last")
            ckpt = f" ckpt={root.stem if own else root}"
        raise EvalError(f"run_dir={root} is a file; pass its run folder: run_dir={run}{ckpt}")
    runs = sorted(
        p.parent for p in root.rglob("config.yaml") if (p.parent / "checkpoints").is_dir()
    )
    if not runs:
        raise FileNotFoundError(
            f"{root / 'config.yaml'} not found, and no run folder (config.yaml and checkpoints/) "
            "below it: run_dir must be a run folder written by train.py "
            "(runs/<date>/<time>_<task>_<attn>/) or a folder of them (a multirun)"
        )
    return runs


def evaluate_many(
    runs: list[Path],
    combos: list[list[str]],
    ckpt: str,
    splits: Sequence[str],
    out: str | Path | None,
    predictions: bool,
) -> list[dict]:
    """One `evaluate` per run and combination, each to `<stem>__<swept key=value...>.json` (stem:
    `out` without .json for a single run, else each run's `eval_<ckpt>[__<fixed overrides>]`), and
    a table of all to `<stem>_sweep.csv` (for several runs: `out`'s stem, or `<their common
    folder>/eval_<ckpt>[__<fixed overrides>]`)."""
    swept = [i for i in range(len(combos[0])) if len({c[i] for c in combos}) > 1]
    # The overrides every combination shares name the files too, so that a sweep with other
    # fixed settings (attn.backend=torch, a data_dir) never overwrites this one.
    fixed = [o for i, o in enumerate(combos[0]) if i not in swept]
    name = default_stem(Path(ckpt), fixed)
    common = Path(os.path.commonpath(runs)) if len(runs) > 1 else runs[0]
    table_stem = Path(out).with_suffix("") if out else common / name
    rows = []
    skipped: dict[Path, str] = {}  # runs of a folder whose config lacks an overridden key
    for run, combo in itertools.product(runs, combos):
        if run in skipped:
            continue
        stem = table_stem if len(runs) == 1 else run / name
        label = "__".join(combo[i].replace("/", "_") for i in swept)
        try:
            result = evaluate(
                run, ckpt, splits, combo, stem.with_name(f"{stem.name}__{label}.json"), predictions
            )
        except MissingKeyError as err:
            if len(runs) == 1:
                raise
            # A folder of runs may mix attentions (make reproduce: softmax beside mra): the
            # overrides apply to the runs that have the key.
            skipped[run] = str(err).partition(". Write +")[0]
            print(f"skipped {run}: {skipped[run]}")
            continue
        row = {"run": str(run.relative_to(common))} if len(runs) > 1 else {}
        row.update({combo[i].partition("=")[0]: combo[i].partition("=")[2] for i in swept})
        for split in splits:
            row.update(
                {f"{split}_acc": result[f"{split}_acc"], f"{split}_loss": result[f"{split}_loss"]}
            )
        rows.append({**row, "wall_seconds": result["wall_seconds"]})
    if not rows:
        raise EvalError(
            f"no run below {common} has every key the overrides set: " + "; ".join(skipped.values())
        )
    table = table_stem.with_name(f"{table_stem.name}_sweep.csv")
    with atomic_open(table) as f:
        f.write(",".join(rows[0]) + "\n")
        f.writelines(",".join(str(v) for v in row.values()) + "\n" for row in rows)
    print(f"{len(rows)} evaluations: {table}")
    if skipped:
        print(f"{len(skipped)} run(s) skipped: their configs lack an overridden key (above)")
    for row in rows:
        print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()))  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        splits = [s for s in options["split"].split(",") if s]
        predictions = parse_flag("predictions", options.get("predictions", "false"))
        combos = expand_sweep(overrides)
        runs = find_runs(Path(options["run_dir"]))
        if len(combos) == 1 and len(runs) == 1:
            evaluate(runs[0], options["ckpt"], splits, overrides, options.get("out"), predictions)
        else:
            evaluate_many(runs, combos, options["ckpt"], splits, options.get("out"), predictions)
    except (*USER_ERRORS, *CONFIG_ERRORS, InstantiationException) as err:
        message = user_error(err)
        # HYDRA_FULL_ERROR=1 shows the traceback of a value error (eval's own checks name the
        # fix and have none worth showing).
        full = os.environ.get("HYDRA_FULL_ERROR") == "1" and not isinstance(err, USER_ERRORS)
        if message is None or full:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
