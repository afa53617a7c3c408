"""Train one LRA task with one attention: `python train.py task=listops attn=mra`.

Any config value can be overridden on the command line (see README, "The command line").
Returns the optimised metric so that Hydra sweepers (Optuna) can use it.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from mra_lra.data.sources import SourceError
from mra_lra.train import run

# Missing, unreadable or truncated files are the user's to fix: their messages name the file and
# the fix, so they are printed alone, without a traceback (HYDRA_FULL_ERROR=1 shows it).
USER_ERRORS = (FileNotFoundError, PermissionError, SourceError)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    value = results.get(metric.replace("/", "_"))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
