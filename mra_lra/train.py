"""Train one LRA task with one attention: `python -m mra_lra.train task=listops attn=mra` (also
`python train.py ...` and the `mra-lra-train` command).

compose -> instantiate -> fit -> test at the best and last checkpoints -> results.json. `run(cfg)`
is the whole run (tests call it with configs composed through Hydra's compose API); `main` is the
Hydra app, and `cli` the one place that turns a user's mistake into one `error:` line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import pytorch_lightning as pl
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, SequentialSampler

from mra_lra.callbacks import (
    CpuTimeEstimate,
    FiniteLoss,
    InterruptCheckpoint,
    RunProgressBar,
    checkpoint_step,
)
from mra_lra.dashboard import log_config, log_results
from mra_lra.errors import ConfigError, print_error, reported, run_app, user_message
from mra_lra.loggers import make_logger, quiet_console, wandb_mode_default
from mra_lra.models.module import LRALitModule, peak_memory_mb, reset_peak_memory
from mra_lra.models.schedule import resolve_warmup
from mra_lra.run_folder import (
    OVERRIDES_FILE,
    StartGuard,
    check_run_folder,
    locked,
    resume_arguments,
    warn_if_resumed_elsewhere,
)
from mra_lra.utils import atomic_write_json, atomic_write_text, torch_threads

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def _warmup(scheduler: DictConfig) -> str:
    steps, fraction = scheduler.get("warmup_steps"), scheduler.get("warmup_fraction")
    if steps is not None or fraction is None:
        return str(steps)
    return f"{resolve_warmup(scheduler.total_steps, None, fraction)} ({fraction} of the run)"


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
        f" warmup={_warmup(cfg.scheduler)} steps={cfg.trainer.max_steps}"
        f" batch={cfg.data.batch_size}x{cfg.trainer.get('accumulate_grad_batches', 1)}"
        f" eval_every={cfg.trainer.val_check_interval} precision={cfg.trainer.precision}",
    ]
    return "\n".join(lines)


def _print_config_tree(cfg: DictConfig) -> None:
    """The composed config, one branch per section (print_config=false turns it off)."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    container = OmegaConf.to_container(cfg, resolve=True)
    sections = {k: v for k, v in container.items() if isinstance(v, dict)}
    container = {"run": {k: v for k, v in container.items() if k not in sections}, **sections}
    tree = Tree("config", guide_style="dim")
    for key, value in container.items():
        text = OmegaConf.to_yaml(OmegaConf.create(value)).rstrip()
        tree.add(key).add(Syntax(text, "yaml", background_color="default"))
    rich_print(tree)


class RunTerminated(SystemExit):
    """A signal stopped the run before it finished (no results.json): exit 128 + the signal, not
    0, and a sweep stops too. `message` says where it stopped and how to resume it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message


def _terminated(trainer: pl.Trainer, cfg: DictConfig, saver: InterruptCheckpoint) -> RunTerminated:
    """Where a stopped run stopped and the checkpoint to resume from. (Lightning stops its loops
    with SIGTERMException, a SystemExit whose code is None: the process would exit 0.)"""
    last = saver.path
    stopped = trainer.global_step
    if last.is_file():
        step = checkpoint_step(last)
        resume = f"resume with ckpt_path={last} (step {step}"
        if step < stopped:
            lost = stopped - step
            resume += f"; the {lost} steps after it are" if lost > 1 else "; the step after it is"
            resume += " trained again"
        resume += f"{saver.unsaved})"
    else:
        before = f" ({saver.signal} came before its first step)" if stopped == 0 else ""
        resume = f"no checkpoint holds it yet{saver.unsaved or before}"
    return RunTerminated(
        f"{saver.signal} stopped the run at step {stopped} of trainer.max_steps="
        f"{cfg.trainer.max_steps}, before it finished, so {last.parent.parent} has no "
        f"results.json; {resume}",
        130 if saver.signal == "Ctrl-C" else 143,
    )


@contextlib.contextmanager
def _stop_on_signal(
    trainer: pl.Trainer, cfg: DictConfig, saver: InterruptCheckpoint, fitting: bool = True
) -> Iterator[None]:
    """Around trainer.fit or trainer.test: a SIGTERM or Ctrl-C raises RunTerminated, also when
    the loop was at its end and finished with only Lightning's flag set."""
    try:
        yield
    except SIGTERMException:
        pass
    else:
        if not trainer.received_sigterm:
            return
        if fitting:
            saver.save(trainer)
    raise _terminated(trainer, cfg, saver)


