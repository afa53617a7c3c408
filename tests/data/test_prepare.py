"""`python -m mra_lra.data.prepare`: the same cache the training run reads, errors, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from mra_lra.data import listops, prepare
from tests.data.helpers import cache_entries

ROOT = Path(__file__).resolve().parents[2]
TINY_LISTOPS = [
    "data.num_train=12",
    "data.num_val=4",
    "data.num_test=4",
    "data.gen_min_length=5",
    "data.gen_max_length=40",
    "data.max_length=48",
]
TASKS = ["image", "listops", "pathfinder", "pathx", "retrieval", "text"]


@pytest.fixture(autouse=True)
def _user_errors_as_one_line(monkeypatch):
    """As a user runs it: without HYDRA_FULL_ERROR (which tests/conftest.py sets)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("MRA_LRA_TRACEBACKS", raising=False)


def prepare_main(monkeypatch, *args) -> int:
    """The exit status of `python -m mra_lra.data.prepare <args>`, run in this process."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["prepare", *map(str, args)])
    try:
        prepare.main()
    except SystemExit as stop:
        return stop.code
    finally:
        GlobalHydra.instance().clear()
    return 0


def test_prepare_builds_the_cache_training_reads(tmp_path, compose_cfg, capsys, monkeypatch):
    args = ["task=listops", f"data.data_dir={tmp_path}", *TINY_LISTOPS]
    assert prepare_main(monkeypatch, *args) == 0
    (entry,) = cache_entries(tmp_path, "listops", hidden=True)
    assert f"listops: ready, cached arrays in {entry}" in capsys.readouterr().out
    labels = np.load(entry / "train_label.npy")
    assert len(labels) == 12

    # The training config with the same overrides finds that entry without building anything.
    import hydra

    cfg = compose_cfg(["task=listops", *TINY_LISTOPS], data_dir=tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    assert datamodule.datasets["train"].entry == entry


def test_interrupted_preparation_leaves_nothing_and_resumes(tmp_path, monkeypatch) -> None:
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # after one split is tokenised, as if the user pressed Ctrl-C
            raise KeyboardInterrupt
        return tokenise(*args, **kwargs)

    tokenise = listops.tokenise_split
    monkeypatch.setattr(listops, "tokenise_split", interrupted)
    args = ["task=listops", f"data.data_dir={tmp_path}", *TINY_LISTOPS]
    with pytest.raises(KeyboardInterrupt):
        prepare_main(monkeypatch, *args)
    # Nothing a later run would trust: no entry, no temporary folder left behind.
    assert cache_entries(tmp_path, "listops", hidden=True) == []
    monkeypatch.setattr(listops, "tokenise_split", tokenise)
    assert prepare_main(monkeypatch, *args) == 0
    (entry,) = cache_entries(tmp_path, "listops", hidden=True)
    assert (entry / "manifest.json").is_file()


def test_source_that_does_not_exist_names_it(tmp_path, capsys, monkeypatch) -> None:
    missing = tmp_path / "nowhere" / "lra_release.gz"
    args = ["task=listops", f"data.data_dir={tmp_path}", f"source={missing}"]
    assert prepare_main(monkeypatch, *args) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["task=imagenet"], ["listops"]])
def test_bad_arguments_name_it(argv, capsys, monkeypatch) -> None:
    assert prepare_main(monkeypatch, *argv) == 1  # Hydra's own error
    assert argv[0].rpartition("=")[2] in capsys.readouterr().err


def test_command_line_entry_point(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mra_lra.data.prepare",
            "task=listops",
            f"data.data_dir={tmp_path}",
            *TINY_LISTOPS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "listops: ready" in result.stdout


def test_source_given_once_is_remembered_for_that_data_dir(tmp_path, compose_cfg, monkeypatch):
    # The release somewhere else (a nested lra_release/ folder, as users extract it).
    from tests.data.test_listops_datamodule import write_release

    elsewhere = tmp_path / "downloads"
    write_release(elsewhere / "lra_release")
    data_dir = tmp_path / "data"
    args = ["task=listops", f"data.data_dir={data_dir}", f"source={elsewhere}"]
    assert prepare_main(monkeypatch, *args) == 0
    assert not (data_dir / "lra_release").exists()  # read in place, not copied or generated

    # A later run without source= reads the same files (nothing generated, same cache entry).
    import hydra

    cfg = compose_cfg(["task=listops", "data.max_length=2048"], data_dir=data_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    assert datamodule.source == elsewhere.resolve()
    datamodule.prepare_data()
    datamodule.setup()
    assert not (data_dir / "lra_release").exists()
    assert len(datamodule.datasets["train"]) == 4  # the release fixture's four rows

    # If the recorded source disappears, the usual lookup takes over with a warning.
    import shutil

    shutil.rmtree(elsewhere)
    assert hydra.utils.instantiate(cfg.data).source is None


def test_prepare_every_task_reads_release_shaped_files(tmp_path, capsys, monkeypatch) -> None:
    """One data folder holding every task's files as users hold them: `-m` caches each, reading
    what is there (nothing generated). A task whose files are missing is named, with exit status
    2, and the others are prepared; a second run builds only what was missing."""
    from tests.data import test_image, test_pathfinder, test_retrieval, test_text
    from tests.data.test_listops_datamodule import write_release

    data_dir = tmp_path / "data"
    write_release(data_dir)
    test_retrieval.write_tsv_data(data_dir / "lra_release" / "tsv_data")
    for side in (32, 128):
        test_pathfinder.write_tree(
            data_dir / "lra_release", test_pathfinder.release_files(side=side), side=side
        )
    test_image.write_archive(data_dir / "cifar-10-python.tar.gz")

    assert prepare_main(monkeypatch, "-m", f"data.data_dir={data_dir}") == 2
    assert "not prepared: text" in capsys.readouterr().err
    assert cache_entries(data_dir, "text", hidden=True) == []
    built = {}
    for task in TASKS[:-1]:
        (entry,) = cache_entries(data_dir, task, hidden=True)
        built[task] = (entry, (entry / "manifest.json").stat().st_mtime_ns)
    assert not (data_dir / "generated").exists()
    # Pathfinder and Path-X: the 20 fixture images, split 16 / 2 / 2.
    for task in ("pathfinder", "pathx"):
        entry = built[task][0]
        sizes = [len(np.load(entry / f"{s}_label.npy")) for s in ("train", "val", "test")]
        assert sizes == [16, 2, 2]

    test_text.write_aclimdb(data_dir)
    assert prepare_main(monkeypatch, "-m", f"data.data_dir={data_dir}") == 0
    out = capsys.readouterr().out
    for task in TASKS:
        (entry,) = cache_entries(data_dir, task, hidden=True)
        assert f"{task}: ready, cached arrays in {entry}" in out
    for task in TASKS[:-1]:
        (entry,) = cache_entries(data_dir, task, hidden=True)
        assert (entry, (entry / "manifest.json").stat().st_mtime_ns) == built[task]
