"""Temporary folders of cache builds: removed after a killed build, never while in use; damaged
entries are named, never trusted nor deleted."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from mra_lra.data import cache
from mra_lra.data.cache import (
    LOCK_NAME,
    STALE_AGE_SECONDS,
    building_dir,
    cache_dir,
    ensure_array_cache,
    find_array_cache,
    load_arrays,
    remove_stale_temp_dirs,
)
from mra_lra.data.sources import SourceError

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


def _cut(path: Path, size: int) -> None:
    os.truncate(path, size)


def _npz(path: Path) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.arange(3))
    path.write_bytes(buffer.getvalue())


DAMAGES = {
    "data_cut": lambda f: _cut(f, f.stat().st_size - 1),
    "header_cut": lambda f: _cut(f, 40),
    "empty": lambda f: _cut(f, 0),
    "not_npy": lambda f: f.write_bytes(b"hello world" * 20),
    "npz": _npz,
    "other_array": lambda f: np.save(f, np.arange(5)),
    "missing": lambda f: f.unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_array_is_named_never_trusted_nor_deleted(tmp_path, damage: str) -> None:
    entry = ensure_array_cache(tmp_path, OPTIONS, build, "")
    array = entry / "train_label.npy"
    DAMAGES[damage](array)
    before = sorted(p.name for p in entry.iterdir())
    for load in (
        lambda: ensure_array_cache(tmp_path, OPTIONS, build, ""),  # prepare
        lambda: load_arrays(find_array_cache(tmp_path, OPTIONS, "")),  # setup
    ):
        with pytest.raises(SourceError) as err:
            load()
        message = str(err.value)
        assert message.startswith(f"the cache entry {entry} is damaged: {array} ")
        assert f"Delete the folder {entry} and run again" in message
    assert sorted(p.name for p in entry.iterdir()) == before  # nothing deleted


@pytest.mark.parametrize("content", ['{"key": "0123', "[1, 2]", "\udcff"])
def test_damaged_manifest_is_named(tmp_path, content: str) -> None:
    entry = ensure_array_cache(tmp_path, OPTIONS, build, "")
    manifest = entry / "manifest.json"
    manifest.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(SourceError, match=f"the cache entry {entry} is damaged: {manifest} "):
        ensure_array_cache(tmp_path, OPTIONS, build, "")
    assert manifest.exists()


def test_folder_not_of_this_code_is_a_source_error(tmp_path) -> None:
    # A SourceError (not a bare RuntimeError): train.py prints it as one line.
    cache_dir(tmp_path, OPTIONS).mkdir()
    with pytest.raises(SourceError, match="has no manifest.json"):
        ensure_array_cache(tmp_path, OPTIONS, build, "")


def test_arrays_are_on_disk_before_the_entry_is_renamed_into_place(tmp_path, monkeypatch) -> None:
    """A crash after the rename must not leave truncated arrays under a complete entry."""
    synced = set()
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def checking_commit(tmp: Path, final: Path) -> None:
        files = [p for p in tmp.iterdir() if p.suffix in (".npy", ".json")]
        assert files and {p.stat().st_ino for p in files} <= synced
        commit(tmp, final)

    commit = cache.commit_dir
    monkeypatch.setattr(cache.os, "fsync", recording_fsync)
    monkeypatch.setattr(cache, "commit_dir", checking_commit)
    entry = ensure_array_cache(tmp_path, OPTIONS, build, "")
    assert load_arrays(entry)["train_label"].tolist() == [0, 1, 2]


def test_interrupted_array_write_leaves_nothing_trusted(tmp_path, monkeypatch) -> None:
    def two_arrays() -> dict[str, np.ndarray]:
        return {"train_input_ids": np.ones((4, 8), np.uint8), "train_label": np.zeros(4, np.uint8)}

    def cut_save(file, array) -> None:
        if isinstance(file, (str, os.PathLike)):
            Path(file).write_bytes(b"\x93NUMPY")
        else:
            file.write(b"\x93NUMPY")
        raise KeyboardInterrupt  # Ctrl-C after a partial file

    monkeypatch.setattr(cache.np, "save", cut_save)
    with pytest.raises(KeyboardInterrupt):
        ensure_array_cache(tmp_path, OPTIONS, two_arrays, "")
    assert list(tmp_path.iterdir()) == []  # no entry, no temporary folder
    with pytest.raises(FileNotFoundError, match="no cached arrays"):
        find_array_cache(tmp_path, OPTIONS, "")
    monkeypatch.undo()
    entry = ensure_array_cache(tmp_path, OPTIONS, two_arrays, "")
    assert load_arrays(entry)["train_input_ids"].shape == (4, 8)