def _checkpoint_paths(trainer: pl.Trainer, out_dir: Path) -> tuple[str, str]:
    """The best (monitored) checkpoint, and last.ckpt rewritten with the final state when
    training ended between validations."""
    best = ""
    for cb in trainer.checkpoint_callbacks:
        if cb.monitor is not None and cb.best_model_path:
            best = cb.best_model_path
    last = out_dir / "checkpoints" / "last.ckpt"
    # Rank 0 decides for all: save_checkpoint waits at a barrier that every rank must reach.
    stale = trainer.strategy.broadcast(
        not last.is_file() or checkpoint_step(last) != trainer.global_step
    )
    if stale:
        trainer.save_checkpoint(last)
    return best, str(last)


def _unpadded_eval_shards(datamodule: pl.LightningDataModule, trainer: pl.Trainer) -> None:
    """Under DDP, each rank gets every world_size-th val/test example, unpadded: Lightning's
    sampler pads a split by repeating examples, which would count them twice. Shards may differ
    by one batch; evaluation has no per-step collective (metrics are summed once, at the end)."""
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
        raise ConfigError(
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


class _TrainingStarted(pl.Callback):
    """Writes the run's config and overrides and tells the loggers its hyperparameters once
    trainer.fit has set everything up and restored the checkpoint: a start that fails before
    then leaves the folder as it was (StartGuard)."""

    def __init__(self, cfg: DictConfig, out_dir: Path, guard: StartGuard) -> None:
        self.cfg, self.out_dir, self.guard = cfg, out_dir, guard

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            atomic_write_text(
                self.out_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True)
            )
            if HydraConfig.initialized():  # the overrides a resume by ckpt_path alone reuses
                (self.out_dir / OVERRIDES_FILE).parent.mkdir(exist_ok=True)
                overrides = list(HydraConfig.get().overrides.task)
                atomic_write_text(self.out_dir / OVERRIDES_FILE, yaml.safe_dump(overrides))
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        for logger in trainer.loggers:
            logger.log_hyperparams(resolved)
        log_config(trainer.loggers, self.cfg)
        self.guard.training = True


def run(cfg: DictConfig) -> dict:
    """Train and test one configuration; returns the results written to results.json.

    Under DDP every rank runs this function; rank 0 alone checks and locks the folder and writes
    config.yaml and results.json (checkpoints and loggers are rank-0-only in Lightning already).
    A start refused or failed before training leaves an existing folder as it was, and a new
    one with train.log alone, holding the error."""
    out_dir = Path(cfg.paths.output_dir)
    if "wandb" in cfg.logger:
        wandb_mode_default()
    if rank_zero_only.rank != 0:
        log.info("rank %d: training in %s beside rank 0", rank_zero_only.rank, out_dir)
        with quiet_console():
            return _run(cfg, out_dir, StartGuard(out_dir))
    guard = StartGuard(out_dir)
    try:
        check_run_folder(cfg.get("ckpt_path"), out_dir)
        with locked(out_dir), quiet_console():
            return _run(cfg, out_dir, guard)
    except Exception as err:
        if guard.training or guard.new_folder:  # an existing folder's log is left as it was
            log.error("error: %s", user_message(err) or err, exc_info=user_message(err) is None)
        guard.undo()
        raise


