"""Atomic writes and a cache of preprocessed numpy arrays, keyed by the options that made them.

A cache entry is a folder `<root>/<key>/` holding one `<name>.npy` per array and a `manifest.json`
with the options. The key is a hash of the options, so changing any option that changes the arrays
(a length, a source file's size or mtime, a vocabulary version) selects a new folder and the
arrays are rebuilt; unchanged options reuse the folder. Entries are built in a temporary folder
next to the final one and renamed into place, so an interrupted build never leaves a half-written
entry that a later run would trust, and two processes building the same entry do not clash.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

MANIFEST_NAME = "manifest.json"


@contextmanager
def atomic_open(path: str | os.PathLike, binary: bool = False) -> Iterator[TextIO | BinaryIO]:
    """Open `path` for writing (UTF-8 text, or bytes with `binary=True`) through a temporary file
    in the same folder that replaces `path` (os.replace) only when the block ends without an
    error, so readers see either no file, the old one, or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text_mode = {} if binary else {"encoding": "utf-8", "newline": "\n"}
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the final file should not be
        with os.fdopen(fd, "wb" if binary else "w", **text_mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_text` of `obj` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def ensure_writable_dir(path: str | os.PathLike, fix: str) -> Path:
    """Create `path` if needed and check that we may write there; otherwise raise PermissionError
    naming the folder and `fix` (what the user should change)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"cannot create the folder {path} ({err.strerror}). {fix}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder {path} is not writable. {fix}")
    return path


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Name, size and modification time of a source file: enough to notice that it changed."""
    stat = Path(path).stat()
    return {"name": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options as they read back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(options, sort_keys=True))


def cache_key(options: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-serialisable `options`."""
    blob = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(root: str | os.PathLike, options: Mapping[str, Any]) -> Path:
    """The folder that holds (or will hold) the entry for `options`."""
    return Path(root) / cache_key(options)


def _is_complete(entry: Path, options: Mapping[str, Any]) -> bool:
    manifest_path = entry / MANIFEST_NAME
    if not manifest_path.is_file():
        if entry.exists():
            raise RuntimeError(
                f"the cache folder {entry} has no {MANIFEST_NAME} (it was not written by this "
                "code); delete it and run again"
            )
        return False
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("options") != _normalise(options):
        raise RuntimeError(
            f"the cache folder {entry} was built with other options than its name says "
            f"({manifest.get('options')} != {_normalise(options)}); delete it and run again"
        )
    return True


def ensure_array_cache(
    root: str | os.PathLike,
    options: Mapping[str, Any],
    build: Callable[[], Mapping[str, np.ndarray]],
    fix: str,
) -> Path:
    """Return the cache entry for `options` under `root`, calling `build()` to make its arrays
    when it does not exist yet. `fix` says how to point the cache at a writable folder."""
    entry = cache_dir(root, options)
    if _is_complete(entry, options):
        return entry
    ensure_writable_dir(root, fix)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    try:
        os.chmod(tmp, 0o755)
        arrays = build()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        manifest = {
            "key": entry.name,
            "options": _normalise(options),
            "arrays": {
                name: {"dtype": str(array.dtype), "shape": list(array.shape)}
                for name, array in arrays.items()
            },
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        try:
            os.rename(tmp, entry)
        except OSError as err:
            # Another process finished the same entry first: keep theirs.
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _is_complete(entry, options):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def find_array_cache(
    root: str | os.PathLike, options: Mapping[str, Any], missing_hint: str
) -> Path:
    """The complete entry for `options`; a missing one raises FileNotFoundError with
    `missing_hint` (the call that builds it)."""
    entry = cache_dir(root, options)
    if not _is_complete(entry, options):
        raise FileNotFoundError(f"no cached arrays in {entry}. {missing_hint}")
    return entry


def load_arrays(entry: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map the arrays of a complete cache entry, by name."""
    entry = Path(entry)
    manifest = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
    return {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in manifest["arrays"]}
