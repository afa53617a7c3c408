"""Train one LRA task with one attention: `python train.py task=listops attn=mra`.

Any config value can be overridden on the command line (see README, "The command line").
Returns the optimised metric so that Hydra sweepers (Optuna) can use it.
"""

import os
import sys

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from mra_lra.data.sources import SourceError
from mra_lra.train import RunFolderError, run

# Missing, unreadable or truncated files and run folders are the user's to fix: their messages
# name the file and the fix, so they are printed alone, without a traceback (HYDRA_FULL_ERROR=1
# shows it).
USER_ERRORS = (FileNotFoundError, PermissionError, SourceError, RunFolderError)


# Bad option values: the project's checks raise ValueError naming the option and what it takes,
# and Lightning's MisconfigurationException names its own; printed the same way, with a pointer
# to the traceback in case the value error is a bug's.
CONFIG_ERRORS = (ValueError, MisconfigurationException)


def _hint(err: BaseException) -> str:
    if "gpu" in str(err).lower() and not torch.cuda.is_available():
        return " (this machine has no GPU: add trainer=cpu)"
    return ""


def _user_error(err: BaseException) -> str | None:
    """The one-line message for a user's mistake (None: a bug, shown with its traceback)."""
    if isinstance(err, USER_ERRORS):
        return str(err)
    # Hydra wraps what a config's target raised: report that.
    cause = err.__cause__ if isinstance(err, InstantiationException) else err
    if isinstance(cause, CONFIG_ERRORS):
        return f"{cause}{_hint(cause)}\n(HYDRA_FULL_ERROR=1 shows where it was raised)"
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except (*USER_ERRORS, *CONFIG_ERRORS, InstantiationException) as err:
        message = _user_error(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    value = results.get(metric.replace("/", "_"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
