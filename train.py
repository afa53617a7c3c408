"""Train one LRA task with one attention: `python train.py task=listops attn=mra`.

Any config value can be overridden on the command line (see README, "The command line").
Returns the optimised metric so that Hydra sweepers (Optuna) can use it.
"""

import difflib
import functools
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError
from pytorch_lightning.utilities import rank_zero_only

from mra_lra.data.sources import SourceError
from mra_lra.errors import CONFIG_ERRORS, user_error
from mra_lra.train import EnvVarError, RunFolderError, RunTerminated, run

log = logging.getLogger("train")

CONF = Path(__file__).resolve().parent / "conf"

# Missing, unreadable or truncated files and run folders, and environment variables with a value
# their reader rejects, are the user's to fix: their messages name the file or variable and the
# fix, so they are printed alone, without a traceback (HYDRA_FULL_ERROR=1 shows it).
USER_ERRORS = (FileNotFoundError, PermissionError, SourceError, RunFolderError, EnvVarError)


def _user_error(err: BaseException) -> str | None:
    """The one-line message for a user's mistake (None: a bug, shown with its traceback)."""
    return user_error(err, USER_ERRORS, cpu_fix="add trainer=cpu")


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# The sweep trials of this process that failed, in order: (trial folder, why). The Optuna
# sweeper keeps neither a trial's traceback nor why it returned no value; a sweep in which every
# trial failed is reported with the first of them (_explain_failed_sweeps).
_failed_trials: list[tuple[str, str]] = []


def _null_metric_reason(cfg: DictConfig, results: dict, metric: str) -> str:
    path = Path(cfg.paths.output_dir) / "results.json"
    why = ""
    if results.get("val_acc_best") is None:
        why = (
            f": no validation ran ({results.get('steps')} steps, trainer.val_check_interval="
            f"{cfg.trainer.val_check_interval})"
        )
    elif metric.startswith("test") and not cfg.test:
        why = ": test=false"
    return f"optimized_metric {metric} is null in {path}{why}"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = run(cfg)
    except (*USER_ERRORS, *CONFIG_ERRORS, InstantiationException) as err:
        message = _user_error(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            if _in_sweep():
                _record_failed_trial(cfg, err)
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunTerminated as stop:
        if rank_zero_only.rank == 0:
            print(f"error: {stop.message}", file=sys.stderr, flush=True)
        raise
    except Exception as err:
        if _in_sweep():
            _record_failed_trial(cfg, err)
        raise
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    value = results.get(metric.replace("/", "_"))
    if value is None and _in_sweep():
        reason = _null_metric_reason(cfg, results, metric)
        log.warning("%s; the sweeper counts this trial as failed", reason)
        _failed_trials.append((str(cfg.paths.output_dir), reason))
    return float(value) if value is not None else None


def _record_failed_trial(cfg: DictConfig, err: Exception) -> None:
    """Keep a failed trial's error, with its traceback in the trial's log (the sweeper keeps only
    the message)."""
    log.exception("this trial failed")
    first_line = (str(err).strip().splitlines() or [""])[0]
    _failed_trials.append((str(cfg.paths.output_dir), f"{type(err).__name__}: {first_line}"))


def _failed_sweep_message() -> str:
    if _failed_trials:
        folder, reason = _failed_trials[0]
        return (
            f"all {len(_failed_trials)} trials of the Optuna sweep failed, so it has no best "
            f"value; the first ({folder}) failed: {reason} (its log: {Path(folder) / 'train.log'})"
        )
    # Trials run elsewhere (a launcher such as submitit): their errors stay in their folders.
    return (
        "every trial of the Optuna sweep failed, so it has no best value; see the first trial's "
        "log (<hydra.sweep.dir>/0/train.log, or the launcher's own logs)"
    )


def _explain_failed_sweeps() -> None:
    """The Optuna sweeper ends a sweep whose every trial failed with a traceback ending in
    Optuna's "No trials are completed yet."; say instead that all trials failed and where the
    first one's error is (one line, exit 2; HYDRA_FULL_ERROR=1 keeps the traceback)."""
    try:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
    except ImportError:  # not installed: hparams_search=... then fails with Hydra's own message
        return
    sweep = OptunaSweeper.sweep

    @functools.wraps(sweep)
    def sweep_or_explain(self, arguments):
        try:
            return sweep(self, arguments)
        except ValueError as err:
            if (
                "No trials are completed" not in str(err)
                or os.environ.get("HYDRA_FULL_ERROR") == "1"
            ):
                raise
            print(f"error: {_failed_sweep_message()}", file=sys.stderr)
            raise SystemExit(2) from None

    OptunaSweeper.sweep = sweep_or_explain


def _unknown_key_message(argv: list[str]) -> str | None:
    """The error for a command line that overrides a key the config does not have (a typo such
    as trainer.max_step=5), naming the closest keys; None when the command line composes or fails
    for another reason (Hydra reports that itself).

    Hydra's own message advises +trainer.max_step=5, which would add a key that nothing reads
    (or, under trainer., an argument Lightning rejects); composing the config once more here (a
    fraction of a second) finds the key before Hydra does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    try:  # Hydra's own command-line parser (private): without it, Hydra reports everything
        from hydra._internal.utils import get_args_parser
    except ImportError:
        return None

    args, _ = get_args_parser().parse_known_args(argv)
    if args.config_path or args.config_dir or args.experimental_rerun or args.shell_completion:
        return None
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # a malformed override: Hydra reports it itself
        return None
    if any(o.is_sweep_override() for o in overrides):
        return None  # a sweep's keys can depend on the values it sweeps (attn=mra,nystrom)
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            compose(args.config_name or "train", overrides=args.overrides)
        return None
    except ConfigCompositionException as err:
        cause = err.__cause__
    except Exception:  # any other failure is for Hydra to report
        return None
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or cause.parent_node is None:
        return None
    key = cause.full_key
    parent, _, _ = key.rpartition(".")
    names = list(cause.parent_node.keys())
    if not parent:  # the top level: its keys and the config groups (experiment=, debug=, ...)
        names += [p.name for p in CONF.iterdir() if p.is_dir() and p.name not in names]
        if not key.startswith("hydra"):
            names = [name for name in names if name != "hydra"]
    names = [str(name) for name in names]
    close = difflib.get_close_matches(key.rpartition(".")[2], names, n=3)
    if close:
        hint = f"did you mean {' or '.join(f'{parent}.{n}' if parent else n for n in close)}?"
    else:
        hint = f"{parent or 'the top level'} has {', '.join(names)}"
    return (
        f"{key} is not a key of the config; {hint} (to add a key the config leaves out, such as "
        "another Trainer argument, prefix it with +)"
    )


def _check_override_keys(argv: list[str]) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    message = _unknown_key_message(argv)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    _check_override_keys(sys.argv[1:])
    _explain_failed_sweeps()
    main()
