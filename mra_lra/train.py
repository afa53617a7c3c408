"""Compose -> instantiate -> fit -> test at the best and last checkpoints -> results.json.

`run(cfg)` is what the Hydra entry point (train.py at the repository root) calls; tests call it
with configs composed through Hydra's compose API.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import json
import logging
import netrc
import os
import platform
import time
import typing
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import hydra
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, SequentialSampler

from mra_lra.models.module import LRALitModule, peak_memory_mb, reset_peak_memory
from mra_lra.utils import atomic_open, atomic_write_json, atomic_write_text, flatten_config

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def _wandb_settings() -> dict[str, str]:
    """The [default] section of wandb's settings files: the global one (`wandb login --host`,
    `wandb enabled`) and the one in ./wandb (`wandb offline` typed in this directory)."""
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read([config_dir.expanduser() / "settings", Path("wandb") / "settings"])
    return dict(parser["default"]) if parser.has_section("default") else {}


def _wandb_logged_in(settings: dict[str, str]) -> bool:
    """Whether wandb would find credentials: the environment, its settings, or a netrc entry for
    its host (`wandb login` writes one to ~/.netrc, or to $NETRC)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if settings.get("api_key"):
        return True
    base_url = (
        os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or "https://api.wandb.ai"
    )
    host = urlsplit(base_url).netloc
    # wandb's own order: $NETRC alone when set, else ~/.netrc, else ~/_netrc.
    if os.environ.get("NETRC"):
        paths = [Path(os.environ["NETRC"]).expanduser()]
    else:
        paths = [Path.home() / ".netrc", Path.home() / "_netrc"]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return False
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False  # wandb itself ignores an unreadable netrc, with a warning


class EnvVarError(ValueError):
    """An environment variable set to a value its reader rejects; the message names the
    variable, its value and the values it takes (train.py prints it without a traceback)."""


def _wandb_modes() -> tuple[str, ...]:
    """The values wandb takes for its mode (WANDB_MODE), as its settings model declares them."""
    try:
        from wandb.sdk.wandb_settings import Settings

        modes = typing.get_args(Settings.model_fields["mode"].annotation)
    except (ImportError, AttributeError, KeyError):
        modes = ()
    return tuple(modes) or ("online", "offline", "disabled", "shared", "dryrun", "run")


