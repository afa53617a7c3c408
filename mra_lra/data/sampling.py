"""The training order: a seeded shuffle per epoch, and a loader that resumes mid-epoch."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger(__name__)


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), set by Lightning before each epoch, so that a
    resumed run sees the order an uninterrupted one sees (torch's RandomSampler draws its seed
    from the global generator at a moment that differs). The seed defaults to the run's `seed`."""

    def __init__(self, num_samples: int, seed: int | None = None) -> None:
        self.num_samples = num_samples
        self.seed = torch.initial_seed() if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.num_samples, generator=g).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place in the epoch travels with Lightning's mid-epoch checkpoints, so
    that a resumed run does not train on the epoch's first batches twice: the state is the
    sampler's epoch and the batches served in it, which a resumed run draws and drops (this holds
    whatever wraps the sampler, and costs far less than training on them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_served = 0  # the sampler epoch of the batches counted in _served
        self._served = 0
        self._resume: dict[str, int] | None = None
        # The restored place until the first batch is drawn: a checkpoint written before then
        # (a resumed run's first validation) must hold it, not the empty count of a new epoch.
        self._pending: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        pending = self._resume or self._pending
        if pending is not None:
            return dict(pending)
        return {"epoch": self._epoch_served, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        self._pending = resume
        return self._batches(resume)

    def _batches(self, resume: dict[str, int] | None) -> Iterator[Any]:
        # A generator, so that torch's iterator (its workers draw indices at once) is made at the
        # first next(): Lightning asks a resumed run for it before setting the sampler's epoch.
        iterator = super().__iter__()
        # Without set_epoch (overfit_batches' sequential sampler) nothing is skipped.
        epoch = int(getattr(self.sampler, "epoch", 0))
        skip = 0
        if resume is not None and hasattr(self.sampler, "set_epoch"):
            if resume["epoch"] == epoch and resume["batches"] < len(self):
                skip = resume["batches"]
                log.info("resuming mid-epoch %d: skipping the %d batches already trained on",
                         epoch, skip)  # fmt: skip
                for _ in range(skip):
                    next(iterator)
            elif resume["epoch"] < epoch and resume["batches"] < len(self):
                # Lightning counts an epoch cut short by max_steps as done (a whole epoch under
                # limit_train_batches looks the same, hence "if").
                log.warning(
                    "the checkpoint's epoch %d ended after %d of its %d batches and Lightning "
                    "resumes at epoch %d: if the run was stopped there by max_steps, the rest "
                    "of epoch %d is not trained on, and this run differs from one run straight "
                    "to the new max_steps",
                    resume["epoch"], resume["batches"], len(self), epoch, resume["epoch"],
                )  # fmt: skip
        self._epoch_served, self._served = epoch, skip
        self._pending = None
        for batch in iterator:
            self._served += 1
            yield batch
