"""Finding the files users hold, and reading them the same way from a folder or an archive.

Users hold LRA data in many shapes (`lra_release.gz`, a gzip tar with a nested
`lra_release/lra_release/`, extracted once or twice; `aclImdb` or its tarball; CIFAR-10's archive
or folder). A task names the *anchor* of its files (e.g. `listops-1000/`), and `SourceTree` finds
files by their path below it wherever it sits. Archives are read in one streaming pass, never
extracted: the release is 19 GB unpacked and Pathfinder alone is 200k small PNGs.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mra_lra.errors import UserError

log = logging.getLogger(__name__)


class SourceError(UserError, RuntimeError):
    """A source file is missing, unreadable or truncated; the message says what to do."""


class MissingReaderError(SourceError, ImportError):
    """Reading the files needs a package that is not installed; the message names the install."""


_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def _corrupt_archive(path: Path, err: BaseException) -> SourceError:
    return SourceError(
        f"{path} is truncated or corrupt ({type(err).__name__}: {err}). Download it "
        "again (compare its size with the original) and rerun; nothing was cached from it."
    )


class _ArchiveMemberReader(io.RawIOBase):
    """An archive member's stream whose read errors (a truncated archive) raise SourceError."""

    def __init__(self, stream: BinaryIO, archive: Path) -> None:
        super().__init__()
        self._stream = stream
        self._archive = archive

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        try:
            return self._stream.readinto(buffer)
        except _ARCHIVE_ERRORS as err:
            raise _corrupt_archive(self._archive, err) from err


def _decompressed(raw: BinaryIO) -> BinaryIO:
    """`raw` decompressed by its magic bytes (unlike tarfile's stream mode, these readers raise
    EOFError on a stream that ends early)."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw)
    return raw


def _after_anchor(name: str, anchor: str) -> str | None:
    """The part of `name` below the path components `anchor` (e.g. 'listops-1000'), or None."""
    parts = name.replace("\\", "/").strip("/").split("/")
    anchor_parts = anchor.strip("/").split("/")
    k = len(anchor_parts)
    for i in range(len(parts) - k, -1, -1):
        if parts[i : i + k] == anchor_parts:
            return "/".join(parts[i + k :]) or None
    return None


class SourceTree:
    """The files below `anchor` (which may span several components) inside a folder or a tar
    archive, by their path below it."""

    def __init__(self, path: str | os.PathLike, anchor: str) -> None:
        self.path = Path(path)
        self.anchor = anchor.strip("/")
        self.is_archive = self.path.is_file()
        # For a folder, the anchor folder itself (None when it is not there).
        self.root = None if self.is_archive else find_anchor_dir(self.path, self.anchor)

    def iter_files(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
        """(path below the anchor, contents) of every file for which `wanted(path)` is true, in
        archive order (folders: sorted)."""
        for rel, stream in self.iter_streams(wanted):
            yield rel, stream.read()

    def iter_streams(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, BinaryIO]]:
        """As `iter_files`, each file as a stream readable until the next one is asked for (for
        Retrieval's 8 GB training TSV). A corrupt archive raises SourceError."""
        if not self.is_archive:
            if self.root is None:
                raise SourceError(f"{self.path} holds no {self.anchor}/ folder")
            for file in sorted(self.root.rglob("*")):
                rel = file.relative_to(self.root).as_posix()
                if file.is_file() and wanted(rel):
                    with open(file, "rb") as stream:
                        yield rel, stream
            return
        try:
            with open(self.path, "rb") as raw:
                stream = _decompressed(raw)
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        rel = _after_anchor(member.name, self.anchor)
                        if rel is None or not wanted(rel):
                            continue
                        member_stream = tar.extractfile(member) or io.BytesIO()
                        yield rel, io.BufferedReader(_ArchiveMemberReader(member_stream, self.path))
                    # tarfile takes an archive cut inside or between headers for its end; a
                    # whole one ends with two zero blocks, and its compressed stream with a
                    # trailer that the decompressor checks while reading up to it.
                    while stream.read(1 << 20):
                        pass
                    if stream.tell() - tar.offset < 2 * tarfile.BLOCKSIZE:
                        raise tarfile.ReadError("the archive ends before its end-of-archive blocks")
        except _ARCHIVE_ERRORS as err:
            raise _corrupt_archive(self.path, err) from err

    def where(self, rel: str) -> str:
        """How errors name the file `rel`: its path, or `<archive>:<rel>`."""
        return f"{self.path}:{rel}" if self.is_archive else str(self.root / rel)

    def read_text_files(self, names: Sequence[str]) -> dict[str, str]:
        """The UTF-8 text of the named files (paths below the anchor), in one pass."""
        wanted = set(names)
        found = {}
        for rel, data in self.iter_files(wanted.__contains__):
            try:
                found[rel] = data.decode("utf-8")
            except UnicodeDecodeError as err:
                line = data.count(b"\n", 0, err.start) + 1
                column = err.start - data.rfind(b"\n", 0, err.start)
                raise SourceError(
                    f"{self.where(rel)}:{line}: byte 0x{data[err.start]:02x} (column {column}) is "
                    "not UTF-8 text, so the file is damaged or was re-encoded. Get it again (or "
                    "convert it to UTF-8) and rerun; nothing was cached from it."
                ) from None
        missing = sorted(wanted - found.keys())
        if missing:
            raise SourceError(
                f"{self.path} lacks {', '.join(f'{self.anchor}/{m}' for m in missing)}, so it is "
                "not the archive or folder this task reads. Point data.source (to prepare: "
                "source=) at one that holds them; nothing was cached from it."
            )
        return found


def find_anchor_dir(path: Path, anchor: str, max_depth: int = 3) -> Path | None:
    """The folder `anchor` at `path` or up to `max_depth` levels below it, without walking the
    whole tree."""
    anchor = anchor.strip("/")
    if path.as_posix().endswith("/" + anchor) or path.name == anchor:
        return path if path.is_dir() else None
    for depth in range(max_depth + 1):
        pattern = "/".join(["*"] * depth + [anchor])
        for match in sorted(path.glob(pattern)):
            if match.is_dir():
                return match
    return None


def locate_source(
    data_dir: str | os.PathLike,
    source: str | os.PathLike | None,
    anchor: str,
    candidates: Sequence[str],
    how_to_get: str,
) -> SourceTree:
    """Where a task's files are: `source` when given, else the first of `candidates` under
    data_dir (an archive, or a folder holding `anchor`); else FileNotFoundError + `how_to_get`."""
    data_dir = Path(data_dir)
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source={path} does not exist. {how_to_get}")
        if path.is_dir() and find_anchor_dir(path, anchor) is None:
            raise FileNotFoundError(
                f"source={path} is a folder without {anchor}/ inside it. {how_to_get}"
            )
        return SourceTree(path, anchor)
    for candidate in candidates:
        path = data_dir / candidate
        if path.is_file() or (path.is_dir() and find_anchor_dir(path, anchor) is not None):
            log.info("reading %s from %s", anchor, path)
            return SourceTree(path, anchor)
    tried = ", ".join(str(data_dir / c) for c in candidates)
    raise FileNotFoundError(
        f"no files for this task under {data_dir} (looked for {tried}). {how_to_get}"
    )
