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

from mra_lra.data.base import DATA_DIR_FIX, LRADataModule, pad_sequences
from mra_lra.data.cache import ensure_writable_dir, file_fingerprint
from mra_lra.data.listops_generator import (
    OPERATORS,
    SIDECAR_NAME,
    SPLITS,
    TSV_HEADER,
    generator_settings,
    split_path,
    write_listops_files,
)
from mra_lra.data.sources import SourceTree, locate_source

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

ANCHOR = "listops-1000"
# Where the release may sit under data_dir besides lra_release/listops-1000 itself.
RELEASE_CANDIDATES = ("lra_release", "lra_release.gz", "lra_release.tar.gz")
HOW_TO_GET = (
    "Get lra_release.gz from https://storage.googleapis.com/long-range-arena/lra_release.gz and "
    "put it at <data_dir>/lra_release.gz (or extract it there), or pass source=<its path>; "
    "without it, ListOps is generated."
)


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


def parse_listops_tsv(text: str, name: str) -> tuple[list[np.ndarray], list[int]]:
    """Token ids (uint8, without padding) and labels of each row of a release-format TSV; `name`
    is the file shown in errors. A malformed row raises ValueError naming the file and line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = lines[0].rstrip("\r") if lines else ""
    if header != TSV_HEADER:
        raise ValueError(f"{name}:1: expected the header {TSV_HEADER!r}, found {header!r}")
    token_ids, labels = [], []
    for line_no, line in enumerate(lines[1:], start=2):
        columns = line.rstrip("\r").split("\t")
        if len(columns) != 2:
            raise ValueError(
                f"{name}:{line_no}: expected 2 tab-separated columns (Source, Target), "
                f"found {len(columns)}"
            )
        source, target = columns
        if target not in _LABELS:
            raise ValueError(f"{name}:{line_no}: the label {target!r} is not an integer 0-9")
        words = source.translate(_DROP_PARENTHESES).split()
        try:
            ids = np.fromiter(map(VOCAB.__getitem__, words), dtype=np.uint8, count=len(words))
        except KeyError as err:
            raise ValueError(
                f"{name}:{line_no}: unknown token {err.args[0]!r}; "
                f"valid tokens are {' '.join(VOCAB)} and parentheses"
            ) from None
        token_ids.append(ids)
        labels.append(_LABELS[target])
    return token_ids, labels


def read_listops_tsv(path: str | os.PathLike) -> tuple[list[np.ndarray], list[int]]:
    """`parse_listops_tsv` of a file."""
    return parse_listops_tsv(Path(path).read_text(encoding="utf-8"), str(path))


def tokenise_split(text: str, name: str, max_length: int, split: str) -> dict[str, np.ndarray]:
    """Arrays of one split: `input_ids` uint8 [N, max_length] padded with PAD_ID and truncated
    to max_length (one warning counts the truncated rows), `label` uint8 [N] and `length` int32
    [N], the length before truncation."""
    token_ids, labels = parse_listops_tsv(text, name)
    input_ids, lengths = pad_sequences(token_ids, max_length, np.uint8, split)
    return {"input_ids": input_ids, "label": np.array(labels, dtype=np.uint8), "length": lengths}


def _cache_options(tree: SourceTree, max_length: int) -> dict[str, Any]:
    if tree.is_archive:
        files = {"archive": file_fingerprint(tree.path)}
    else:
        files = {split: file_fingerprint(split_path(tree.root, split)) for split in SPLITS}
    return {
        "task": "listops",
        "vocab_version": VOCAB_VERSION,
        "max_length": max_length,
        "files": files,
    }


def _build_arrays(tree: SourceTree, max_length: int) -> dict[str, np.ndarray]:
    names = {split_path(Path(), split).name: split for split in SPLITS}
    texts = tree.read_text_files(list(names))
    arrays = {}
    for file_name, split in names.items():
        where = f"{tree.path}:{file_name}" if tree.is_archive else str(tree.root / file_name)
        for key, array in tokenise_split(texts[file_name], where, max_length, split).items():
            arrays[f"{split}_{key}"] = array
    return arrays


class ListOpsDataModule(LRADataModule):
    """ListOps from the release's files, or generated into `<data_dir>/lra_release/listops-1000`.

    Files are looked for at `source` when given, else in `<data_dir>/lra_release/listops-1000`,
    then in a nested `lra_release/lra_release/` or the `lra_release.gz` archive under data_dir;
    when there are none, they are generated with the `gen_*` / `num_*` settings."""

    task = "listops"
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
        source: str | None = None,
    ) -> None:
        super().__init__(data_dir, batch_size, max_length, num_workers, pin_memory, source)
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.gen_min_length = gen_min_length
        self.gen_max_length = gen_max_length
        self.seed = seed
        self._tree: SourceTree | None = None

    def _find_tree(self, generate: bool) -> SourceTree:
        if self.source is not None:
            return locate_source(self.data_dir, self.source, ANCHOR, (), HOW_TO_GET)
        direct = listops_dir(self.data_dir)
        if not direct.exists():
            try:
                return locate_source(self.data_dir, None, ANCHOR, RELEASE_CANDIDATES, HOW_TO_GET)
            except FileNotFoundError:
                if not generate:
                    raise
        if generate:
            ensure_listops_files(
                self.data_dir,
                self.num_train,
                self.num_val,
                self.num_test,
                self.gen_min_length,
                self.gen_max_length,
                self.seed,
            )
        return SourceTree(direct, ANCHOR)

    def ensure_sources(self) -> None:
        self._tree = self._find_tree(generate=True)

    def cache_options(self) -> dict[str, Any]:
        if self._tree is None:
            try:
                self._tree = self._find_tree(generate=False)
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"{err} Or call prepare_data() first (the Trainer does)."
                ) from None
        tree = self._tree
        if not tree.is_archive:
            missing = [p for p in (split_path(tree.root, s) for s in SPLITS) if not p.exists()]
            if missing:
                raise FileNotFoundError(
                    f"{', '.join(map(str, missing))} not found; call prepare_data() first "
                    "(the Trainer does), or check data.data_dir"
                )
        return _cache_options(tree, self.max_length)

    def build_arrays(self) -> dict[str, np.ndarray]:
        return _build_arrays(self._tree, self.max_length)
