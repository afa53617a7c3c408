"""A run folder's lifecycle: refuse a start that would overwrite a run, keep a second process out
while one trains, leave nothing behind from a start that fails before training, and resume a
run from its checkpoint alone with the settings it was started with."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from mra_lra.callbacks import checkpoint_step
from mra_lra.errors import RunFolderError

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

log = logging.getLogger(__name__)

# What a run folder holds once a run has started training in it.
RUN_OUTPUTS = ("results.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt")
LOCK_NAME = ".lock"
# The command-line overrides a run was started with (Hydra's name for the file).
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
LOG_NAME = "train.log"


def check_run_folder(ckpt_path: str | None, out_dir: Path) -> None:
    """Refuse to start afresh over a run (its checkpoints, config.yaml and results.json would be
    replaced) and a ckpt_path that is a folder or not a checkpoint file."""
    if not ckpt_path:
        found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
        if found:
            raise RunFolderError(
                f"{out_dir} already holds a run ({', '.join(found)}); starting again there would "
                f"overwrite it. To resume it pass ckpt_path={out_dir / 'checkpoints' / 'last.ckpt'}"
                "; to start a new run pick another hydra.run.dir (hydra.sweep.dir with -m, "
                "REPRO_DIR for make reproduce), or delete that folder."
            )
        return
    path = Path(ckpt_path)
    if path.is_dir():
        raise RunFolderError(
            f"ckpt_path={path} is a folder; pass a checkpoint file, e.g. "
            f"ckpt_path={path / 'checkpoints' / 'last.ckpt'}"
        )
    if not path.is_file():
        raise RunFolderError(f"ckpt_path={path}: no such file; pass a run's checkpoints/last.ckpt")
    try:
        checkpoint_step(path)
    except Exception:
        raise RunFolderError(
            f"ckpt_path={path} is not a training checkpoint (torch.load cannot read it, or it "
            "holds no global_step); pass a run's checkpoints/last.ckpt or checkpoints/best.ckpt"
        ) from None


def warn_if_resumed_elsewhere(ckpt_path: str | None, out_dir: Path) -> None:
    """A run resumed into a new folder starts that folder's best.ckpt and metrics afresh, while
    val/acc_best continues from the checkpoint: the two can then name different validations."""
    if not ckpt_path:
        return
    home = Path(ckpt_path).resolve().parent.parent  # <run folder>/checkpoints/<name>.ckpt
    if home != out_dir.resolve():
        log.warning(
            "resuming from %s into another folder (%s): its best.ckpt and metrics start here, "
            "while val/acc_best carries on from the checkpoint. To continue that run, pass "
            "ckpt_path alone (its folder, settings and overrides are the run's own)",
            ckpt_path,
            out_dir,
        )


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the folder's lock file while training in it. The lock is the kernel's (flock): a
    killed process releases it, so a stale lock file is simply taken over."""
    if fcntl is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"{out_dir} is in use: another process is training there ({LOCK_NAME} is "
                "locked); wait for it to end or pick another hydra.run.dir"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


class StartGuard:
    """Until `training` is set, a failure undoes what the start wrote in the folder: what it
    created is removed (train.log of a new folder is kept, holding the error) and train.log of an
    existing folder is cut back to its former length."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.existed = out_dir.exists()
        self.before = {p: p.stat().st_size for p in out_dir.rglob("*")} if out_dir.is_dir() else {}
        self.new_folder = not any(p.name != LOG_NAME for p in self.before)
        self.training = False

    def undo(self) -> None:
        if self.training or not self.out_dir.is_dir():
            return
        logfile = self.out_dir / LOG_NAME
        for path in sorted(self.out_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path in self.before or path == logfile:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if logfile in self.before and logfile.is_file():
            os.truncate(logfile, self.before[logfile])
        if not self.existed and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()


def resume_arguments(argv: Sequence[str]) -> list[str]:
    """`train.py ckpt_path=R/checkpoints/last.ckpt [key=value ...]`: run R's own command-line
    overrides, then the ones given (which win), in R. Any other command line is returned as it
    is (flags, a sweep, or hydra.run.dir given: the user chose)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not argv or any(arg.startswith("-") for arg in argv):
        return list(argv)
    try:
        given = OverridesParser.create().parse_overrides(list(argv))
    except Exception:  # malformed: Hydra reports it
        return list(argv)
    keys = {o.key_or_group for o in given}
    ckpt = next((o.value() for o in given if o.key_or_group == "ckpt_path"), None)
    sweep = any(o.is_sweep_override() for o in given)
    if not isinstance(ckpt, str) or "hydra.run.dir" in keys or sweep:
        return list(argv)
    run_dir = Path(ckpt).parent.parent
    saved_file = run_dir / OVERRIDES_FILE
    if Path(ckpt).parent.name != "checkpoints" or not saved_file.is_file():
        return list(argv)
    saved = OverridesParser.create().parse_overrides(yaml.safe_load(saved_file.read_text()) or [])
    kept = [o.input_line for o in saved if o.key_or_group not in keys | {"ckpt_path"}]
    extra = [arg for arg in argv if not arg.startswith("ckpt_path=")]
    print(
        f"resuming the run in {run_dir} with its own settings"
        + (f"; changed on top: {' '.join(extra)}" if extra else ""),
        flush=True,
    )
    return [*kept, *argv, f"hydra.run.dir={run_dir}"]
