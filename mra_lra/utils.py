"""Small helpers every part of the package uses: where the configs are, atomic file writes, and
config flattening."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
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