def _wandb_mode_default() -> None:
    """wandb works without an account: offline unless the user logged in or chose a mode.

    A mode chosen by WANDB_MODE or by `wandb offline/online/disabled` is kept; otherwise, with no
    credentials, WANDB_MODE=offline, so that wandb.init neither prompts nor waits on the network.
    Offline runs land in <run dir>/wandb/offline-run-*; `wandb sync <that folder>` uploads one.
    A WANDB_MODE that wandb would reject (a typo: its pydantic error names neither the variable
    nor the fix) is an EnvVarError, raised before the run folder is touched.
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        modes = _wandb_modes()
        if mode not in modes:
            others = [m for m in modes if m not in ("online", "offline", "disabled")]
            raise EnvVarError(
                f"WANDB_MODE={mode!r} is not a wandb mode: set it to online, offline or disabled"
                f" (wandb also takes {', '.join(others)}), or unset it (then offline unless you"
                " are logged in to wandb)"
            )
        return
    settings = _wandb_settings()
    if settings.get("mode") or _wandb_logged_in(settings):
        return
    os.environ["WANDB_MODE"] = "offline"


# A run folder's wandb run id, so that a resumed run continues the same wandb run.
WANDB_ID_FILE = "wandb_run_id"


def _make_logger(logger_cfg: DictConfig, cfg: DictConfig, out_dir: Path) -> pl.loggers.Logger:
    """Instantiate one logger. A wandb run resumed into its own folder (ckpt_path set, and the
    folder holds the id its first start wrote) continues that wandb run, unless the logger's
    config names an id itself; rank 0 writes the id of each new run."""
    is_wandb = str(logger_cfg.get("_target_", "")).endswith("WandbLogger")
    id_file = out_dir / WANDB_ID_FILE
    kwargs = {}
    if is_wandb and cfg.get("ckpt_path") and not logger_cfg.get("id") and id_file.is_file():
        kwargs["id"] = id_file.read_text().strip()
        log.info("resuming wandb run %s (from %s)", kwargs["id"], id_file)
    logger = hydra.utils.instantiate(logger_cfg, **kwargs)
    if is_wandb and rank_zero_only.rank == 0:
        atomic_write_text(id_file, logger.experiment.id + "\n")
    return logger


def protocol_card(cfg: DictConfig) -> str:
    """The settings that decide what a number means, printed at start-up and kept in results."""
    attn = OmegaConf.to_container(cfg.attn, resolve=True)
    lines = [
        f"task={cfg.task.name} attn={attn.pop('name')} seed={cfg.seed}",
        f"attention options: {attn}",
        # Every data setting, fidelity switches included (text length, pixel_zero_is_pad, patch
        # order, generator sizes): they decide which variant of a task a number is on.
        "data: "
        + " ".join(
            f"{k}={v}"
            for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
            if k not in ("_target_", "num_workers", "pin_memory")
        ),
        f"model: d_model={cfg.model.d_model} layers={cfg.model.n_layers} heads={cfg.model.n_heads}"
        f" qkv_dim={cfg.model.get('qkv_dim') or cfg.model.d_model} d_ffn={cfg.model.d_ffn}"
        f" dropout={cfg.model.dropout} pooling={cfg.model.pooling}"
        f" positions={cfg.model.get('positions', 'learned')}"
        f" input_encoding={cfg.model.get('input_encoding', 'tokens')}"
        f" attention_float32={cfg.model.get('attention_float32', False)}",
        f"optimiser: lr={cfg.optimizer.lr} betas={list(cfg.optimizer.betas)}"
        f" schedule={cfg.scheduler._target_.rsplit('.', 1)[-1]}"
        f" warmup={cfg.scheduler.warmup_steps} steps={cfg.trainer.max_steps}"
        f" batch={cfg.data.batch_size}x{cfg.trainer.get('accumulate_grad_batches', 1)}"
        f" eval_every={cfg.trainer.val_check_interval} precision={cfg.trainer.precision}",
    ]
    return "\n".join(lines)


class RunFolderError(RuntimeError):
    """A start that would overwrite a finished run, or a ckpt_path that is no checkpoint; the
    message names the fix (train.py prints it without a traceback)."""


class RunTerminated(SystemExit):
    """SIGTERM (a preemption, `scancel`, `kill`) stopped the run before it finished: no
    results.json. Exits with 143 (128 + SIGTERM), not 0, so that a scheduler or script does not
    take the run for finished; a SystemExit, so a sweep stops too instead of starting the next
    trial. `message` says where the run stopped and how to resume it."""

    def __init__(self, message: str) -> None:
        super().__init__(128 + 15)
        self.message = message


def _terminated(
    trainer: pl.Trainer, cfg: DictConfig, out_dir: Path, unsaved: str = ""
) -> RunTerminated:
    """What a run stopped by SIGTERM leaves: where it stopped and the checkpoint to resume from
    (`unsaved`: why the state it stopped in is not in it, when it is not).

    Lightning stops its loops on SIGTERM with SIGTERMException, a SystemExit whose code is None,
    so the process would exit 0 as if the run had finished."""
    last = out_dir / "checkpoints" / "last.ckpt"
    stopped = trainer.global_step
    if last.is_file():
        step = _checkpoint_step(last)
        resume = f"resume with ckpt_path={last} (step {step}"
        if step < stopped:
            lost = stopped - step
            resume += f"; the {lost} steps after it are" if lost > 1 else "; the step after it is"
            resume += " trained again"
        resume += f"{unsaved})"
    else:
        before = " (SIGTERM came before its first step)" if stopped == 0 else ""
        resume = f"no checkpoint holds it yet{unsaved or before}"
    return RunTerminated(
        f"SIGTERM stopped the run at step {stopped} of trainer.max_steps="
        f"{cfg.trainer.max_steps}, before it finished, so {out_dir} has no results.json; {resume}"
    )


# What a run folder holds once a run has started training in it.
_RUN_OUTPUTS = ("results.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt")
# Sections whose change on resume makes the folder's config.yaml and results.json describe
# another model than the checkpoint's.
_RESUME_SECTIONS = ("task", "attn", "model")


def _check_run_folder(cfg: DictConfig, out_dir: Path) -> None:
    """Refuse to start afresh over a run (its checkpoints, config.yaml and results.json would be
    replaced) and a ckpt_path that is a folder or not a checkpoint file; warn when a resume
    changes the task, attention or model settings the folder's run was trained with."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        found = [name for name in _RUN_OUTPUTS if (out_dir / name).exists()]
        if found:
            raise RunFolderError(
                f"{out_dir} already holds a run ({', '.join(found)}); starting again there would "
                f"overwrite it. To resume it pass ckpt_path={out_dir / 'checkpoints' / 'last.ckpt'}"
                "; to start a new run pick another hydra.run.dir (hydra.sweep.dir with -m, "
                "REPRO_DIR for make reproduce), or delete that folder."
            )
        return
    path = Path(ckpt_path)
    if path.is_dir():
        raise RunFolderError(
            f"ckpt_path={path} is a folder; pass a checkpoint file, e.g. "
            f"ckpt_path={path / 'checkpoints' / 'last.ckpt'}"
        )
    if path.is_file() and not zipfile.is_zipfile(path):
        raise RunFolderError(
            f"ckpt_path={path} is not a checkpoint (torch.save writes a zip archive); pass a "
            "run's checkpoints/last.ckpt or checkpoints/best.ckpt"
        )
    old_config = out_dir / "config.yaml"
    if old_config.is_file():
        old, new = {}, {}
        resolved = OmegaConf.to_container(cfg, resolve=True)
        flatten_config({section: resolved.get(section) for section in _RESUME_SECTIONS}, "", new)
        flatten_config(yaml.safe_load(old_config.read_text()), "", old)
        changed = [
            key
            for key, value in new.items()
            if not key.endswith(".backend") and old.get(key, value) != value
        ]
        if changed:
            log.warning(
                "resuming into %s with other settings than its run was trained with (%s): "
                "config.yaml and results.json will describe the new ones",
                out_dir,
                ", ".join(changed),
            )


