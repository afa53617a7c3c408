"""One way for every command to report a user's mistake: one `error:` line and exit status 2.

A `UserError` (or a subclass) is raised wherever the code can name what is wrong and the fix. A
few exceptions from elsewhere count as the user's too: a missing or unwritable file, a full disk,
and a bad option value (a `ValueError` from an option check, Lightning's
`MisconfigurationException`, either wrapped by Hydra's `instantiate`). Anything else is a bug and
keeps its traceback. HYDRA_FULL_ERROR=1 shows the traceback of a user error too.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException


class UserError(Exception):
    """A mistake the user can fix; the message names what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config value the code cannot use (also a ValueError, as option checks raise)."""


class RunFolderError(UserError):
    """A run folder that cannot take this start: it holds a finished run, another process is
    training in it, or a ckpt_path that is no checkpoint."""


class EnvVarError(UserError):
    """An environment variable set to a value its reader rejects."""


EXIT_USER_ERROR = 2

# What to do about a file the system refused (the message names the file).
_OS_FIXES = {
    errno.ENOSPC: "free space there, or point the data or run folder elsewhere",
    errno.EDQUOT: "free space there, or point the data or run folder elsewhere",
    errno.EACCES: "make it writable, or pick another folder (hydra.run.dir=..., data.data_dir=...)",
    errno.EPERM: "make it writable, or pick another folder (hydra.run.dir=..., data.data_dir=...)",
    errno.EROFS: "pick a folder on a writable disk (hydra.run.dir=..., data.data_dir=...)",
    errno.ENOENT: "check the path",
}


def _option_errors() -> tuple[type[BaseException], ...]:
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    return (ValueError, MisconfigurationException)


def user_message(err: BaseException, cpu_fix: str = "add trainer=cpu") -> str | None:
    """The one-line message for a user's mistake; None for a bug (shown with its traceback).
    `cpu_fix` is the override that runs on the CPU, named when a GPU is asked of a machine
    without one."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError) and err.filename and err.errno in _OS_FIXES:
        return f"{err.filename}: {err.strerror}; {_OS_FIXES[err.errno]}"
    if isinstance(err, FileNotFoundError | PermissionError):  # raised with our own message
        return str(err)
    if isinstance(err, _option_errors()):
        message = str(err)
        import torch

        if "gpu" in message.lower() and not torch.cuda.is_available():
            message += f" (this machine has no GPU: {cpu_fix})"
        return message
    return None


def tracebacks_wanted() -> bool:
    """HYDRA_FULL_ERROR=1, as the user set it (a command that sets it for Hydra keeps the user's
    choice in MRA_LRA_TRACEBACKS)."""
    return os.environ.get("MRA_LRA_TRACEBACKS", os.environ.get("HYDRA_FULL_ERROR")) == "1"


def print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


@contextmanager
def reported(cpu_fix: str = "add trainer=cpu") -> Iterator[None]:
    """Around a command's work: a user's mistake becomes one `error:` line and exit status 2;
    a bug propagates with its traceback."""
    try:
        yield
    except Exception as err:
        message = user_message(err, cpu_fix)
        if message is None or tracebacks_wanted():
            raise
        print_error(message)
        raise SystemExit(EXIT_USER_ERROR) from None


# Transitional, until eval.py uses `reported`.
CONFIG_ERRORS = (ValueError,)


def user_error(err: BaseException, user_errors: tuple, cpu_fix: str) -> str | None:
    return user_message(err, cpu_fix)
