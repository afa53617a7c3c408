"""Atomic writes and a cache of preprocessed numpy arrays, keyed by the options that made them.

An entry `<root>/<key>/` holds one `<name>.npy` per array and a `manifest.json` with the options
whose hash is the key. Entries are built, fsynced, in a locked temporary folder and renamed into
place, so a crash never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mra_lra.data.sources import SourceError
from mra_lra.utils import atomic_write_json, ensure_writable_dir

try:
    import fcntl
except ImportError:  # not POSIX: no locks, stale folders are told by their age alone
    fcntl = None

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
# A temporary folder without a lock file (older code, no flock) is abandoned once this old.
STALE_AGE_SECONDS = 24 * 3600


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Name, size and modification time of a source file: enough to notice that it changed."""
    stat = Path(path).stat()
    return {"name": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _hold_lock(folder: Path) -> int | None:
    """The descriptor of `folder/LOCK_NAME`, created locked (under another name, then renamed, so
    that a visible lock file is never unlocked while its owner lives); None without flock."""
    if fcntl is None:
        return None
    pending = folder / f"{LOCK_NAME}-pending"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(pending, folder / LOCK_NAME)
    except OSError:
        os.close(fd)
        pending.unlink(missing_ok=True)
        return None
    return fd


@contextmanager
def building_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A new locked folder `.tmp-<final's name>-<random>` beside `final` in which to build it; the
    block ends with `commit_dir(tmp, final)`, and whatever is left afterwards is removed."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{final.name}-", dir=final.parent))
    lock = None
    try:
        lock = _hold_lock(tmp)
        os.chmod(tmp, 0o755)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` without its lock file; OSError (EEXIST, ENOTEMPTY) when `final`
    exists and is not empty."""
    (tmp / LOCK_NAME).unlink(missing_ok=True)  # the lock itself stays held until the block ends
    os.rename(tmp, final)


def _is_abandoned(folder: Path, max_age: float) -> bool:
    # A shared lock (it needs only read access) is refused while the builder holds its own.
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:  # older code, no flock, or being set up: by its age alone
        return time.time() - folder.stat().st_mtime > max_age
    except OSError:
        return False
    try:
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its builder is alive
        except OSError:
            return time.time() - folder.stat().st_mtime > max_age  # no flock here
        return True  # nobody holds the lock: its builder is gone
    finally:
        os.close(fd)


def remove_stale_temp_dirs(
    root: str | os.PathLike, name_pattern: str, max_age: float = STALE_AGE_SECONDS
) -> list[Path]:
    """Remove (and return) the temporary folders under `root` for a final name matching the regex
    `name_pattern` whose builder is gone; anything it cannot decide is left alone."""
    root = Path(root)
    if not root.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(TEMP_PREFIX)}(?:{name_pattern})-[a-z0-9_]{{8}}")
    removed = []
    for folder in sorted(root.iterdir()):
        if not pattern.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            if not _is_abandoned(folder, max_age):
                continue
        except OSError:  # gone meanwhile, or unreadable
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            log.info("removed %s, left by a build that did not finish", folder)
            removed.append(folder)
    return removed


def _normalise(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps(options, sort_keys=True))


def cache_key(options: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-serialisable `options`."""
    blob = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(root: str | os.PathLike, options: Mapping[str, Any]) -> Path:
    return Path(root) / cache_key(options)


def _damaged(entry: Path, what: str) -> SourceError:
    return SourceError(
        f"the cache entry {entry} is damaged: {what}. Delete the folder {entry} and run again "
        "(or rerun prepare with the same options): it is rebuilt from the source files."
    )


def _read_manifest(entry: Path) -> dict[str, Any]:
    manifest_path = entry / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise _damaged(entry, f"{manifest_path} cannot be read ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
        raise _damaged(entry, f"{manifest_path} is not a cache manifest")
    return manifest


def _is_complete(entry: Path, options: Mapping[str, Any]) -> bool:
    manifest_path = entry / MANIFEST_NAME
    if not manifest_path.is_file():
        if entry.exists():
            raise SourceError(
                f"the cache folder {entry} has no {MANIFEST_NAME} (it was not written by this "
                "code); delete it and run again"
            )
        return False
    manifest = _read_manifest(entry)
    if manifest.get("options") != _normalise(options):
        raise SourceError(
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
    """The cache entry for `options` under `root`, calling `build()` to make its arrays when it
    does not exist yet. `fix` says how to point the cache at a writable folder."""
    entry = cache_dir(root, options)
    if _is_complete(entry, options):
        load_arrays(entry)  # a damaged entry is an error here, not in the middle of a run
        return entry
    ensure_writable_dir(root, fix)
    remove_stale_temp_dirs(root, r"[0-9a-f]{16}")
    with building_dir(entry) as tmp:
        arrays = build()
        for name, array in arrays.items():
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, np.ascontiguousarray(array))
                f.flush()
                os.fsync(f.fileno())
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
            commit_dir(tmp, entry)
        except OSError as err:
            # Another process finished the same entry first: keep theirs.
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _is_complete(entry, options):
                raise
    return entry


def find_array_cache(
    root: str | os.PathLike, options: Mapping[str, Any], missing_hint: str
) -> Path:
    """The complete entry for `options`, or FileNotFoundError ending with `missing_hint`."""
    entry = cache_dir(root, options)
    if not _is_complete(entry, options):
        raise FileNotFoundError(f"no cached arrays in {entry}. {missing_hint}")
    return entry


def load_arrays(entry: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-map the arrays of a complete cache entry, by name; a file that does not read back
    as written raises SourceError naming it and the folder to delete."""
    entry = Path(entry)
    arrays = {}
    for name, expected in _read_manifest(entry)["arrays"].items():
        path = entry / f"{name}.npy"
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError as err:
            raise _damaged(entry, f"{path} is missing") from err
        except (OSError, ValueError, EOFError) as err:  # cut, or not a .npy file
            raise _damaged(entry, f"{path} cannot be read ({err})") from err
        if not isinstance(array, np.ndarray):  # an .npz archive
            raise _damaged(entry, f"{path} is not a .npy array")
        found = {"dtype": str(array.dtype), "shape": list(array.shape)}
        if found != expected:
            raise _damaged(entry, f"{path} holds {found}, its manifest says {expected}")
        arrays[name] = array
    return arrays
