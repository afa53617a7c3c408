"""ListOps files, tokeniser, cache and datamodule on small release-format fixtures."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from mra_lra.data import listops, listops_generator
from mra_lra.data.cache import cache_key
from mra_lra.data.listops import ListOpsDataModule, ensure_listops_files, parse_listops_tsv
from mra_lra.data.listops_generator import write_listops_files
from mra_lra.data.sources import SourceError
from tests.data.helpers import cache_entries

# Hand-written rows with hand-computed labels and token ids (pad 0, digit d -> d + 1,
# [MIN 11, [MAX 12, [MED 13, [SM 14, ] 15).
ROWS = {
    "train": [
        ("( ( ( [MAX 2 ) 9 ) ] )", 9),
        ("( ( ( ( ( [MED 1 ) 2 ) 3 ) 4 ) ] )", 2),
        ("( ( ( [SM 5 ) 7 ) ] )", 2),
        ("( ( ( ( [MIN 3 ) ( ( ( [MAX 1 ) 8 ) ] ) ) 5 ) ] )", 3),
    ],
    "val": [("( ( ( [MIN 4 ) 7 ) ] )", 4), ("6", 6)],
    "test": [("( ( ( ( [MED 9 ) ( ( ( [SM 4 ) 4 ) ] ) ) 1 ) ] )", 8)],
}
IDS = {
    "( ( ( [MAX 2 ) 9 ) ] )": [12, 3, 10, 15],
    "( ( ( [MIN 4 ) 7 ) ] )": [11, 5, 8, 15],
    "6": [7],
    "( ( ( ( [MED 9 ) ( ( ( [SM 4 ) 4 ) ] ) ) 1 ) ] )": [13, 10, 14, 5, 5, 15, 2, 15],
}
GEN = {"num_train": 6, "num_val": 2, "num_test": 2, "min_length": 5, "max_length": 40, "seed": 0}


def write_release(data_dir: Path, rows: dict = ROWS, splits=("train", "val", "test")) -> Path:
    directory = data_dir / "lra_release" / "listops-1000"
    directory.mkdir(parents=True, exist_ok=True)
    for split in splits:
        lines = ["Source\tTarget"] + [f"{s}\t{t}" for s, t in rows[split]]
        (directory / f"basic_{split}.tsv").write_text("\n".join(lines) + "\n")
    return directory


def make_dm(data_dir: Path, max_length: int = 16, **overrides) -> ListOpsDataModule:
    args = dict(
        data_dir=str(data_dir),
        batch_size=2,
        max_length=max_length,
        num_workers=0,
        num_train=GEN["num_train"],
        num_val=GEN["num_val"],
        num_test=GEN["num_test"],
        gen_min_length=GEN["min_length"],
        gen_max_length=GEN["max_length"],
        seed=GEN["seed"],
        gen_workers=1,
    )
    return ListOpsDataModule(**{**args, **overrides})


def test_release_files_as_batches(tmp_path) -> None:
    write_release(tmp_path)
    dm = make_dm(tmp_path)
    assert (dm.num_classes, dm.vocab_size) == (10, 16)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "mask", "label"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 16)
    assert batch["mask"].dtype == torch.float32 and batch["mask"].shape == (2, 16)
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [4, 6]
    for row, (source, _) in enumerate(ROWS["val"]):
        ids = IDS[source]
        assert batch["input_ids"][row].tolist() == ids + [0] * (16 - len(ids))
        assert batch["mask"][row].tolist() == [1.0] * len(ids) + [0.0] * (16 - len(ids))
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["input_ids"][0, :8].tolist() == IDS[ROWS["test"][0][0]]
    assert test_batch["label"].tolist() == [8]


def test_train_loader_shuffles_val_does_not(tmp_path) -> None:
    rows = {**ROWS, "train": [(str(d), d) for d in range(10)] * 3}
    write_release(tmp_path, rows)
    dm = make_dm(tmp_path, batch_size=30)
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(0)
    first = next(iter(dm.train_dataloader()))["label"].tolist()
    again = next(iter(dm.train_dataloader()))["label"].tolist()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)  # Lightning calls this before each epoch
    second = next(iter(loader))["label"].tolist()
    assert sorted(first) == sorted(second) == sorted(d for d in range(10) for _ in range(3))
    assert first != [d for _ in range(3) for d in range(10)]
    # The order depends only on (seed, epoch): the same epoch repeats, the next one differs.
    assert first == again and first != second
    assert [b["label"].tolist() for b in dm.val_dataloader()] == [[4, 6]]


def test_worker_settings_and_pickled_dataset(tmp_path) -> None:
    write_release(tmp_path)
    dm = make_dm(tmp_path, num_workers=1, pin_memory=True)
    dm.prepare_data()
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.pin_memory
    dataset = dm.datasets["train"]
    assert len(dataset) == 4
    # Workers get the cache folder, not a copy of the arrays.
    assert len(pickle.dumps(dataset)) < 1000
    assert pickle.loads(pickle.dumps(dataset))[0]["label"].item() == 9


def test_user_files_are_used_and_never_overwritten(tmp_path) -> None:
    directory = write_release(tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}
    dm = make_dm(tmp_path)
    dm.prepare_data()
    assert dm.generated is None
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()} == before
    assert not (tmp_path / "generated").exists()


def test_partial_files_are_an_error(tmp_path) -> None:
    directory = write_release(tmp_path, splits=("train", "val"))
    with pytest.raises(FileNotFoundError, match="basic_test.tsv") as err:
        make_dm(tmp_path).prepare_data()
    assert str(directory) in str(err.value) and "put all three release files" in str(err.value)
    assert not (directory / "basic_test.tsv").exists()
    assert not (tmp_path / "generated").exists()


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions"
)
def test_unwritable_data_dir_is_a_clear_error(tmp_path) -> None:
    data_dir = tmp_path / "readonly"
    data_dir.mkdir()
    data_dir.chmod(0o555)
    try:
        if os.access(data_dir, os.W_OK):
            pytest.skip("chmod does not restrict writes here")
        with pytest.raises(PermissionError, match="LRA_DATA_DIR") as err:
            ensure_listops_files(data_dir, **GEN)
        assert str(data_dir) in str(err.value) and "data.data_dir" in str(err.value)
    finally:
        data_dir.chmod(0o755)


def test_generated_files_sidecar_and_settings(tmp_path, monkeypatch) -> None:
    directory = ensure_listops_files(tmp_path, **GEN)
    assert directory.parent == tmp_path / "generated" / "listops"
    assert not (tmp_path / "lra_release").exists()
    sidecar = json.loads((directory / ".generated.json").read_text())
    assert {k: sidecar[k] for k in GEN} == GEN
    lines = (directory / "basic_train.tsv").read_text().splitlines()
    assert lines[0] == "Source\tTarget" and len(lines) == GEN["num_train"] + 1
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    # The same settings reuse the set; other settings get their own folder.
    monkeypatch.setattr(listops, "write_listops_files", None)  # must not be called
    assert ensure_listops_files(tmp_path, **GEN) == directory
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    monkeypatch.undo()
    other = ensure_listops_files(tmp_path, **{**GEN, "seed": 1})
    assert other != directory and other.parent == directory.parent
    assert json.loads((other / ".generated.json").read_text())["seed"] == 1
    assert (other / "basic_train.tsv").read_bytes() != (directory / "basic_train.tsv").read_bytes()


def test_generated_set_whose_files_changed_is_an_error(tmp_path) -> None:
    directory = ensure_listops_files(tmp_path, **GEN)
    (directory / "basic_val.tsv").unlink()
    # A SourceError: train.py prints it as one line, without a traceback.
    with pytest.raises(SourceError, match=f"{directory} is not a complete generated"):
        make_dm(tmp_path).prepare_data()


def test_generated_data_end_to_end(tmp_path, caplog) -> None:
    dm = make_dm(tmp_path, max_length=48)
    with caplog.at_level(logging.WARNING, logger=listops.__name__):
        dm.prepare_data()
    assert {k: dm.generated[k] for k in GEN} == GEN
    (message,) = [r.getMessage() for r in caplog.records]
    assert "no release under" in message and "not LRA ListOps numbers" in message
    assert str(listops.generated_dir(tmp_path, dm.generated)) in message
    dm.setup()
    batches = list(dm.train_dataloader())
    assert sum(len(b["label"]) for b in batches) == GEN["num_train"]
    lengths = torch.cat([b["mask"].sum(1) for b in batches])
    assert ((lengths > 5) & (lengths < 40)).all()
    # A fresh datamodule finds the generated set and its cache without preparing again.
    fresh = make_dm(tmp_path, max_length=48)
    fresh.setup()
    assert fresh.generated == dm.generated
    assert fresh.datasets["train"].entry == dm.datasets["train"].entry


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("( ( ( [MAX 2 ) 9 ) ] )\t10", "label '10'"),
        ("( ( ( [MAX 2 ) 9 ) ] )\tnine", "label 'nine'"),
        ("( ( ( [MAX 2 ) 9 ) ] )", "2 tab-separated columns"),
        ("( ( ( [MAX 2 ) 9 ) ] )\t9\textra", "found 3"),
        ("( ( ( [FOO 2 ) 9 ) ] )\t9", "unknown token '\\[FOO'"),
        ("( ( ( [MAX 12 ) 9 ) ] )\t9", "unknown token '12'"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, row: str, problem: str) -> None:
    path = tmp_path / "basic_train.tsv"
    path.write_text(f"Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n{row}\n")
    with pytest.raises(ValueError, match=f"{path}:3: .*{problem}"):
        parse_listops_tsv(path.read_text(), str(path))


def test_wrong_header_is_an_error(tmp_path) -> None:
    path = tmp_path / "basic_val.tsv"
    path.write_text("( ( ( [MAX 2 ) 9 ) ] )\t9\n")
    with pytest.raises(ValueError, match=f"{path}:1: expected the header"):
        parse_listops_tsv(path.read_text(), str(path))


def test_truncation_warned_once_per_split(tmp_path, caplog) -> None:
    write_release(tmp_path)
    with caplog.at_level(logging.WARNING, logger=listops.__name__):
        make_dm(tmp_path, max_length=5).ensure_cache()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "train: 2 of 4 sequences cut to 5",
        "test: 1 of 1 sequences cut to 5",
    ]
    dm = make_dm(tmp_path, max_length=5)
    dm.setup()
    item = dm.datasets["test"][0]
    assert item["input_ids"].tolist() == IDS[ROWS["test"][0][0]][:5]
    assert item["mask"].tolist() == [1.0] * 5


def test_cache_reused_and_rebuilt_when_options_change(tmp_path, monkeypatch) -> None:
    directory = write_release(tmp_path)
    calls = []
    tokenise = listops.tokenise_split
    monkeypatch.setattr(
        listops, "tokenise_split", lambda *a, **k: calls.append(a) or tokenise(*a, **k)
    )
    first = make_dm(tmp_path, max_length=16).ensure_cache()
    assert len(calls) == 3
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["options"]["max_length"] == 16
    assert make_dm(tmp_path, max_length=16).ensure_cache() == first
    assert len(calls) == 3

    second = make_dm(tmp_path, max_length=32).ensure_cache()
    assert second != first and len(calls) == 6
    assert cache_entries(tmp_path, "listops") == sorted([first, second])

    path = directory / "basic_val.tsv"
    path.write_text(path.read_text() + "( ( ( [MAX 0 ) 1 ) ] )\t1\n")
    third = make_dm(tmp_path, max_length=32).ensure_cache()
    assert third not in (first, second) and len(calls) == 9


def test_setup_without_prepare_data_says_so(tmp_path) -> None:
    write_release(tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        make_dm(tmp_path).setup()


def write_release_archive(path: Path, tmp: Path) -> Path:
    """The release as distributed: a gzip tar with a nested lra_release/lra_release/ folder."""
    import tarfile

    write_release(tmp / "lra_release")  # -> tmp/lra_release/lra_release/listops-1000
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp / "lra_release", arcname="lra_release")
    return path


@pytest.mark.parametrize("where", ["archive", "nested_folder", "source_archive"])
def test_release_read_from_archive_or_nested_folder(tmp_path, where: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    staging = tmp_path / "staging"
    overrides = {}
    if where == "archive":
        write_release_archive(data_dir / "lra_release.gz", staging)
    elif where == "nested_folder":
        write_release(data_dir / "lra_release")
    else:
        overrides["source"] = str(write_release_archive(tmp_path / "elsewhere.gz", staging))
    dm = make_dm(data_dir, **overrides)
    dm.prepare_data()
    dm.setup()
    # Read where it is: nothing generated or copied into lra_release/listops-1000.
    assert not (data_dir / "lra_release" / "listops-1000").exists()
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == [4, 6]
    ids = IDS[ROWS["val"][0][0]]
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    # A fresh datamodule finds the same cache entry without preparing again.
    fresh = make_dm(data_dir, **overrides)
    fresh.setup()
    assert fresh.datasets["test"].entry == dm.datasets["test"].entry


def test_archive_of_another_task_names_what_it_lacks(tmp_path) -> None:
    """source= an archive without listops-1000/ (say the IMDB tarball): the message names the
    archive, the files it lacks and the setting to change, and nothing is cached or recorded."""
    import tarfile

    from mra_lra.data.sources import SourceError

    staging = tmp_path / "aclImdb" / "train"
    staging.mkdir(parents=True)
    (staging / "0_1.txt").write_text("review")
    archive = tmp_path / "aclImdb_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "aclImdb", arcname="aclImdb")
    data_dir = tmp_path / "data"
    with pytest.raises(SourceError) as err:
        make_dm(data_dir, source=str(archive)).prepare_data()
    message = str(err.value)
    assert message.startswith(f"{archive} lacks listops-1000/basic_test.tsv"), message
    assert "data.source" in message and "SourceTree" not in message
    assert cache_entries(data_dir, "listops") == []
    assert not (data_dir / "sources.json").exists()


def test_truncated_archive_is_an_error_and_caches_nothing(tmp_path) -> None:
    from mra_lra.data.sources import SourceError

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    whole = write_release_archive(tmp_path / "whole.gz", tmp_path / "staging").read_bytes()
    (data_dir / "lra_release.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SourceError, match="truncated or corrupt.*Download it again"):
        make_dm(data_dir).prepare_data()
    root = data_dir / "cache" / "listops"
    assert not root.exists() or not any(root.iterdir())


# -- the release wins over generated sets (B1) ---------------------------------------------------
def add_release(data_dir: Path, tmp: Path, where: str) -> None:
    if where == "archive":
        write_release_archive(data_dir / "lra_release.gz", tmp / "staging")
    elif where == "nested_folder":
        write_release(data_dir / "lra_release")  # lra_release/lra_release/listops-1000
    else:
        write_release(data_dir)  # lra_release/listops-1000


def val_labels(dm: ListOpsDataModule) -> list[int]:
    dm.setup()
    return [label for b in dm.val_dataloader() for label in b["label"].tolist()]


@pytest.mark.parametrize("where", ["archive", "nested_folder", "folder"])
def test_release_added_after_generation_is_read(tmp_path, caplog, where: str) -> None:
    data_dir = tmp_path / "data"
    generated = make_dm(data_dir)
    generated.prepare_data()
    assert generated.generated is not None and len(val_labels(generated)) == GEN["num_val"]

    add_release(data_dir, tmp_path, where)
    dm = make_dm(data_dir)
    with caplog.at_level(logging.INFO, logger=listops.__name__):
        dm.prepare_data()
    assert dm.generated is None
    assert any("reading the release's files" in r.getMessage() for r in caplog.records)
    assert val_labels(dm) == [4, 6]
    # Its own cache entry; the generated set and its cache stay (a run may still ask for them).
    assert dm.datasets["val"].entry != generated.datasets["val"].entry
    assert len(cache_entries(data_dir, "listops")) == 2
    assert listops.generated_dir(data_dir, generated.generated).is_dir()


def test_generated_and_release_files_never_share_a_cache_entry(tmp_path) -> None:
    # The same bytes, sizes and modification times as generated files and as release files.
    generated = make_dm(tmp_path / "a")
    generated.ensure_cache()
    release = write_release(tmp_path / "b", splits=())
    for p in generated._tree.root.glob("basic_*.tsv"):
        shutil.copy2(p, release / p.name)
    dm = make_dm(tmp_path / "b")
    dm.ensure_cache()
    assert dm.generated is None
    options, generated_options = dm.cache_options(), generated.cache_options()
    assert options["files"] == generated_options["files"]
    assert generated_options["generated"] == generated.generated and "generated" not in options
    assert cache_key(options) != cache_key(generated_options)


def write_legacy_set(data_dir: Path, splits=("train", "val", "test")) -> Path:
    """A set as versions before generated/listops/ made it: in lra_release/listops-1000."""
    legacy = write_listops_files(
        listops.listops_dir(data_dir),
        GEN["num_train"],
        GEN["num_val"],
        GEN["num_test"],
        min_length=GEN["min_length"],
        max_length=GEN["max_length"],
        seed=GEN["seed"],
        progress=False,
    )
    for split in {"train", "val", "test"} - set(splits):
        (legacy / f"basic_{split}.tsv").unlink()
    return legacy


def test_legacy_generated_set_is_moved_and_reused(tmp_path, monkeypatch, caplog) -> None:
    legacy = write_legacy_set(tmp_path)
    files = {p.name: p.read_bytes() for p in legacy.iterdir()}
    monkeypatch.setattr(listops, "write_listops_files", None)  # reused, not generated again
    dm = make_dm(tmp_path)
    with caplog.at_level(logging.WARNING, logger=listops.__name__):
        dm.prepare_data()
    moved = listops.generated_dir(tmp_path, dm.generated)
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == files
    assert not legacy.exists() and not (tmp_path / "lra_release").exists()
    assert "older version" in caplog.records[0].getMessage()
    assert "no release under" in caplog.records[1].getMessage()
    assert dm._tree.root == moved and len(val_labels(dm)) == GEN["num_val"]


def test_release_extracted_next_to_a_legacy_generated_set_wins(tmp_path) -> None:
    write_legacy_set(tmp_path)
    write_release(tmp_path / "lra_release")  # lra_release/lra_release/listops-1000
    dm = make_dm(tmp_path)
    dm.prepare_data()
    assert dm.generated is None and val_labels(dm) == [4, 6]
    assert not listops.listops_dir(tmp_path).exists()
    assert (tmp_path / "lra_release" / "lra_release" / "listops-1000").is_dir()
    assert listops.generated_dir(tmp_path, listops.generator_settings(**GEN)).is_dir()


def test_incomplete_legacy_generated_set_is_removed(tmp_path) -> None:
    legacy = write_legacy_set(tmp_path, splits=("train",))
    dm = make_dm(tmp_path)
    dm.prepare_data()
    assert not legacy.exists()
    assert dm._tree.root == listops.generated_dir(tmp_path, dm.generated)
    assert len(val_labels(dm)) == GEN["num_val"]


@pytest.mark.parametrize("where", ["source", "nested_folder"])
def test_generated_set_is_never_taken_for_the_release(tmp_path, caplog, where: str) -> None:
    if where == "source":
        folder, overrides = tmp_path / "mine", {"source": str(tmp_path / "mine")}
    else:
        folder, overrides = tmp_path / "data" / "lra_release" / "lra_release", {}
    write_listops_files(
        folder / "listops-1000", 3, 2, 1, min_length=5, max_length=40, seed=7, progress=False
    )
    dm = make_dm(tmp_path / "data", **overrides)
    with caplog.at_level(logging.WARNING, logger=listops.__name__):
        dm.prepare_data()
    assert dm.generated["seed"] == 7 and dm.generated["num_train"] == 3
    assert "holds a generated set" in caplog.records[0].getMessage()
    assert dm.cache_options()["generated"] == dm.generated


def test_setup_without_any_files_says_prepare_data(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="No generated set.*prepare_data"):
        make_dm(tmp_path).setup()


# -- generation is atomic (B2) -------------------------------------------------------------------
def _interrupt_after(count: int, real):
    calls = []

    def writer(*args, **kwargs):
        if len(calls) == count:
            raise KeyboardInterrupt  # Ctrl-C
        calls.append(args)
        return real(*args, **kwargs)

    return writer


@pytest.mark.parametrize("point", ["after_first_file", "before_sidecar"])
def test_interrupted_generation_leaves_nothing_and_rerun_regenerates(
    tmp_path, monkeypatch, point: str
) -> None:
    if point == "after_first_file":
        monkeypatch.setattr(
            listops_generator, "write_tsv", _interrupt_after(1, listops_generator.write_tsv)
        )
    else:
        monkeypatch.setattr(
            listops_generator,
            "atomic_write_json",
            _interrupt_after(0, listops_generator.atomic_write_json),
        )
    with pytest.raises(KeyboardInterrupt):
        make_dm(tmp_path).prepare_data()
    root = listops.generated_root(tmp_path)
    assert list(root.iterdir()) == []  # no set, and no temporary folder
    assert not (tmp_path / "lra_release").exists() and cache_entries(tmp_path, "listops") == []
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        make_dm(tmp_path).setup()

    monkeypatch.undo()
    dm = make_dm(tmp_path)
    dm.prepare_data()
    directory = listops.generated_dir(tmp_path, dm.generated)
    clean = write_listops_files(
        tmp_path / "clean", 6, 2, 2, min_length=5, max_length=40, seed=0, progress=False
    )
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == {
        p.name: p.read_bytes() for p in clean.iterdir()
    }


def test_killed_generation_folder_is_removed_by_the_rerun(tmp_path) -> None:
    # What a SIGKILL during generation leaves: a temporary folder whose lock nobody holds.
    root = listops.generated_root(tmp_path)
    key = listops.generated_dir(tmp_path, listops.generator_settings(**GEN)).name
    stale = root / f".tmp-{key}-abcd1234"
    stale.mkdir(parents=True)
    (stale / "basic_train.tsv").write_text("Source\tTarget\n")
    (stale / ".lock").touch()
    dm = make_dm(tmp_path)
    dm.prepare_data()
    assert sorted(p.name for p in root.iterdir()) == [key]
    assert len(val_labels(dm)) == GEN["num_val"]


# -- bytes that are not UTF-8 (B4) ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["folder", "archive"])
def test_non_utf8_byte_names_file_and_line(tmp_path, where: str) -> None:
    from mra_lra.data.sources import SourceError

    data_dir = tmp_path / "data"
    directory = write_release(tmp_path / "staging" / "lra_release")
    path = directory / "basic_val.tsv"
    path.write_bytes(b"Source\tTarget\r\n6\t6\r\n( ( ( [MIN 4 ) 7\xff ) ] )\t4\r\n")
    if where == "archive":
        import tarfile

        data_dir.mkdir()
        with tarfile.open(data_dir / "lra_release.gz", "w:gz") as tar:
            tar.add(tmp_path / "staging" / "lra_release", arcname="lra_release")
        name = f"{data_dir / 'lra_release.gz'}:basic_val.tsv"
    else:
        shutil.copytree(tmp_path / "staging", data_dir)
        name = str(data_dir / "lra_release" / "lra_release" / "listops-1000" / "basic_val.tsv")
    with pytest.raises(SourceError) as err:
        make_dm(data_dir).prepare_data()
    message = str(err.value)
    assert message.startswith(f"{name}:3: byte 0xff (column 17) is not UTF-8")
    assert "Get it again" in message
    assert cache_entries(data_dir, "listops", hidden=True) == []


# -- bad option values (one-line errors naming the option) ---------------------------------------
@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"num_train": 0}, r"with data.num_train=0, .* no train examples \(training would run no"),
        ({"num_test": 0}, r"with data.num_test=0, .* no test examples \(the test at the end"),
        ({"num_train": 0, "num_test": 0}, r"Set data.num_train and data.num_test to at least 1"),
        ({"num_train": -1}, r"data.num_train must be an integer >= 0, got -1"),
        ({"num_val": -2}, r"data.num_val must be an integer >= 0, got -2"),
    ],
)
def test_generated_set_without_train_or_test_examples_is_refused(tmp_path, sizes, message) -> None:
    """An empty training split trained 0 steps and "succeeded"; an empty test split failed with
    an IndexError after the whole run. Both are refused before anything is generated."""
    with pytest.raises(ValueError, match=message) as err:
        make_dm(tmp_path, **sizes).prepare_data()
    if 0 in sizes.values():
        assert "only data.num_val may be 0" in str(err.value)
    assert not (tmp_path / "generated").exists() and cache_entries(tmp_path, "listops") == []
    with pytest.raises(ValueError, match=message):  # also without prepare_data
        make_dm(tmp_path, **sizes).setup()


def test_generated_set_may_have_no_val_examples(tmp_path) -> None:
    dm = make_dm(tmp_path, num_val=0)
    dm.prepare_data()
    dm.setup()
    assert {split: len(d) for split, d in dm.datasets.items()} == {"train": 6, "val": 0, "test": 2}


def test_generated_set_read_without_train_examples_is_refused(tmp_path) -> None:
    """A set generated elsewhere (its sizes are its own) is refused too, and nothing cached."""
    write_listops_files(
        tmp_path / "mine" / "listops-1000", 0, 2, 1, min_length=5, max_length=40, progress=False
    )
    dm = make_dm(tmp_path / "data", source=str(tmp_path / "mine"))
    with pytest.raises(ValueError, match="generated set read from source .*mine has no train"):
        dm.prepare_data()
    assert cache_entries(tmp_path / "data", "listops", hidden=True) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_length": 0}, "data.max_length must be an integer >= 1, got 0"),
        ({"max_length": -4}, "data.max_length must be an integer >= 1, got -4"),
        ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "data.num_workers must be an integer >= 0, got -1"),
        ({"gen_min_length": 40}, "need 0 <= data.gen_min_length < data.gen_max_length - 1"),
    ],
)
def test_bad_option_values_name_the_option(tmp_path, overrides, message) -> None:
    # max_length=0 trained on empty sequences and "succeeded"; the others failed late.
    with pytest.raises(ValueError, match=message):
        make_dm(tmp_path, **overrides).prepare_data()
    assert not (tmp_path / "generated").exists()


def test_data_dir_that_is_a_file_is_named(tmp_path) -> None:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match=f"data.data_dir={path} is a file, not a folder"):
        make_dm(path)
    assert path.read_text() == "not a folder"


# -- damaged files of our own: one-line errors naming the file and the fix -----------------------
@pytest.mark.parametrize("damage", ["cut", "not_json", "not_a_record"])
def test_damaged_sources_record_is_named(tmp_path, damage: str) -> None:
    write_release(tmp_path / "release")
    source = tmp_path / "release" / "lra_release"
    make_dm(tmp_path / "data", source=str(source)).prepare_data()
    record = tmp_path / "data" / "sources.json"
    text = record.read_text()
    record.write_text({"cut": text[:10], "not_json": "\x00", "not_a_record": "[1, 2]"}[damage])
    with pytest.raises(SourceError, match=f"{record} (cannot be read|is not a record).*delete it"):
        make_dm(tmp_path / "data").setup()
    assert record.exists()  # never deleted for the user


def test_truncated_cache_array_is_named_and_kept(tmp_path) -> None:
    write_release(tmp_path)
    entry = make_dm(tmp_path).ensure_cache()
    array = entry / "train_input_ids.npy"
    os.truncate(array, array.stat().st_size - 7)
    for step in ("prepare_data", "setup"):
        dm = make_dm(tmp_path)
        with pytest.raises(SourceError) as err:
            dm.prepare_data() if step == "prepare_data" else dm.setup()
        message = str(err.value)
        assert f"the cache entry {entry} is damaged: {array} cannot be read" in message
        assert f"Delete the folder {entry} and run again" in message
    assert array.exists() and cache_entries(tmp_path, "listops") == [entry]
    shutil.rmtree(entry)  # the fix the message names
    dm = make_dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert len(dm.datasets["train"]) == len(ROWS["train"])
