"""How train.py and eval.py report a user's mistake: one `error:` line instead of a traceback."""

from __future__ import annotations

import torch
from hydra.errors import InstantiationException
from pytorch_lightning.utilities.exceptions import MisconfigurationException

# Bad option values: the project's checks raise ValueError naming the option and what it takes,
# and Lightning's MisconfigurationException names its own; printed with a pointer to the
# traceback in case the value error is a bug's.
CONFIG_ERRORS = (ValueError, MisconfigurationException)


def user_error(
    err: BaseException, user_errors: tuple[type[BaseException], ...], cpu_fix: str
) -> str | None:
    """The message for a user's mistake (None: a bug, shown with its traceback). `user_errors`
    are printed alone (their messages name the file and the fix); option-value errors, also when
    Hydra's instantiate wraps them, get the traceback pointer and, for a GPU asked of a machine
    without one, `cpu_fix` (the override that runs on the CPU)."""
    if isinstance(err, user_errors):
        return str(err)
    cause = err.__cause__ if isinstance(err, InstantiationException) else err
    if isinstance(cause, CONFIG_ERRORS):
        hint = ""
        if "gpu" in str(cause).lower() and not torch.cuda.is_available():
            hint = f" (this machine has no GPU: {cpu_fix})"
        return f"{cause}{hint}\n(HYDRA_FULL_ERROR=1 shows where it was raised)"
    return None
