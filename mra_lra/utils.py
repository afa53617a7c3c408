"""Small helpers every part of the package uses: where the configs are, atomic file writes, config
flattening, the generators' worker pool and torch's thread count."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TextIO

# The configs ship inside the package (a wheel installed anywhere trains); the repository's
# top-level conf/ is a link to this folder.
CONF_DIR = Path(__file__).resolve().parent / "conf"


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


def flatten_config(value: object, prefix: str = "", out: dict[str, str] | None = None) -> dict:
    """Nested dicts as out["a.b.c"] = the JSON of each leaf value (a prefix names the root)."""
    out = {} if out is None else out
    if isinstance(value, dict) and value:
        for key, item in value.items():
            flatten_config(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True)
    return out


def resolve_workers(workers: int | None) -> int:
    """`workers`, or for None the cores this process may run on (fewer than os.cpu_count() under
    a CPU limit); ValueError below 1."""
    if workers is None and hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    if workers is None:
        return os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return workers


@contextmanager
def ordered_map(workers: int, num_tasks: int) -> Iterator[Callable]:
    """`map`, or the `imap` of a Pool of `workers` processes (at most `num_tasks`): results in
    task order either way. Workers ignore Ctrl-C; this process gets it and terminates the pool."""
    workers = min(workers, max(num_tasks, 1))
    if workers == 1:
        yield map
        return
    fork = "fork" in multiprocessing.get_all_start_methods()  # fast start; spawn works too
    pool = multiprocessing.get_context("fork" if fork else None).Pool(
        workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)
    )
    try:
        yield pool.imap
    finally:
        pool.terminate()
        pool.join()


def busy_cores() -> float:
    """How many of the machine's cores are busy now: /proc/stat over a quarter second (Linux),
    else the 1-minute load average (which lags a minute behind)."""
    try:

        def idle_and_total() -> tuple[int, int]:
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

        idle, total = idle_and_total()
        time.sleep(0.25)
        idle_now, total_now = idle_and_total()
        return (os.cpu_count() or 1) * (1 - (idle_now - idle) / max(total_now - total, 1))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]


def torch_threads(threads: int | str | None) -> int | None:
    """The `torch_threads` setting as a number of threads (None: leave torch's, one per core).
    auto takes the cores idle at start, so that on a busy machine a run slows in proportion
    instead of torch's threads fighting other processes for the cores (5x slower on a 2-core
    machine beside two busy processes)."""
    if threads == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(cores, round((os.cpu_count() or 1) - busy_cores())))
    if threads is not None and (type(threads) is not int or threads < 1):
        raise ValueError(f"torch_threads={threads!r}: give null, auto or a number of threads")
    return threads
