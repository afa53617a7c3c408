"""Loggers of a run: wandb works without an account (offline unless the user logged in), and a
resumed run continues its wandb run."""

from __future__ import annotations

import configparser
import contextlib
import logging
import netrc
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from mra_lra.errors import EnvVarError
from mra_lra.utils import atomic_write_text

log = logging.getLogger(__name__)


def _wandb_settings() -> dict[str, str]:
    """The [default] section of wandb's settings files: the global one (`wandb login --host`,
    `wandb enabled`) and the one in ./wandb (`wandb offline` typed in this directory)."""
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read([config_dir.expanduser() / "settings", Path("wandb") / "settings"])
    return dict(parser["default"]) if parser.has_section("default") else {}


def _wandb_logged_in(settings: dict[str, str]) -> bool:
    """Whether wandb would find credentials: the environment, its settings, or a netrc entry for
    its host (`wandb login` writes one to ~/.netrc, or to $NETRC)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if settings.get("api_key"):
        return True
    base_url = (
        os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or "https://api.wandb.ai"
    )
    host = urlsplit(base_url).netloc
    # wandb's own order: $NETRC alone when set, else ~/.netrc, else ~/_netrc.
    if os.environ.get("NETRC"):
        paths = [Path(os.environ["NETRC"]).expanduser()]
    else:
        paths = [Path.home() / ".netrc", Path.home() / "_netrc"]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return False
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False  # wandb itself ignores an unreadable netrc, with a warning


# The values wandb's settings take for their mode (WANDB_MODE).
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def wandb_mode_default() -> None:
    """wandb works without an account: a mode the user chose (WANDB_MODE, `wandb offline`) is
    kept; with no credentials, WANDB_MODE=offline, so wandb.init neither prompts nor waits on the
    network (`wandb sync <run dir>/wandb/offline-run-*` uploads later). A WANDB_MODE wandb would
    reject with an error naming neither the variable nor the fix is an EnvVarError."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        if mode not in WANDB_MODES:
            others = WANDB_MODES[3:]
            raise EnvVarError(
                f"WANDB_MODE={mode!r} is not a wandb mode: set it to online, offline or disabled"
                f" (wandb also takes {', '.join(others)}), or unset it (then offline unless you"
                " are logged in to wandb)"
            )
        return
    settings = _wandb_settings()
    if settings.get("mode") or _wandb_logged_in(settings):
        return
    os.environ["WANDB_MODE"] = "offline"


# A run folder's wandb run id, so that a resumed run continues the same wandb run.
WANDB_ID_FILE = "wandb_run_id"


def make_logger(logger_cfg: DictConfig, cfg: DictConfig, out_dir: Path) -> pl.loggers.Logger:
    """Instantiate one logger. A wandb run resumed into its own folder (ckpt_path set, and the
    folder holds the id its first start wrote) continues that wandb run, unless the logger's
    config names an id itself; rank 0 writes the id of each new run."""
    is_wandb = str(logger_cfg.get("_target_", "")).endswith("WandbLogger")
    id_file = out_dir / WANDB_ID_FILE
    kwargs = {}
    if is_wandb and cfg.get("ckpt_path") and not logger_cfg.get("id") and id_file.is_file():
        kwargs["id"] = id_file.read_text().strip()
        log.info("resuming wandb run %s (from %s)", kwargs["id"], id_file)
    logger = hydra.utils.instantiate(logger_cfg, **kwargs)
    if is_wandb and getattr(logger, "_wandb_init", {}).get("anonymous", 0) is None:
        # Lightning 2.6 passes anonymous=None, which wandb >= 0.19 warns about at every start.
        del logger._wandb_init["anonymous"]
    if is_wandb and rank_zero_only.rank == 0:
        atomic_write_text(id_file, logger.experiment.id + "\n")
    return logger


class _OncePerRun(logging.Filter):
    """Lets each warning through once per run (a datamodule set up for fit and again for test
    repeats its own), and no third-party advertising (Lightning's litlogger tip)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "litlogger" in message:
            return False
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, message)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def quiet_console() -> Iterator[None]:
    """Around a run: every warning once on each log handler, no adverts or deprecations that
    are a library's own business."""
    rank_zero_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    added = [
        (handler, _OncePerRun())
        for handler in [*logging.getLogger().handlers, *rank_zero_log.handlers, rank_zero_log]
    ]
    for handler, once in added:
        handler.addFilter(once)
    try:
        with warnings.catch_warnings():
            # Lightning 2.6 on torch >= 2.10: a deprecation inside Lightning, nothing to act on.
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            yield
    finally:
        for handler, once in added:
            handler.removeFilter(once)