def _warn_if_resumed_elsewhere(ckpt_path: str | None, out_dir: Path) -> None:
    """A run resumed into a new folder starts that folder's best.ckpt and metrics afresh, while
    val/acc_best continues from the checkpoint: the two can then name different validations."""
    if not ckpt_path:
        return
    home = Path(ckpt_path).resolve().parent.parent  # <run folder>/checkpoints/<name>.ckpt
    if home != out_dir.resolve():
        log.warning(
            "resuming from %s into another folder (%s): its best.ckpt and metrics start here, "
            "while val/acc_best carries on from the checkpoint. To continue that run, pass "
            "hydra.run.dir=%s",
            ckpt_path,
            out_dir,
            home,
        )


class _SigtermCheckpoint(Callback):
    """Saves the state SIGTERM stopped trainer.fit in to checkpoints/last.ckpt, so that a resume
    (the ckpt_path RunTerminated names) loses no step: last.ckpt is otherwise written only at
    validations, hundreds of steps apart. Lightning stops fit with SIGTERMException after the
    training step it came in (and its validation, if due) or after a validation batch;
    `on_exception` sees it before the trainer is torn down.

    Stopped during a validation, the checkpoint says so (as Lightning's own checkpoints written
    during a validation step do), and the resumed run first runs that validation again from its
    first batch: its metrics are in no checkpoint, and a plain checkpoint of that step would
    make Lightning skip it as done. Nothing is saved when last.ckpt already holds the step (a
    validation has just written it), nor inside an accumulation window (its gradients are in no
    checkpoint; the previous last.ckpt is kept).

    Rank 0 writes alone, with no collective (the ranks hold the same state, and Lightning may
    stop them at different batches), to a temporary file renamed over last.ckpt: a SIGKILL at
    the end of the grace period leaves the previous last.ckpt whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unsaved = ""  # why last.ckpt does not hold the state the run stopped in

    def on_validation_start(self, trainer: pl.Trainer, *args: object) -> None:
        # A validation rerun that way leaves the per-epoch validation batch counts one batch
        # apart, as if every later checkpoint of the epoch were written during a validation
        # step too (a resume from one would validate twice): realign them.
        total = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total
        restarted = total.ready == total.started == total.processed + 1
        if trainer.state.fn == TrainerFn.FITTING and restarted:
            total.ready = total.started = total.processed

    def on_exception(
        self, trainer: pl.Trainer, pl_module: object, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self.save(trainer, in_validation=trainer.validating)

    def save(self, trainer: pl.Trainer, in_validation: bool = False) -> None:
        """Write the trainer's state to last.ckpt, unless it holds that step already (every rank
        may call this; rank 0 writes)."""
        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        try:
            if self.path.is_file() and _checkpoint_step(self.path) == trainer.global_step:
                return
            if trainer.fit_loop.epoch_loop._should_accumulate():
                self.unsaved = (
                    "; SIGTERM came inside an accumulation window, whose gradients no checkpoint"
                    " holds"
                )
                return
            checkpoint = trainer._checkpoint_connector.dump_checkpoint()
            if in_validation:
                progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
                _mark_validation_started(
                    checkpoint, progress.total.completed - progress.current.completed
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.path, binary=True) as f:
                torch.save(checkpoint, f)
        except Exception as err:  # the run must still stop with RunTerminated
            log.exception("could not save the state SIGTERM stopped the run in")
            self.unsaved = f"; saving the state it stopped in failed: {type(err).__name__}: {err}"
            return
        log.info("SIGTERM: saved step %d to %s", trainer.global_step, self.path)


def _mark_validation_started(checkpoint: dict, earlier: int) -> None:
    """Set the fit loop's validation progress in `checkpoint` to "a validation started, no batch
    done" (`earlier`: the batches of this epoch's validations before it): Lightning resumes
    from such a checkpoint by running that validation from its first batch."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["total"] = {
        "ready": earlier + 1,
        "started": earlier + 1,
        "processed": earlier,
        "completed": earlier,
    }
    progress["is_last_batch"] = False