def _run(cfg: DictConfig, out_dir: Path, guard: StartGuard) -> dict:
    start = time.perf_counter()
    reset_peak_memory()
    if rank_zero_only.rank == 0:
        if cfg.get("print_config"):
            _print_config_tree(cfg)
        log.info("protocol card\n%s", protocol_card(cfg))
        warn_if_resumed_elsewhere(cfg.get("ckpt_path"), out_dir)
    pl.seed_everything(cfg.seed, workers=True)
    try:
        threads = torch_threads(cfg.get("torch_threads"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if threads:
        torch.set_num_threads(threads)
        log.info("torch threads: %d", threads)

    datamodule, module = build(cfg)
    loggers = [make_logger(c, cfg, out_dir) for c in cfg.logger.values()]
    # Not in conf/callbacks: every run keeps the step a signal stopped it at, and stops diverging.
    saver = InterruptCheckpoint(out_dir / "checkpoints" / "last.ckpt")
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c is not None]
    recipe = OmegaConf.select(cfg, "recipe.family", default=None)
    gpu_command = f"python train.py task={cfg.task.name} attn={cfg.attn.name} trainer=gpu"
    callbacks += [saver, FiniteLoss(), _TrainingStarted(cfg, out_dir, guard)]
    callbacks += [CpuTimeEstimate(gpu_command + (f" recipe={recipe}" if recipe else ""))]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RunProgressBar())
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, **_val_check_in_batches(cfg)
    )
    _unpadded_eval_shards(datamodule, trainer)

    with _stop_on_signal(trainer, cfg, saver):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    steps = trainer.global_step
    # Throughput of all ranks together: every rank trains one batch per step, in lockstep.
    tokens, seconds = (
        trainer.strategy.reduce(
            torch.tensor(float(value), device=trainer.strategy.root_device), reduce_op=op
        ).item()
        for value, op in ((module.train_tokens, "sum"), (module.train_seconds, "max"))
    )
    # The running max is restored from a checkpoint but its update count is not, so a resumed
    # run that validates no more still has one: a finite max means some validation ran.
    best_state = module.val_acc_best.max_value
    val_acc_best = best_state.item() if torch.isfinite(best_state) else None

    best_path, last_path = _checkpoint_paths(trainer, out_dir)
    best_step = checkpoint_step(Path(best_path)) if best_path else None
    test_acc = test_acc_last = None
    if cfg.test:

        def test(path: str, suffix: str) -> float:
            module.test_suffix = suffix
            found = trainer.test(module, datamodule=datamodule, ckpt_path=path)
            return found[0][f"test/acc{suffix}"]

        with _stop_on_signal(trainer, cfg, saver, fitting=False):
            if best_path and best_step == steps:  # one checkpoint: tested once, logged as both
                test_acc = test_acc_last = test(best_path, "")
                for logger in trainer.loggers:
                    logger.log_metrics({"test/acc_last": test_acc_last}, step=steps)
            else:
                test_acc_last = test(last_path, "_last")
                test_acc = test(best_path, "") if best_path else None
        if not best_path:
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
        # the experiment family that set the recipe (lra_jax); null: the task's own
        "recipe": recipe,
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
        "train_tokens_per_second": tokens / max(seconds, 1e-9),
        "peak_memory_mb": peak_mb,  # the largest over ranks
        "peak_memory_kind": peak_kind,
        "world_size": trainer.world_size,
        "params": sum(p.numel() for p in module.net.parameters()),
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
        # main returns results[<metric, / read as _>] to the sweeper; a misspelt name would
        # fail every trial of a sweep with nothing but "Got 'None'".
        numeric = sorted(k for k, v in results.items() if isinstance(v, float))
        raise ConfigError(
            f"optimized_metric={metric!r}: results.json has no {metric.replace('/', '_')!r}; "
            f"use one of {numeric} (val/acc_best is read as val_acc_best)"
        )
    log_results(trainer.loggers, cfg, results, out_dir)  # none under fast_dev_run
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            # Close the wandb run: the next run in this process (a sweep trial) starts its own.
            logger.experiment.finish()

    def acc(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    log.info("results: test_acc %s, val_acc_best %s", acc(test_acc), acc(val_acc_best))

    print(
        f"{results['task']} / {results['attn']}: test accuracy {acc(test_acc)} at the best "
        f"validation step {best_step} ({acc(test_acc_last)} at the last step {steps}); "
        f"majority-class baseline {acc(results['majority_class_test_acc'])}; results in "
        f"{out_dir / 'results.json'}",
        flush=True,
    )
    return results


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The Hydra app: one run, or one trial of a sweep (returns the metric the sweeper
    optimises; a trial that ends without it fails)."""
    try:
        # One run: a user's mistake ends it with one line and exit 2. A sweep trial's error goes
        # to the sweeper, which marks the trial failed (errors.FailedJobs reports it).
        with contextlib.nullcontext() if _in_sweep() else reported():
            results = run(cfg)
    except RunTerminated as stop:
        if rank_zero_only.rank == 0:
            print_error(stop.message)
        raise
    metric = cfg.get("optimized_metric")
    value = results.get(metric.replace("/", "_")) if metric else None
    if metric and value is None and _in_sweep():
        why = ""
        if results.get("val_acc_best") is None:
            why = f": no validation ran ({results.get('steps')} steps)"
        elif metric.startswith("test") and not cfg.test:
            why = ": test=false"
        raise ConfigError(f"optimized_metric {metric} is null in this trial's results.json{why}")
    return None if value is None else float(value)


def cli() -> None:
    """`python -m mra_lra.train`, `train.py` and `mra-lra-train`: the Hydra app, a checkpoint
    alone resuming its run, and a user's mistake as one `error:` line (errors.run_app)."""
    sys.argv[1:] = resume_arguments(sys.argv[1:])
    run_app(main)


if __name__ == "__main__":
    cli()
