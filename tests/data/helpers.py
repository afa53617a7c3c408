"""Helpers shared by the data tests."""

from __future__ import annotations

from pathlib import Path


def cache_entries(data_dir: Path, task: str, hidden: bool = False) -> list[Path]:
    """The entries under <data_dir>/cache/<task>/, sorted; `hidden=True` also lists dot-folders
    (the temporary ones an interrupted build would leave)."""
    root = data_dir / "cache" / task
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if hidden or not p.name.startswith("."))


def ready(dm):
    """A datamodule after prepare_data() and setup("fit"), as the Trainer leaves it."""
    dm.prepare_data()
    dm.setup("fit")
    return dm


# Three training steps on CPU with one validation and no logger: the data tests' end-to-end runs.
THREE_CPU_STEPS = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "scheduler.warmup_steps=2",
    "logger=none",
]
