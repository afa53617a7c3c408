"""ListOps: the release's TSV files (or generated ones), tokenised into a cache, as a datamodule.

Layout under `data_dir`:

    lra_release/listops-1000/basic_{train,val,test}.tsv   the release's files, or generated
    lra_release/listops-1000/.generated.json              generated files only: the settings
    cache/listops/<key>/                                  token arrays, keyed by what made them

Tokens: pad 0, digits 0-9 -> 1..10, `[MIN [MAX [MED [SM` -> 11..14, `]` -> 15; parentheses are
dropped, so a sequence has as many tokens as its tree's length.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mra_lra.data.cache import (
    ensure_array_cache,
    ensure_writable_dir,
    file_fingerprint,
    find_array_cache,
    load_arrays,
)
from mra_lra.data.listops_generator import (
    OPERATORS,
    SIDECAR_NAME,
    SPLITS,
    TSV_HEADER,
    generator_settings,
    split_path,
    write_listops_files,
)
from mra_lra.data.sampling import EpochShuffleSampler

log = logging.getLogger(__name__)

PAD_ID = 0
VOCAB: dict[str, int] = {
    **{str(d): d + 1 for d in range(10)},
    **{op: 11 + i for i, op in enumerate(OPERATORS)},
    "]": 15,
}
# Bump when VOCAB or the tokenisation changes, so that cached arrays are rebuilt.
VOCAB_VERSION = 1
_LABELS = {str(d): d for d in range(10)}
_DROP_PARENTHESES = str.maketrans("", "", "()")

DATA_DIR_FIX = "Set data.data_dir=<a writable folder> or the LRA_DATA_DIR environment variable."


def listops_dir(data_dir: str | os.PathLike) -> Path:
    """Where the release keeps the ListOps files: `<data_dir>/lra_release/listops-1000`."""
    return Path(data_dir) / "lra_release" / "listops-1000"


def ensure_listops_files(
    data_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    num_test: int,
    min_length: int,
    max_length: int,
    seed: int,
) -> Path:
    """Return the folder with `basic_{train,val,test}.tsv`, generating the files there (with
    these generator settings) when none of them exists. Files a user put there are used as
    they are and never overwritten; files generated with other settings are used with a warning.
    `min_length` and `max_length` are the generator's exclusive length bounds."""
    directory = listops_dir(data_dir)
    paths = [split_path(directory, split) for split in SPLITS]
    present = [p for p in paths if p.exists()]
    requested = generator_settings(num_train, num_val, num_test, min_length, max_length, seed)
    if len(present) == len(paths):
        sidecar = directory / SIDECAR_NAME
        if not sidecar.exists():
            log.info("ListOps: using the files in %s as they are", directory)
            return directory
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        if recorded != requested:
            changed = ", ".join(
                f"{k}={recorded.get(k)} (asked {v})"
                for k, v in requested.items()
                if recorded.get(k) != v
            )
            log.warning(
                "ListOps: the files in %s were generated with other settings: %s. Using them "
                "anyway; to regenerate, delete %s, or set data.data_dir (or LRA_DATA_DIR) to "
                "another folder.",
                directory,
                changed,
                directory,
            )
        return directory
    if present:
        missing = [p.name for p in paths if not p.exists()]
        raise FileNotFoundError(
            f"{directory} holds {', '.join(p.name for p in present)} but not "
            f"{', '.join(missing)}; refusing to mix given and generated files. Put all three "
            f"release files there, or delete {directory} to have all three generated."
        )
    ensure_writable_dir(directory, DATA_DIR_FIX)
    log.info("ListOps: generating %s into %s", requested, directory)
    return write_listops_files(
        directory,
        num_train,
        num_val,
        num_test,
        min_length=min_length,
        max_length=max_length,
        seed=seed,
    )


def read_listops_tsv(path: str | os.PathLike) -> tuple[list[np.ndarray], list[int]]:
    """Token ids (uint8, without padding) and labels of each row of a release-format TSV. A
    malformed row raises ValueError naming the file and line."""
    path = Path(path)
    token_ids, labels = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n")
        if header != TSV_HEADER:
            raise ValueError(f"{path}:1: expected the header {TSV_HEADER!r}, found {header!r}")
        for line_no, line in enumerate(f, start=2):
            columns = line.rstrip("\n").split("\t")
            if len(columns) != 2:
                raise ValueError(
                    f"{path}:{line_no}: expected 2 tab-separated columns (Source, Target), "
                    f"found {len(columns)}"
                )
            source, target = columns
            if target not in _LABELS:
                raise ValueError(f"{path}:{line_no}: the label {target!r} is not an integer 0-9")
            words = source.translate(_DROP_PARENTHESES).split()
            try:
                ids = np.fromiter(map(VOCAB.__getitem__, words), dtype=np.uint8, count=len(words))
            except KeyError as err:
                raise ValueError(
                    f"{path}:{line_no}: unknown token {err.args[0]!r}; "
                    f"valid tokens are {' '.join(VOCAB)} and parentheses"
                ) from None
            token_ids.append(ids)
            labels.append(_LABELS[target])
    return token_ids, labels


