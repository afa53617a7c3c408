"""Retrieval (LRA): do two ACL Anthology papers cite one another? Pairs of UTF-8 byte documents.

Pairs are read from `source=<path>` (a folder or archive holding tsv_data/), else from
`lra_release/[lra_release/]tsv_data/new_aan_pairs.{train,eval,test}.tsv` or `lra_release.gz`
under data_dir (an archive is streamed, never extracted). Each row is
`label<TAB>id1<TAB>id2<TAB>text1<TAB>text2`, without header or quoting, the label `0.0` or `1.0`;
`eval` is our validation split. Both documents are tokenised as Text's bytes and go to the model
as two towers (`input_ids`/`mask`, `input_ids_2`/`mask_2`) that share one encoder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mra_lra.data.cache import file_fingerprint
from mra_lra.data.sources import SourceTree, locate_source
from mra_lra.data.text import ByteTextDataModule, byte_token_ids, check_split

log = logging.getLogger(__name__)

# Bump when the tokenisation or the parsing changes, so that cached arrays are rebuilt.
FORMAT_VERSION = 1

RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
ANCHOR = "tsv_data"
RELEASE_CANDIDATES = ("lra_release", "lra_release.gz", "lra_release.tar.gz")
FILES = {
    "train": "new_aan_pairs.train.tsv",
    "val": "new_aan_pairs.eval.tsv",
    "test": "new_aan_pairs.test.tsv",
}
RELEASE_SIZES = {"train": 147_086, "val": 18_090, "test": 17_437}
COLUMNS = ("label", "id1", "id2", "text1", "text2")
_LABELS = {0.0: 0, 1.0: 1}


def how_to_get(data_dir: str | os.PathLike) -> str:
    data_dir = Path(data_dir)
    return (
        f"Get lra_release.gz from {RELEASE_URL} and put it at {data_dir / 'lra_release.gz'} (or "
        f"extract it there, giving {data_dir / 'lra_release'}/.../tsv_data/"
        "new_aan_pairs.{train,eval,test}.tsv), or pass data.source=<a folder or archive "
        "holding tsv_data/> (to prepare: source=<...>)."
    )


def parse_label(field: bytes, where: str) -> int:
    try:
        value = float(field.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        value = None
    if value not in _LABELS:
        shown = field[:20].decode("utf-8", errors="replace")
        raise ValueError(f"{where}: the label {shown!r} is not 0.0 or 1.0")
    return _LABELS[value]


def parse_aan_rows(
    lines: Iterable[bytes], name: str, text_length: int
) -> tuple[list[bytes], list[bytes], list[int]]:
    """The two documents (their first `text_length` bytes) and the label of every row; blank
    lines are skipped, a malformed row raises ValueError naming the file `name` and the line."""
    texts1: list[bytes] = []
    texts2: list[bytes] = []
    labels: list[int] = []
    for line_no, line in enumerate(lines, start=1):
        line = line.rstrip(b"\n").removesuffix(b"\r")
        if not line:
            continue
        # Split only after counting: a document is kilobytes, and only its head is kept.
        found = line.count(b"\t") + 1
        if found != len(COLUMNS):
            raise ValueError(
                f"{name}:{line_no}: expected {len(COLUMNS)} tab-separated columns "
                f"({', '.join(COLUMNS)}), found {found}"
            )
        label, _, _, text1, text2 = line.split(b"\t")
        labels.append(parse_label(label, f"{name}:{line_no}"))
        texts1.append(text1[:text_length])
        texts2.append(text2[:text_length])
    return texts1, texts2, labels


def read_aan_pairs(
    tree: SourceTree, text_length: int, fix: str
) -> dict[str, tuple[list[bytes], list[bytes], list[int]]]:
    """(documents 1, documents 2, labels) of each split, streamed line by line (the training
    file is 8 GB); a missing TSV raises FileNotFoundError ending with `fix`."""
    splits = {file: split for split, file in FILES.items()}
    pairs = {}
    for rel, stream in tree.iter_streams(splits.__contains__):
        split = splits[rel]
        lines = tqdm(
            stream, desc=f"AAN {split}", unit="pairs", total=RELEASE_SIZES[split], disable=None
        )
        pairs[split] = parse_aan_rows(lines, tree.where(rel), text_length)
        if len(pairs) == len(FILES):
            break
    missing = [FILES[split] for split in FILES if split not in pairs]
    if missing:
        raise FileNotFoundError(
            f"{tree.path} has no {', '.join(f'{ANCHOR}/{m}' for m in missing)}. {fix}"
        )
    for split, (texts1, texts2, labels) in pairs.items():
        release = RELEASE_SIZES[split]
        check_split("retrieval", split, len(labels), release, texts1 + texts2, "documents")
    return pairs


class RetrievalDataModule(ByteTextDataModule):
    task = "retrieval"
    format_version = FORMAT_VERSION
    _tree: SourceTree | None = None

    def ensure_sources(self) -> None:
        fix = how_to_get(self.data_dir)
        tree = locate_source(self.data_dir, self.source, ANCHOR, RELEASE_CANDIDATES, fix)
        if not tree.is_archive:
            missing = [f for f in FILES.values() if not (tree.root / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{tree.root} lacks {', '.join(missing)}. {fix}")
        self._tree = tree

    def _source_fingerprint(self) -> dict[str, Any]:
        if self._tree is None:
            self.ensure_sources()
        tree = self._tree
        if tree.is_archive:
            return {"archive": file_fingerprint(tree.path)}
        return {split: file_fingerprint(tree.root / file) for split, file in FILES.items()}

    def build_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for split, (texts1, texts2, labels) in read_aan_pairs(
            self._tree, self.text_length, how_to_get(self.data_dir)
        ).items():
            for suffix, texts in (("", texts1), ("_2", texts2)):
                ids, lengths = byte_token_ids(texts, self.text_length, self.max_length)
                arrays[f"{split}_input_ids{suffix}"] = ids
                arrays[f"{split}_length{suffix}"] = lengths
            arrays[f"{split}_label"] = np.asarray(labels, dtype=np.uint8)
        return arrays
