"""`python -m mra_lra.data.prepare`: the same cache the training run reads, errors, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def test_prepare_builds_the_cache_training_reads(tmp_path, compose_cfg, capsys) -> None:
    assert prepare.main(["task=listops", f"data.data_dir={tmp_path}", *TINY_LISTOPS]) == 0
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
    with pytest.raises(KeyboardInterrupt):
        prepare.main(["task=listops", f"data.data_dir={tmp_path}", *TINY_LISTOPS])
    # Nothing a later run would trust: no entry, no temporary folder left behind.
    assert cache_entries(tmp_path, "listops", hidden=True) == []
    monkeypatch.setattr(listops, "tokenise_split", tokenise)
    assert prepare.main(["task=listops", f"data.data_dir={tmp_path}", *TINY_LISTOPS]) == 0
    (entry,) = cache_entries(tmp_path, "listops", hidden=True)
    assert (entry / "manifest.json").is_file()


def test_source_that_does_not_exist_names_it(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "lra_release.gz"
    with pytest.raises(SystemExit, match=f"listops: source={missing} does not exist"):
        prepare.main(["task=listops", f"data.data_dir={tmp_path}", f"source={missing}"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "say which task"),
        (["task=imagenet"], "unknown task 'imagenet'"),
        (["listops"], "not key=value"),
    ],
)
def test_bad_arguments_say_what_to_do(argv, message) -> None:
    with pytest.raises(SystemExit, match=message):
        prepare.main(argv)


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


def test_source_given_once_is_remembered_for_that_data_dir(tmp_path, compose_cfg) -> None:
    # The release somewhere else (a nested lra_release/ folder, as users extract it).
    from tests.data.test_listops_datamodule import write_release

    elsewhere = tmp_path / "downloads"
    write_release(elsewhere / "lra_release")
    data_dir = tmp_path / "data"
    assert prepare.main(["task=listops", f"data.data_dir={data_dir}", f"source={elsewhere}"]) == 0
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


def test_prepare_all_reads_every_task_from_release_shaped_files(tmp_path, capsys) -> None:
    """One data folder holding every task's files as users hold them: `task=all` caches each,
    reading what is there (nothing generated), and a second run builds nothing."""
    from tests.data import test_image, test_pathfinder, test_retrieval, test_text
    from tests.data.test_listops_datamodule import write_release

    data_dir = tmp_path / "data"
    write_release(data_dir)
    test_retrieval.write_tsv_data(data_dir / "lra_release" / "tsv_data")
    for side in (32, 128):
        test_pathfinder.write_tree(
            data_dir / "lra_release", test_pathfinder.release_files(side=side), side=side
        )
    test_text.write_aclimdb(data_dir)
    test_image.write_archive(data_dir / "cifar-10-python.tar.gz")

    assert prepare.main(["task=all", f"data.data_dir={data_dir}"]) == 0
    out = capsys.readouterr().out
    tasks = ["image", "listops", "pathfinder", "pathx", "retrieval", "text"]
    assert tasks == prepare.task_names()
    built = {}
    for task in tasks:
        (entry,) = cache_entries(data_dir, task, hidden=True)
        assert f"{task}: ready, cached arrays in {entry}" in out
        built[task] = (entry, (entry / "manifest.json").stat().st_mtime_ns)
    assert not (data_dir / "generated").exists()
    # Pathfinder and Path-X: the 20 fixture images, split 16 / 2 / 2.
    for task in ("pathfinder", "pathx"):
        entry = built[task][0]
        sizes = [len(np.load(entry / f"{s}_label.npy")) for s in ("train", "val", "test")]
        assert sizes == [16, 2, 2]

    assert prepare.main(["task=all", f"data.data_dir={data_dir}"]) == 0
    for task in tasks:
        (entry,) = cache_entries(data_dir, task, hidden=True)
        assert (entry, (entry / "manifest.json").stat().st_mtime_ns) == built[task]