def tokenise_split(path: str | os.PathLike, max_length: int, split: str) -> dict[str, np.ndarray]:
    """Arrays of one split: `input_ids` uint8 [N, max_length] padded with PAD_ID and truncated
    to max_length (one warning counts the truncated rows), `label` uint8 [N] and `length` int32
    [N], the length before truncation."""
    token_ids, labels = read_listops_tsv(path)
    input_ids = np.full((len(token_ids), max_length), PAD_ID, dtype=np.uint8)
    lengths = np.array([len(ids) for ids in token_ids], dtype=np.int32)
    for row, ids in enumerate(token_ids):
        kept = ids[:max_length]
        input_ids[row, : len(kept)] = kept
    num_truncated = int((lengths > max_length).sum())
    if num_truncated:
        log.warning(
            "%s: %d of %d sequences longer than %d were truncated",
            split,
            num_truncated,
            len(lengths),
            max_length,
        )
    return {"input_ids": input_ids, "label": np.array(labels, dtype=np.uint8), "length": lengths}


def _cache_options(files_dir: Path, max_length: int) -> dict[str, Any]:
    return {
        "task": "listops",
        "vocab_version": VOCAB_VERSION,
        "max_length": max_length,
        "files": {split: file_fingerprint(split_path(files_dir, split)) for split in SPLITS},
    }


def _cache_root(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "cache" / "listops"


def ensure_listops_cache(
    data_dir: str | os.PathLike, files_dir: str | os.PathLike, max_length: int
) -> Path:
    """Tokenise the three splits in `files_dir` into `<data_dir>/cache/listops/<key>/` unless
    an entry for the same files and max_length is there already; return the entry's folder."""
    files_dir = Path(files_dir)

    def build() -> dict[str, np.ndarray]:
        arrays = {}
        for split in SPLITS:
            for name, array in tokenise_split(
                split_path(files_dir, split), max_length, split
            ).items():
                arrays[f"{split}_{name}"] = array
        return arrays

    return ensure_array_cache(
        _cache_root(data_dir), _cache_options(files_dir, max_length), build, DATA_DIR_FIX
    )


class ListOpsDataset(Dataset):
    """One split of a cache entry as `{"input_ids", "mask", "label"}` items.

    The arrays are memory-mapped on first use in each process, so that worker processes started
    by spawn or forkserver map the files instead of receiving a pickled copy of them."""

    def __init__(self, entry: str | os.PathLike, split: str) -> None:
        self.entry = Path(entry)
        self.split = split
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            arrays = load_arrays(self.entry)
            self._arrays = {
                name: arrays[f"{self.split}_{name}"] for name in ("input_ids", "label", "length")
            }
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        arrays = self.arrays
        max_length = arrays["input_ids"].shape[1]
        mask = torch.zeros(max_length, dtype=torch.float32)
        mask[: min(int(arrays["length"][index]), max_length)] = 1.0
        return {
            "input_ids": torch.from_numpy(arrays["input_ids"][index].astype(np.int64)),
            "mask": mask,
            "label": torch.tensor(int(arrays["label"][index]), dtype=torch.long),
        }


class ListOpsDataModule(pl.LightningDataModule):
    """ListOps from `<data_dir>/lra_release/listops-1000`, generated there when absent.

    `gen_*` and `num_*` are the generator's settings (used only when the files are generated);
    `max_length` is the model's fixed sequence length, to which every batch is padded."""

    num_classes = 10
    vocab_size = len(VOCAB) + 1

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        max_length: int,
        num_workers: int,
        num_train: int,
        num_val: int,
        num_test: int,
        gen_min_length: int,
        gen_max_length: int,
        seed: int,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.gen_min_length = gen_min_length
        self.gen_max_length = gen_max_length
        self.seed = seed
        self.pin_memory = pin_memory
        self.datasets: dict[str, ListOpsDataset] = {}

    def prepare_data(self) -> None:
        files_dir = ensure_listops_files(
            self.data_dir,
            self.num_train,
            self.num_val,
            self.num_test,
            self.gen_min_length,
            self.gen_max_length,
            self.seed,
        )
        ensure_listops_cache(self.data_dir, files_dir, self.max_length)

    def setup(self, stage: str | None = None) -> None:
        files_dir = listops_dir(self.data_dir)
        missing = [p for p in (split_path(files_dir, s) for s in SPLITS) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(map(str, missing))} not found; call prepare_data() first "
                "(the Trainer does), or check data.data_dir"
            )
        entry = find_array_cache(
            _cache_root(self.data_dir),
            _cache_options(files_dir, self.max_length),
            "Call prepare_data() first (the Trainer does).",
        )
        self.datasets = {split: ListOpsDataset(entry, split) for split in SPLITS}

    def majority_baseline(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent label of `split` (after setup)."""
        labels = np.asarray(self.datasets[split].arrays["label"])
        return float(np.bincount(labels).max() / max(len(labels), 1))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError("ListOpsDataModule: call setup() before asking for a dataloader")
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset)) if shuffle else None,
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
