"""Text (LRA): IMDB movie reviews as UTF-8 bytes, labelled positive (1) or negative (0).

Reviews are read from `source=<path>` (any of these shapes), else the first found under data_dir:

    aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt   the Stanford tarball, extracted
    aclImdb_v1.tar.gz                                  the Stanford tarball itself
    imdb/plain_text/{train,test}-*.parquet             Hugging Face `stanfordnlp/imdb` (pyarrow)

IMDB has no validation split: val reads the test arrays. Tokens (shared with Retrieval): byte b ->
b + 1, pad 0; a review keeps its first `text_length` bytes (LRA paper: 4000, padded to 4096).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mra_lra.data.base import LRADataModule
from mra_lra.data.cache import file_fingerprint
from mra_lra.data.sources import (
    MissingReaderError,
    SourceError,
    SourceTree,
    find_anchor_dir,
    locate_source,
)

log = logging.getLogger(__name__)

PAD_ID = 0
VOCAB_SIZE = 257  # 256 byte values + pad
# Bump when the tokenisation changes, so that cached arrays are rebuilt.
FORMAT_VERSION = 1

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
HF_URL = "https://huggingface.co/datasets/stanfordnlp/imdb"
ANCHOR = "aclImdb"
CANDIDATES = ("aclImdb", "aclImdb_v1.tar.gz")
PARQUET_ANCHOR = "plain_text"
PARQUET_CANDIDATE = "imdb"
SPLITS = ("train", "test")
LABELS = {"neg": 0, "pos": 1}
RELEASE_SIZE = 25_000
_REVIEW = re.compile(r"(train|test)/(neg|pos)/(\d+)_(\d+)\.txt")


def how_to_get(data_dir: str | os.PathLike) -> str:
    data_dir = Path(data_dir)
    return (
        f"Get IMDB from {IMDB_URL} and put it at {data_dir / 'aclImdb_v1.tar.gz'} (or extract it "
        f"there, giving {data_dir / 'aclImdb'}/), or put the Hugging Face parquet files of "
        f"{HF_URL} at {data_dir / 'imdb' / 'plain_text'}/{{train,test}}-*.parquet; or pass "
        "data.source=<a folder or archive holding aclImdb/ or plain_text/> (to prepare: "
        "source=<...>)."
    )


def byte_token_ids(
    texts: Sequence[bytes], text_length: int, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids uint16 [N, max_length] of the first `text_length` bytes of each text (byte + 1,
    padded with PAD_ID), and their count int32 [N]."""
    if text_length > max_length:
        raise ValueError(f"text_length={text_length} does not fit in max_length={max_length}")
    ids = np.full((len(texts), max_length), PAD_ID, dtype=np.uint16)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for row, text in enumerate(texts):
        kept = np.frombuffer(text[:text_length], dtype=np.uint8)
        ids[row, : len(kept)] = kept.astype(np.uint16) + 1
        lengths[row] = len(kept)
    return ids, lengths


def check_split(
    task: str, split: str, count: int, release: int, texts: Sequence[bytes], what: str
) -> None:
    """Warn about a split size other than the release's (users subsample on purpose) and about
    empty texts (kept, so that the count stays the release's, but the model sees only padding)."""
    if count != release:
        log.warning(
            "%s: the %s split has %d examples, the release has %d; accuracies are not comparable "
            "with published numbers",
            task,
            split,
            count,
            release,
        )
    empty = sum(not text for text in texts)
    if empty:
        log.warning("%s: %d empty %s in the %s split", task, empty, what, split)


@dataclass(frozen=True)
class ParquetFiles:
    folder: Path
    files: dict[str, list[Path]]


ImdbSource = SourceTree | ParquetFiles


def _parquet_files(path: Path) -> ParquetFiles | None:
    folder = find_anchor_dir(path, PARQUET_ANCHOR) if path.is_dir() else None
    if folder is None:
        return None
    files = {split: sorted(folder.glob(f"{split}-*.parquet")) for split in SPLITS}
    if not all(files.values()):
        return None
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingReaderError(
            f"{folder} holds the Hugging Face IMDB parquet files; reading them needs pyarrow: "
            f"`pip install pyarrow` (or use the Stanford tarball {IMDB_URL} instead)"
        ) from None
    return ParquetFiles(folder, files)


def locate_imdb(data_dir: str | os.PathLike, source: str | os.PathLike | None) -> ImdbSource:
    data_dir = Path(data_dir)
    if source is not None:
        parquet = _parquet_files(Path(source).expanduser())
        if parquet is not None:
            return parquet
        return locate_source(data_dir, source, ANCHOR, (), how_to_get(data_dir))
    try:
        return locate_source(data_dir, None, ANCHOR, CANDIDATES, how_to_get(data_dir))
    except FileNotFoundError:
        parquet = _parquet_files(data_dir / PARQUET_CANDIDATE)
        if parquet is None:
            raise
        return parquet


