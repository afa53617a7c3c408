"""Temporary folders of cache builds: removed after a killed build, never while in use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mra_lra.data.cache import (
    LOCK_NAME,
    STALE_AGE_SECONDS,
    building_dir,
    cache_dir,
    ensure_array_cache,
    remove_stale_temp_dirs,
)

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"task": "test", "n": 3}
KEY_PATTERN = r"[0-9a-f]{16}"


def build() -> dict[str, np.ndarray]:
    return {"train_label": np.arange(3, dtype=np.uint8)}


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_build_leaves_a_folder_that_the_next_build_removes(tmp_path) -> None:
    # A build killed hard (SIGKILL, the OOM killer) cannot clean up after itself.
    script = textwrap.dedent(
        f"""
        import sys, time
        from mra_lra.data.cache import ensure_array_cache
        def build():
            print("building", flush=True)
            time.sleep(60)
        ensure_array_cache({str(tmp_path)!r}, {OPTIONS!r}, build, "")
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "building\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (left,) = [p for p in tmp_path.iterdir()]
    assert left.name.startswith(f".tmp-{cache_dir(tmp_path, OPTIONS).name}-")
    assert (left / LOCK_NAME).exists()

    # Its lock is free now: the next build removes it at once, whatever its age.
    entry = ensure_array_cache(tmp_path, OPTIONS, build, "")
    assert list(tmp_path.iterdir()) == [entry]


def test_folder_in_use_is_kept(tmp_path) -> None:
    final = tmp_path / ("0" * 16)
    with building_dir(final) as tmp:
        age(tmp, 10 * STALE_AGE_SECONDS)
        assert remove_stale_temp_dirs(tmp_path, KEY_PATTERN, max_age=0) == []
        assert tmp.is_dir()
    assert list(tmp_path.iterdir()) == []


def test_unlocked_folder_is_removed_only_when_old(tmp_path) -> None:
    # As a build before the locks (or on a filesystem without flock) leaves it.
    old = tmp_path / ".tmp-0123456789abcdef-of8e183x"
    young = tmp_path / ".tmp-fedcba9876543210-a_b1c2d3"
    for folder in (old, young):
        folder.mkdir()
        (folder / "train_label.npy").write_bytes(b"")
    age(old, STALE_AGE_SECONDS + 60)
    assert remove_stale_temp_dirs(tmp_path, KEY_PATTERN) == [old]
    assert sorted(tmp_path.iterdir()) == [young]


def test_only_our_temporary_folders_are_touched(tmp_path) -> None:
    others = [
        tmp_path / ".tmp-not-a-key-of8e183x",  # another final name
        tmp_path / ".tmp-0123456789abcdef",  # no random part
        tmp_path / "0123456789abcdef",  # an entry
        tmp_path / ".cache-0123456789abcdef-of8e183x",
    ]
    for folder in others:
        folder.mkdir()
        age(folder, 10 * STALE_AGE_SECONDS)
    link = tmp_path / ".tmp-0123456789abcdef-linklink"
    link.symlink_to(others[0])
    (tmp_path / ".tmp-0123456789abcdef-filefile").write_text("")
    assert remove_stale_temp_dirs(tmp_path, KEY_PATTERN, max_age=0) == []
    assert len(list(tmp_path.iterdir())) == len(others) + 2


def test_failed_build_leaves_nothing(tmp_path) -> None:
    def failing() -> dict[str, np.ndarray]:
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        ensure_array_cache(tmp_path, OPTIONS, failing, "")
    assert list(tmp_path.iterdir()) == []
    entry = ensure_array_cache(tmp_path, OPTIONS, build, "")
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "train_label.npy"]
