"""Samplers shared by the datamodules."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch).

    Lightning calls `set_epoch` before each epoch, so a run resumed from a checkpoint at an epoch
    boundary sees exactly the order an uninterrupted run sees (torch's RandomSampler draws its
    seed from the global generator at a moment that differs between the two). The seed defaults
    to torch's initial seed, i.e. the run's `seed` after `seed_everything`.
    """

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