@contextlib.contextmanager
def _stop_on_sigterm(
    trainer: pl.Trainer,
    cfg: DictConfig,
    out_dir: Path,
    saver: _SigtermCheckpoint | None = None,
) -> Iterator[None]:
    """Around trainer.fit or trainer.test (which install Lightning's SIGTERM handler): a SIGTERM
    raises RunTerminated, whether Lightning's loop stopped on it (SIGTERMException; `saver`, the
    fit's callback, has saved the state it stopped in) or the loop was at its end and finished
    (only the flag is left; the run must stop all the same, and `saver` saves its final state)."""
    try:
        yield
    except SIGTERMException:
        pass
    else:
        if not trainer.received_sigterm:
            return
        if saver is not None:
            saver.save(trainer)
    raise _terminated(trainer, cfg, out_dir, saver.unsaved if saver else "")


def _checkpoint_paths(trainer: pl.Trainer, out_dir: Path) -> tuple[str, str]:
    """Best (monitored) checkpoint path, and last.ckpt holding the final state.

    last.ckpt is written after each validation; when training ended between validations it is
    rewritten here (a checkpoint saved at a validation step resumes mid-run exactly, so an
    up-to-date one is left as it is)."""
    best = ""
    for cb in trainer.checkpoint_callbacks:
        if cb.monitor is not None and cb.best_model_path:
            best = cb.best_model_path
    last = out_dir / "checkpoints" / "last.ckpt"
    # Rank 0 decides for all: save_checkpoint waits at a barrier that every rank must reach.
    stale = trainer.strategy.broadcast(
        not last.is_file() or _checkpoint_step(last) != trainer.global_step
    )
    if stale:
        trainer.save_checkpoint(last)
    return best, str(last)