def source_fingerprint(source: ImdbSource) -> dict[str, Any]:
    if isinstance(source, ParquetFiles):
        return {
            split: [file_fingerprint(p) for p in paths] for split, paths in source.files.items()
        }
    if source.is_archive:
        return {"archive": file_fingerprint(source.path)}
    # One hash of the 50,000 reviews' paths, sizes and mtimes keeps the manifest small.
    root = source.root
    digest = hashlib.sha256()
    count = total = 0
    for path in sorted(root.glob("*/*/*.txt")):
        rel = path.relative_to(root).as_posix()
        if _REVIEW.fullmatch(rel):
            fp = file_fingerprint(path)
            digest.update(f"{rel}\t{fp['size']}\t{fp['mtime_ns']}\n".encode())
            count += 1
            total += fp["size"]
    return {"folder": {"files": count, "bytes": total, "sha256": digest.hexdigest()[:16]}}


def _read_review_files(tree: SourceTree) -> dict[str, tuple[list[bytes], list[int]]]:
    """Reviews and labels per split, negatives then positives, in numeric id order."""
    found: dict[str, list[tuple[int, int, int, bytes]]] = {split: [] for split in SPLITS}
    files = tree.iter_files(lambda rel: _REVIEW.fullmatch(rel) is not None)
    for rel, data in tqdm(files, desc="IMDB reviews", unit="file", disable=None):
        split, label, review_id, rating = _REVIEW.fullmatch(rel).groups()
        found[split].append((LABELS[label], int(review_id), int(rating), data))
    reviews = {}
    for split, rows in found.items():
        if not rows:
            # An archive without aclImdb/ (LRA's release, say) is found out only when read.
            raise SourceError(
                f"{tree.path} holds no IMDB reviews ({ANCHOR}/{split}/{{neg,pos}}/<id>_<rating>"
                f".txt): it is not the IMDB archive. Point data.source (or prepare's source=) at "
                f"aclImdb_v1.tar.gz from {IMDB_URL}, or at a folder holding {ANCHOR}/; nothing "
                "was cached from it."
            )
        rows.sort(key=lambda row: row[:3])
        reviews[split] = ([row[3] for row in rows], [row[0] for row in rows])
    return reviews


def _read_parquet(source: ParquetFiles) -> dict[str, tuple[list[bytes], list[int]]]:
    import pyarrow.parquet as pq

    reviews = {}
    for split, paths in source.files.items():
        texts: list[bytes] = []
        labels: list[int] = []
        for path in tqdm(paths, desc=f"IMDB {split} parquet", unit="file", disable=None):
            table = pq.read_table(path)
            missing = {"text", "label"} - set(table.column_names)
            if missing:
                raise ValueError(
                    f"{path}: no column {', '.join(sorted(missing))} (found "
                    f"{', '.join(table.column_names)}); expected the Hugging Face imdb files"
                )
            columns = table.to_pydict()
            for row, (text, label) in enumerate(
                zip(columns["text"], columns["label"], strict=True)
            ):
                if label not in (0, 1):
                    raise ValueError(f"{path}: row {row} has label {label!r}, expected 0 or 1")
                texts.append(text.encode("utf-8"))
                labels.append(label)
        reviews[split] = (texts, labels)
    return reviews


def read_imdb(source: ImdbSource) -> dict[str, tuple[list[bytes], list[int]]]:
    """(UTF-8 texts, labels) of the train and test splits."""
    if isinstance(source, ParquetFiles):
        reviews = _read_parquet(source)
    else:
        reviews = _read_review_files(source)
    for split, (texts, _) in reviews.items():
        check_split("text", split, len(texts), RELEASE_SIZE, texts, "reviews")
    return reviews


class ByteTextDataModule(LRADataModule):
    """A byte-level text task (Text, Retrieval): `text_length` bytes are kept per document and
    padded to `max_length` (`byte_token_ids`). Other arguments are LRADataModule's."""

    num_classes = 2
    vocab_size = VOCAB_SIZE
    format_version: int

    def __init__(self, *args: Any, text_length: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if text_length < 1:
            raise ValueError(f"data.text_length must be positive, got {text_length}")
        if text_length > self.max_length:
            raise ValueError(
                f"data.text_length={text_length} exceeds data.max_length={self.max_length}: a "
                "sequence would not fit the model. Set data.max_length >= data.text_length (the "
                "LRA settings are text_length=4000 with max_length=4096, or 1000 with 1024)."
            )
        self.text_length = text_length

    def cache_options(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "format_version": self.format_version,
            "text_length": self.text_length,
            "max_length": self.max_length,
            "source": self._source_fingerprint(),
        }

    def _source_fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError


class TextDataModule(ByteTextDataModule):
    task = "text"
    format_version = FORMAT_VERSION
    split_aliases = {"val": "test"}
    _source: ImdbSource | None = None

    def ensure_sources(self) -> None:
        self._source = locate_imdb(self.data_dir, self.source)

    def _source_fingerprint(self) -> dict[str, Any]:
        if self._source is None:
            self.ensure_sources()
        return source_fingerprint(self._source)

    def build_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for split, (texts, labels) in read_imdb(self._source).items():
            ids, lengths = byte_token_ids(texts, self.text_length, self.max_length)
            cut = sum(len(text) > self.text_length for text in texts)
            log.info(
                "text: %s: %d reviews, %d cut to %d bytes", split, len(texts), cut, self.text_length
            )
            arrays[f"{split}_input_ids"] = ids
            arrays[f"{split}_length"] = lengths
            arrays[f"{split}_label"] = np.asarray(labels, dtype=np.uint8)
        return arrays
