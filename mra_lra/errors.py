"""One way for every command to report a user's mistake: one `error:` line and exit status 2.

A `UserError` (or a subclass) is raised wherever the code can name what is wrong and the fix. A
few exceptions from elsewhere count as the user's too: a missing or unwritable file, a full disk,
and a bad option value (a `ValueError` from an option check, Lightning's
`MisconfigurationException`, either wrapped by Hydra's `instantiate`). Anything else is a bug and
keeps its traceback. HYDRA_FULL_ERROR=1 shows the traceback of a user error too.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError
from pytorch_lightning.utilities.exceptions import MisconfigurationException

log = logging.getLogger(__name__)


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
    if isinstance(err, ValueError | MisconfigurationException):
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


class FailedJobs(Callback):
    """Hydra callback (hydra.callbacks in conf/train.yaml): a failed job of a multirun (a sweep
    trial) logs its error in its own log (with the traceback, when it is a bug) and prints one
    line; when the multirun ends on failures, `run_app` names the first."""

    failures: list[tuple[str, str]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or job_return.hydra_cfg is None:
            return
        hydra_cfg = job_return.hydra_cfg.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        try:
            job_return.return_value  # noqa: B018 (raises the trial's error)
        except Exception as err:
            message = user_message(err)
            if message is None:
                log.error("this trial failed", exc_info=err)
                message = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            else:
                log.error("error: %s", message)
            folder = hydra_cfg.runtime.output_dir
            FailedJobs.failures.append((folder, message))
            print_error(f"trial {hydra_cfg.job.num} ({folder}) failed: {message}")


def composition_message(err: Exception) -> str | None:
    """One line for a command line that does not compose: a misspelt key names the closest keys
    (Hydra's advice, +key=value, would add a key nothing reads), a missing option the closest
    options."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(name, err.options, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (
            f"{group}={name} is not an option of {group}; {hint}({group}: {', '.join(err.options)})"
        )
    if not isinstance(err, ConfigCompositionException):
        return None
    cause = err.__cause__
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or cause.parent_node is None:
        return str(err).strip().splitlines()[0]
    key = cause.full_key
    parent = key.rpartition(".")[0]
    names = [str(name) for name in cause.parent_node.keys()]
    if not parent:  # the top level: its keys and the config groups (experiment=, debug=, ...)
        from mra_lra.utils import CONF_DIR

        names += [p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in names]
        names = [n for n in names if n != "hydra" and not n.startswith("_")]
    close = difflib.get_close_matches(key.rpartition(".")[2], names, n=3)
    if close:
        hint = f"did you mean {' or '.join(f'{parent}.{n}' if parent else n for n in close)}?"
    else:
        hint = f"{parent or 'the top level'} has {', '.join(names)}"
    return (
        f"{key} is not a key of the config; {hint} (to add a key the config leaves out, such as "
        "another Trainer argument, prefix it with +)"
    )


def run_app(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` app (train, eval, prepare): Hydra raises its errors here instead of
    printing a trimmed traceback, and a mistake this module can name (a misspelt key or option,
    a user error, failed sweep trials) becomes one `error:` line with exit status 2.
    HYDRA_FULL_ERROR=1 shows tracebacks instead."""
    FailedJobs.failures.clear()
    os.environ.setdefault("MRA_LRA_TRACEBACKS", "1" if tracebacks_wanted() else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        if tracebacks_wanted():
            raise
        message = composition_message(err) or user_message(err)
        if FailedJobs.failures:
            folder, reason = FailedJobs.failures[0]
            message = (
                f"{len(FailedJobs.failures)} job(s) of the multirun failed; the first ({folder})"
                f" failed: {reason} (its log: {Path(folder) / 'train.log'})"
            )
        if message is None:
            raise
        print_error(message)
        raise SystemExit(EXIT_USER_ERROR) from None
