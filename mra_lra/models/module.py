"""LightningModule around an LRA classifier: loss, accuracy, optimiser and schedule, throughput."""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy


def reset_peak_memory() -> None:
    """Start peak-memory accounting afresh: several runs share a process in a Hydra multirun, and
    each run's results must hold its own peak, not the largest of the runs before it."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    except OSError:
        pass


def peak_memory_mb() -> tuple[float, str]:
    """Peak memory since `reset_peak_memory`: CUDA's max allocated bytes, else the CPU peak
    resident set (VmHWM on Linux; elsewhere the process-lifetime max RSS, which cannot be reset)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    try:
        hwm = re.search(r"^VmHWM:\s+(\d+)", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        hwm = None
    if hwm:
        return int(hwm.group(1)) / 1024, "cpu_peak_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


class LRALitModule(pl.LightningModule):
    """Trains `net` (an nn.Module mapping a batch dict to logits) with cross-entropy.

    Metric keys: train/loss, train/acc, train/lr, val/loss, val/acc, val/acc_best, test/loss,
    test/acc (test/loss_last, test/acc_last at the last checkpoint), train/tokens_per_second
    (padded positions per second of training-step time) and train/peak_memory_mb (see
    `peak_memory_mb`). Under DDP the last two are rank 0's own; the accuracies and losses are
    torchmetrics states summed over all ranks.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None,
        num_classes: int,
    ):
        super().__init__()
        # Checkpoints hold plain data only (they load with torch's weights_only=True).
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # survives checkpoint/resume
        self.run_seed = torch.initial_seed()  # the run's seed, after seed_everything
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._step_start = 0.0
        # train.py tests the last checkpoint as test/acc_last, the best as test/acc
        self.test_suffix = ""

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(batch)

    def _shared_step(self, batch):
        logits = self(batch)
        loss = self.criterion(logits.float(), batch["label"])
        return loss, logits.argmax(dim=-1)

    # --- training -------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Lightning steps on an epoch's last batch, so with a part window per epoch, validation
        # (train.py counts val_check_interval in batches) drifts into a window, and a checkpoint
        # written there cannot be resumed exactly.
        accumulate = self.trainer.accumulate_grad_batches
        batches = self.trainer.num_training_batches
        if accumulate > 1 and batches != float("inf") and batches % accumulate:
            whole = int(batches) - int(batches) % accumulate
            limit = (
                f"trainer.limit_train_batches={whole} (each epoch's shuffle then leaves out its "
                f"last {int(batches) - whole} batches), or "
                if whole
                else ""
            )
            raise ValueError(
                f"trainer.accumulate_grad_batches={accumulate}: an epoch holds {int(batches)} "
                f"training batches (per device), not a whole number of optimizer steps. Set "
                f"{limit}a data.batch_size that gives a multiple of {accumulate} batches"
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Seeded by (run seed, batch, rank), not the RNG's history, so a resumed run repeats an
        # uninterrupted one exactly. The batch counter, not global_step: the micro-batches of one
        # optimizer step must not share their dropout masks.
        batch_number = self.trainer.fit_loop.total_batch_idx
        step_seed = (self.run_seed * 1_000_003 + batch_number) * 4099 + self.global_rank
        torch.manual_seed(step_seed % 2**63)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx: int):
        loss, preds = self._shared_step(batch)
        self.train_loss(loss)
        self.train_acc(preds, batch["label"])
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_seconds += time.perf_counter() - self._step_start
        self.train_tokens += sum(
            batch[key].numel() for key in ("input_ids", "input_ids_2") if key in batch
        )
        if self.train_seconds > 0:
            self.log("train/tokens_per_second", self.train_tokens / self.train_seconds)
        self.log("train/peak_memory_mb", peak_memory_mb()[0])

    # --- evaluation -----------------------------------------------------------------------
    def _evaluate(self, batch, stage: str, loss_metric, acc_metric) -> torch.Tensor:
        loss, preds = self._shared_step(batch)
        # Weighted by examples, so a short last batch counts as much as its examples.
        loss_metric(loss, weight=batch["label"].numel())
        acc_metric(preds, batch["label"])
        suffix = self.test_suffix if stage == "test" else ""
        self.log(f"{stage}/loss{suffix}", loss_metric, on_step=False, on_epoch=True)
        self.log(
            f"{stage}/acc{suffix}",
            acc_metric,
            on_step=False,
            on_epoch=True,
            prog_bar=stage == "val",
        )
        return preds

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        # A validation with a non-finite loss measured no model: it is no candidate for best.
        if self.trainer.sanity_checking or not torch.isfinite(self.val_loss.compute()):
            return
        self.val_acc_best(self.val_acc.compute())
        # The same value on every rank (val_acc's states are synced); sync_dist says so to DDP.
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        return {"prediction": self._evaluate(batch, "test", self.test_loss, self.test_acc)}

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        """Per example: predicted class, label, and unmasked tokens per input (eval.py's
        predictions=true)."""
        out = {
            "prediction": self(batch).argmax(dim=-1),
            "label": batch["label"],
            "length": batch["mask"].sum(dim=-1).long(),
        }
        if "mask_2" in batch:
            out["length_2"] = batch["mask_2"].sum(dim=-1).long()
        return out

    # --- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # --- exact resume ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["throughput"] = {"tokens": self.train_tokens, "seconds": self.train_seconds}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        throughput = checkpoint.get("throughput", {})
        self.train_tokens = throughput.get("tokens", 0)
        self.train_seconds = throughput.get("seconds", 0.0)