def _checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def _unpadded_eval_shards(datamodule: pl.LightningDataModule, trainer: pl.Trainer) -> None:
    """Under DDP, give each rank every world_size-th val/test example, with no padding.

    Lightning's DistributedSampler pads a split to a multiple of the world size by repeating its
    first examples, which would count them twice in val/acc and test/acc. Unpadded shards may
    differ by one batch between ranks; that is safe in evaluation (no per-step collective; the
    torchmetrics states are summed across ranks once, at the end)."""
    for hook in ("val_dataloader", "test_dataloader"):
        make_loader = getattr(datamodule, hook)

        @functools.wraps(make_loader)
        def sharded(make_loader=make_loader):
            loader = make_loader()
            plain = isinstance(loader, DataLoader) and isinstance(loader.sampler, SequentialSampler)
            if trainer.world_size == 1 or not plain:
                return loader
            sampler = UnrepeatedDistributedSampler(
                loader.dataset,
                num_replicas=trainer.world_size,
                rank=trainer.global_rank,
                shuffle=False,
            )
            return DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                sampler=sampler,
                collate_fn=loader.collate_fn,
                num_workers=loader.num_workers,
                pin_memory=loader.pin_memory,
                persistent_workers=loader.persistent_workers,
            )

        setattr(datamodule, hook, sharded)


def _val_check_in_batches(cfg: DictConfig) -> dict[str, int]:
    """`trainer.val_check_interval` counts optimizer steps, as max_steps and the recipes do;
    Lightning counts training batches, of which each step takes `accumulate_grad_batches`. Returns
    the Trainer argument that makes Lightning validate (and write last.ckpt) after the last batch
    of every val_check_interval-th step, never inside an accumulation window."""
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(
            f"trainer.accumulate_grad_batches={accumulate!r}: give a whole number of batches per "
            "optimizer step, >= 1"
        )
    interval = cfg.trainer.get("val_check_interval")
    if accumulate == 1 or not isinstance(interval, int) or isinstance(interval, bool):
        return {}
    return {"val_check_interval": interval * accumulate}


