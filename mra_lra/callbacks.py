"""The Lightning callbacks every training run has, whatever conf/callbacks says: a stop by SIGTERM
or Ctrl-C keeps the step reached, a diverged run stops, a non-finite validation never becomes
the best checkpoint, the progress bar counts the run's steps, and a long CPU run says so. They use
Lightning's public hooks and loop state only."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tqdm import tqdm

from mra_lra.errors import UserError

log = logging.getLogger(__name__)


class DivergedError(UserError):
    """The training loss became NaN or infinite."""


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


class InterruptCheckpoint(Callback):
    """Saves the step a SIGTERM (a preemption, `scancel`) or Ctrl-C stopped trainer.fit at to
    last.ckpt, so that a resume loses no step. The first Ctrl-C goes to Lightning's SIGTERM
    handler (the loops stop after the batch they are in); a second one interrupts at once.
    Stopped in a validation, the checkpoint says so and the resumed run reruns it (its metrics
    are in no checkpoint). Inside an accumulation window nothing is saved (its gradients would be
    lost); the previous last.ckpt stays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.signal = "SIGTERM"  # what stopped the run, for the message
        self.unsaved = ""  # why last.ckpt does not hold the state the run stopped in
        self._validation_batches_before: int | None = None
        self._previous_sigint = None

    # --- Ctrl-C as a graceful stop ----------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def stop_after_this_batch(signum: int, frame: object) -> None:
            if self.signal == "Ctrl-C":  # the second one
                raise KeyboardInterrupt
            self.signal = "Ctrl-C"
            log.warning("Ctrl-C: stopping after this batch (press it again to stop at once)")
            signal.raise_signal(signal.SIGTERM)  # Lightning's handler: stop as for a preemption

        try:
            self._previous_sigint = signal.signal(signal.SIGINT, stop_after_this_batch)
        except ValueError:  # not the main thread: Ctrl-C keeps Python's default
            self._previous_sigint = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    # --- saving -----------------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A validation rerun that way leaves the per-epoch validation batch counts one batch
        # apart, as if every later checkpoint of the epoch were written during a validation
        # step too (a resume from one would validate twice): realign them.
        total = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total
        restarted = total.ready == total.started == total.processed + 1
        if trainer.state.fn == TrainerFn.FITTING and restarted:
            total.ready = total.started = total.processed

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self.save(trainer, in_validation=trainer.validating)

    def save(self, trainer: pl.Trainer, in_validation: bool = False) -> None:
        """Write the trainer's state to last.ckpt unless it holds that step already (every rank
        calls this; rank 0 decides and writes)."""
        if trainer.global_step == 0:
            return
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        reason = None
        if self.path.is_file() and checkpoint_step(self.path) == trainer.global_step:
            reason = "held"
        elif batches % trainer.accumulate_grad_batches:
            reason = "accumulating"
        reason = trainer.strategy.broadcast(reason)
        if reason == "accumulating":
            self.unsaved = (
                "; it came inside an accumulation window, whose gradients no checkpoint holds"
            )
        if reason:
            return
        if in_validation:
            progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
            self._validation_batches_before = progress.total.completed - progress.current.completed
        try:
            trainer.save_checkpoint(self.path)
        except Exception as err:  # the run must still stop with RunTerminated
            log.exception("could not save the state the run stopped in")
            self.unsaved = f"; saving the state it stopped in failed: {type(err).__name__}: {err}"
            return
        finally:
            self._validation_batches_before = None
        log.info("%s: saved step %d to %s", self.signal, trainer.global_step, self.path)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        """Saved during a validation: mark it "started, no batch done" (Lightning resumes from
        such a checkpoint by running that validation from its first batch)."""
        earlier = self._validation_batches_before
        if earlier is None:
            return
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
        progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
        progress["total"] = {
            "ready": earlier + 1,
            "started": earlier + 1,
            "processed": earlier,
            "completed": earlier,
        }
        progress["is_last_batch"] = False


class FiniteLoss(Callback):
    """Stops the run at the first step whose training loss is NaN or infinite (on any rank): a
    diverged run must not end as a success with a "best" checkpoint."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            raise DivergedError(
                f"the training loss is {float(loss.detach()) if bad else 'not finite'} at step "
                f"{trainer.global_step} (learning rate then {lr:.3g}): the run diverged; lower "
                "optimizer.lr, lengthen scheduler warm-up or use trainer.gradient_clip_val"
            )


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint of the best validation that skips validations whose loss is not finite:
    an accuracy measured with NaN logits is no model's accuracy."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not math.isfinite(float(loss)):
            log.warning(
                "val/loss is %s at step %d: not a candidate for best.ckpt",
                float(loss),
                trainer.global_step,
            )
            return
        super().on_validation_end(trainer, pl_module)


class RunProgressBar(TQDMProgressBar):
    """One bar over the whole run, optimizer step k of trainer.max_steps with its ETA, in place
    of an epoch's batches (a run with no max_steps keeps Lightning's epochs); no v_num."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        bar = self.train_progress_bar
        if trainer.max_steps < 0:
            return super().on_train_epoch_start(trainer, *args)
        if bar.total != trainer.max_steps:  # the first epoch of this process
            bar.reset(total=trainer.max_steps)
            bar.n = bar.initial = trainer.global_step  # a resumed run's ETA counts from here
            bar.set_description("step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps < 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, bar = trainer.global_step, self.train_progress_bar
        if (step % self.refresh_rate == 0 or step == trainer.max_steps) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class CpuTimeEstimate(Callback):
    """On a CPU, once `timed` steps after the first `skip` are timed: when the run's estimated
    time (remaining steps x measured step time) passes `limit` seconds, one warning says so with
    the command that runs the recipe on a GPU."""

    def __init__(self, gpu_command: str, skip: int = 2, timed: int = 10, limit: float = 3600):
        self.gpu_command, self.skip, self.timed, self.limit = gpu_command, skip, timed, limit
        self.first: int | None = None  # the step the timing starts at, and when it did
        self.started: float | None = None
        self.done = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.done or pl_module.device.type != "cpu" or not trainer.is_global_zero:
            return
        if self.first is None:
            self.first = step + self.skip
        if self.started is None:
            if step == self.first:
                self.started = time.perf_counter()
        elif step >= self.first + self.timed and trainer.max_steps > 0:
            self.done = True
            per_step = (time.perf_counter() - self.started) / (step - self.first)
            seconds = (trainer.max_steps - step) * per_step
            if seconds > self.limit:
                with tqdm.external_write_mode():  # on a line of its own, not after the bar
                    self._warn(trainer.max_steps - step, per_step, seconds)

    def _warn(self, steps: int, per_step: float, seconds: float) -> None:
        log.warning(
            "this run trains on the CPU: %d more steps at %.2f s each take about %.1f hours. "
            "The recipe is meant for a GPU: %s (a quick CPU check: experiment=demo, or "
            "trainer.max_steps=N)",
            steps,
            per_step,
            seconds / 3600,
            self.gpu_command,
        )
