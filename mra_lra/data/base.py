"""What every LRA datamodule shares: cached arrays -> batches, and the prepare/setup split.

A task says where its source files are (`ensure_sources`), which options decide its arrays
(`cache_options`) and how to build them (`build_arrays`); the arrays are cached under
`<data_dir>/cache/<task>/<key>/` (cache.py) and memory-mapped in `setup`. Per split `<s>`:

    <s>_input_ids   uint8/uint16 [N, L]   token ids, padded with 0
    <s>_length      int32 [N]             real length (mask = positions < length)
    <s>_label       uint8 [N]
    <s>_input_ids_2, <s>_length_2         the second document of pair tasks (Retrieval)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mra_lra.data.cache import ensure_array_cache, find_array_cache, load_arrays
from mra_lra.data.sampling import EpochShuffleSampler, ResumableDataLoader
from mra_lra.data.sources import SourceError
from mra_lra.utils import atomic_write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATA_DIR_FIX = "Set data.data_dir=<a writable folder> or the LRA_DATA_DIR environment variable."
MASK_MODES = ("length", "nonzero")
# Why an empty train or test split of a generated set is refused (its val split may be empty).
_EMPTY_SPLIT_EFFECT = {
    "train": "training would run no step",
    "test": "the test at the end of the run would fail",
}


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{name} must be an integer >= {minimum}, got {value!r}")


class CachedArrayDataset(Dataset):
    """One split of a cache entry as batches of `{"input_ids", "mask", "label"}` (plus
    `input_ids_2`, `mask_2` for pairs). `mask_mode="nonzero"` masks token id 0 instead of the
    positions past each length; `order` permutes the positions of every sequence. Arrays are
    memory-mapped on first use in each process, so that spawned workers do not get a copy."""

    def __init__(
        self,
        entry: str | os.PathLike,
        split: str,
        mask_mode: str = "length",
        order: np.ndarray | None = None,
    ) -> None:
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.entry = Path(entry)
        self.split = split
        self.mask_mode = mask_mode
        self.order = None if order is None else np.asarray(order, dtype=np.int64)
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            prefix = f"{self.split}_"
            self._arrays = {
                name.removeprefix(prefix): array
                for name, array in load_arrays(self.entry).items()
                if name.startswith(prefix)
            }
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def _tower(self, index: np.ndarray, suffix: str) -> dict[str, torch.Tensor]:
        ids = np.asarray(self.arrays[f"input_ids{suffix}"][index])
        if self.order is not None:
            ids = ids[:, self.order]
        if self.mask_mode == "nonzero":
            mask = ids != 0
        else:
            lengths = np.asarray(self.arrays[f"length{suffix}"][index])
            mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        return {
            f"input_ids{suffix}": torch.from_numpy(ids.astype(np.int64)),
            f"mask{suffix}": torch.from_numpy(mask.astype(np.float32)),
        }

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        # One fancy-index per batch, not item by item: it keeps up with a GPU on two CPU cores.
        index = np.asarray(indices, dtype=np.int64)
        batch = self._tower(index, "")
        if "input_ids_2" in self.arrays:
            batch.update(self._tower(index, "_2"))
        batch["label"] = torch.from_numpy(np.asarray(self.arrays["label"][index]).astype(np.int64))
        return batch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


class LRADataModule(pl.LightningDataModule):
    """Base datamodule: subclasses set `task`, `num_classes`, and implement `ensure_sources`,
    `cache_options` and `build_arrays` (and `dataset_options` when items need more than the
    defaults). `max_length` is the model's fixed sequence length, to which batches are padded."""

    task: str = ""
    num_classes: int = 0
    # A split served by another one's arrays (IMDB has no validation split: val reads test).
    split_aliases: Mapping[str, str] = {}
    # The settings of our reimplementation of an LRA generator when it made the data, else None:
    # results.json records it (`data_generated`), so that a number is never taken for LRA's.
    generated: dict[str, Any] | None = None

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        max_length: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        source: str | None = None,
    ) -> None:
        super().__init__()
        _check_count("batch_size", batch_size, 1)
        _check_count("max_length", max_length, 1)
        _check_count("num_workers", num_workers, 0)
        self.data_dir = Path(data_dir)
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise ValueError(f"data.data_dir={data_dir} is a file, not a folder. {DATA_DIR_FIX}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._given_source = source
        self.datasets: dict[str, CachedArrayDataset] = {}

    @cached_property
    def source(self) -> Path | None:
        """`data.source`, else the one recorded for this task in <data_dir>/sources.json (so that
        later runs read the same files without repeating it), else None."""
        if self._given_source is not None:
            return Path(self._given_source).expanduser() if self._given_source else None
        recorded = self._read_sources_record().get(self.task)
        if recorded is None:
            return None
        if not Path(recorded).exists():
            log.warning(
                "%s: the source recorded in %s, %s, is gone; looking under %s instead "
                "(pass data.source=<path> to record another)",
                self.task,
                self.sources_record,
                recorded,
                self.data_dir,
            )
            return None
        log.info("%s: reading %s (recorded in %s)", self.task, recorded, self.sources_record)
        return Path(recorded)

    @property
    def sources_record(self) -> Path:
        return self.data_dir / "sources.json"

    def _read_sources_record(self) -> dict[str, str]:
        if not self.sources_record.is_file():
            return {}
        try:
            record = json.loads(self.sources_record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
            problem = f"cannot be read ({err})"
        else:
            if isinstance(record, dict) and all(isinstance(v, str) for v in record.values()):
                return record
            problem = "is not a record of task -> source path"
        raise SourceError(
            f"{self.sources_record} {problem}. Fix it, or delete it and pass data.source=<path> "
            "again for the tasks that need one."
        )

    def _record_source(self) -> None:
        record = self._read_sources_record()
        if record.get(self.task) != str(self.source.resolve()):
            record[self.task] = str(self.source.resolve())
            atomic_write_json(self.sources_record, record)

    def ensure_sources(self) -> None:
        """Find (extract, or generate) the task's source files, or raise an error naming what to
        obtain and where to put it."""
        raise NotImplementedError

    def cache_options(self) -> dict[str, Any]:
        """Everything that changes the arrays (file fingerprints, lengths, vocab version...)."""
        raise NotImplementedError

    def build_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of every split (names as in the module docstring)."""
        raise NotImplementedError

    def dataset_options(self) -> dict[str, Any]:
        """Keyword arguments of `CachedArrayDataset` (mask mode, position order)."""
        return {}

    @property
    def cache_root(self) -> Path:
        return self.data_dir / "cache" / self.task

    def ensure_cache(self) -> Path:
        """Sources, then the cached arrays; returns the cache entry. What `prepare` calls."""
        self.ensure_sources()
        entry = ensure_array_cache(
            self.cache_root, self.cache_options(), self._checked_arrays, DATA_DIR_FIX
        )
        if self.source is not None:
            self._record_source()
        return entry

    def _refuse_empty_splits(self, sizes: Mapping[str, int], where: str | None, fix: str) -> None:
        """Refuse splits without examples before later runs trust them: any split of the user's
        files, the train or test split of a generated set (`where` None: the sizes asked)."""
        generated = where is None or self.generated is not None
        empty = [s for s, n in sizes.items() if n == 0 and not (generated and s == "val")]
        if not empty:
            return
        if not generated:
            raise SourceError(
                f"{self.task}: the {', '.join(empty)} split(s) of {where} hold no examples, so "
                f"these are not the task's files. {fix}"
            )
        splits = " or ".join(empty)
        effects = "; ".join(_EMPTY_SPLIT_EFFECT[split] for split in empty)
        options = " and ".join(f"data.num_{split}" for split in empty)
        if where is None:
            asked = ", ".join(f"data.num_{split}=0" for split in empty)
            raise ValueError(
                f"{self.task}: with {asked}, the generated set has no {splits} examples "
                f"({effects}). Set {options} to at least 1; only data.num_val may be 0."
            )
        raise ValueError(
            f"{self.task}: the generated set read from {where} has no {splits} examples "
            f"({effects}). Use a set generated with more ({options}); nothing was cached."
        )

    def _check_generated_sizes(self, sizes: Mapping[str, int]) -> None:
        """Refuse the split sizes `data.num_<split>` of a set before it is generated."""
        for split, n in sizes.items():
            _check_count(f"num_{split}", n, 0)
        self._refuse_empty_splits(sizes, None, "")

    def _checked_arrays(self) -> dict[str, np.ndarray]:
        arrays = self.build_arrays()
        sizes = {
            n.removesuffix("_label"): len(a) for n, a in arrays.items() if n.endswith("_label")
        }
        where = f"source {self.source}" if self.source is not None else f"{self.data_dir}"
        self._refuse_empty_splits(
            sizes,
            where,
            "Check data.source (or prepare's source=) and the files under data.data_dir; nothing "
            "was cached.",
        )
        return arrays

    def prepare_data(self) -> None:
        self.ensure_cache()

    def setup(self, stage: str | None = None) -> None:
        entry = find_array_cache(
            self.cache_root,
            self.cache_options(),
            f"Run `python -m mra_lra.data.prepare task={self.task}` (or call prepare_data(); "
            "the Trainer does).",
        )
        options = self.dataset_options()
        self.datasets = {
            split: CachedArrayDataset(entry, self.split_aliases.get(split, split), **options)
            for split in SPLITS
        }
        # Only older versions cached an empty split (and recorded its source in sources.json).
        self._refuse_empty_splits(
            {split: len(d) for split, d in self.datasets.items()},
            f"the cache entry {entry}",
            f"Delete {entry}, drop the {self.task!r} entry of {self.sources_record} if it names "
            "such files, and run again.",
        )
        for split, alias in self.split_aliases.items():
            log.warning("%s has no %s split: %s uses the %s split", self.task, split, split, alias)

    def majority_baseline(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent label of `split` (after setup)."""
        labels = np.asarray(self.datasets[split].arrays["label"])
        return float(np.bincount(labels).max() / max(len(labels), 1))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(
                f"{type(self).__name__}: call setup() before asking for a dataloader"
            )
        dataset = self.datasets[split]
        # The shuffled (train) loader keeps its place in the epoch in checkpoints.
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset)) if shuffle else None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