def attn_search_space(cfg: DictConfig, trial: optuna.trial.Trial) -> None:
    """Optuna sweeps: add `attn.<key>` to a trial's search for each key of the config's
    `attn_search_space` that the chosen attention has (block_per_row for the MRA family).

    Named by `hydra.sweeper.custom_search_space`; a plain `hydra.sweeper.params` entry would
    break the sweep of an attention without that key."""
    for key, choices in cfg.get("attn_search_space", {}).items():
        if key in cfg.attn:
            trial.suggest_categorical(f"attn.{key}", list(choices))


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, LRALitModule]:
    """The datamodule and the LightningModule (classifier, optimiser, schedule) of a config;
    training and `mra_lra.evaluate` build from the same function, so a checkpoint always fits."""
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)
    module = LRALitModule(
        net=hydra.utils.instantiate(cfg.model, _convert_="all"),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        num_classes=cfg.task.num_classes,
    )
    return datamodule, module


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; returns the results written to results.json.

    Under DDP every rank runs this function; rank 0 alone writes config.yaml and results.json
    (checkpoints and loggers are rank-0-only in Lightning already)."""
    start = time.perf_counter()
    reset_peak_memory()
    out_dir = Path(cfg.paths.output_dir)
    if "wandb" in cfg.logger:
        _wandb_mode_default()
    # The launch environment (torchrun, SLURM, Lightning's own re-launch) names the rank before
    # the trainer exists; ddp_spawn starts its ranks inside fit, so this process is rank 0.
    if rank_zero_only.rank == 0:
        _check_run_folder(cfg, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("protocol card\n%s", protocol_card(cfg))
        _warn_if_resumed_elsewhere(cfg.get("ckpt_path"), out_dir)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule, module = build(cfg)
    net = module.net
    loggers = [_make_logger(c, cfg, out_dir) for c in cfg.logger.values()]
    # Not in conf/callbacks: a run stopped by SIGTERM is always resumable from where it stopped.
    sigterm_checkpoint = _SigtermCheckpoint(out_dir / "checkpoints" / "last.ckpt")
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    callbacks.append(sigterm_checkpoint)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, **_val_check_in_batches(cfg)
    )
    _unpadded_eval_shards(datamodule, trainer)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    stop_on_sigterm = functools.partial(_stop_on_sigterm, trainer, cfg, out_dir)
    with stop_on_sigterm(sigterm_checkpoint):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    steps = trainer.global_step
    # Throughput of all ranks together: every rank trains one batch per step, in lockstep.
    tokens, seconds = (
        trainer.strategy.reduce(
            torch.tensor(float(value), device=trainer.strategy.root_device), reduce_op=op
        ).item()
        for value, op in ((module.train_tokens, "sum"), (module.train_seconds, "max"))
    )
    fit_tokens_per_second = tokens / max(seconds, 1e-9)
    # The running max is restored from a checkpoint but its update count is not, so a resumed
    # run that validates no more still has one: a finite max means some validation ran.
    best_state = module.val_acc_best.max_value
    val_acc_best = best_state.item() if torch.isfinite(best_state) else None

    best_path, last_path = _checkpoint_paths(trainer, out_dir)
    best_step = None
    if best_path:
        best_step = _checkpoint_step(Path(best_path))
    test_acc = test_acc_last = None
    if cfg.test:
        with stop_on_sigterm():
            tested = trainer.test(module, datamodule=datamodule, ckpt_path=last_path)
        test_acc_last = tested[0]["test/acc"]
        if best_path:
            with stop_on_sigterm():
                tested = trainer.test(module, datamodule=datamodule, ckpt_path=best_path)
            test_acc = tested[0]["test/acc"]
        else:
            log.warning(
                "there is no best checkpoint (no validation ran, or checkpoints were off, as "
                "under trainer.fast_dev_run); test_acc is null"
            )

    majority = getattr(datamodule, "majority_baseline", None)
    peak_mb, peak_kind = peak_memory_mb()
    peak_mb = trainer.strategy.reduce(
        torch.tensor(peak_mb, device=trainer.strategy.root_device), reduce_op="max"
    ).item()
    attn_options = OmegaConf.to_container(cfg.attn, resolve=True)
    results = {
        "task": cfg.task.name,
        "attn": attn_options.pop("name"),
        "attn_options": attn_options,
        # the experiment family that set the recipe (conf/lra_jax: lra_jax); null: the task's own
        "recipe": OmegaConf.select(cfg, "recipe.family", default=None),
        "seed": cfg.seed,
        "max_length": cfg.data.max_length,
        # the generator settings when no release was found and a generated set was used
        "data_generated": getattr(datamodule, "generated", None),
        "test_acc": test_acc,
        "test_acc_last": test_acc_last,
        "val_acc_best": val_acc_best,
        "majority_class_test_acc": majority() if majority and datamodule.datasets else None,
        "best_step": best_step,
        "steps": steps,
        "wall_seconds": time.perf_counter() - start,
        "train_tokens_per_second": fit_tokens_per_second,
        "peak_memory_mb": peak_mb,  # the largest over ranks
        "peak_memory_kind": peak_kind,
        "world_size": trainer.world_size,
        "params": sum(p.numel() for p in net.parameters()),
        # the device the run trained on (a CPU run on a GPU machine says cpu)
        "device": torch.cuda.get_device_name(trainer.strategy.root_device)
        if trainer.strategy.root_device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "precision": str(cfg.trainer.precision),
    }
    if not trainer.is_global_zero:
        return results
    atomic_write_json(out_dir / "results.json", results)
    metric = cfg.get("optimized_metric")
    if metric and metric.replace("/", "_") not in results:
        # train.py returns results[<metric, / read as _>] to the sweeper; a misspelt name would
        # fail every trial of a sweep with nothing but "Got 'None'".
        numeric = sorted(k for k, v in results.items() if isinstance(v, float))
        raise ValueError(
            f"optimized_metric={metric!r}: results.json has no {metric.replace('/', '_')!r}; "
            f"use one of {numeric} (val/acc_best is read as val_acc_best)"
        )
    for logger in loggers:
        logger.log_metrics(
            {f"final/{k}": v for k, v in results.items() if isinstance(v, int | float)}, step=steps
        )
        logger.save()
        if isinstance(logger, WandbLogger):
            # Close the wandb run: the next run in this process (a sweep trial) starts its own.
            logger.experiment.finish()
    log.info("results: %s", json.dumps({k: results[k] for k in ("test_acc", "val_acc_best")}))
    print(
        f"{results['task']} / {results['attn']}: test accuracy {test_acc} at the best validation "
        f"step {best_step} ({test_acc_last} at the last step {steps}); majority-class baseline "
        f"{results['majority_class_test_acc']}; results in {out_dir / 'results.json'}",
        flush=True,
    )
    return results
