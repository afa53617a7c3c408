"""Text (IMDB bytes): the Stanford folder and tarball, the Hugging Face parquet files, the byte
tokeniser against hand-computed ids, bad input, the cache, and a few training steps."""

from __future__ import annotations

import json
import logging
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mra_lra.data import text
from mra_lra.data.sources import SourceError
from mra_lra.data.text import TextDataModule, byte_token_ids
from tests.data.helpers import THREE_CPU_STEPS, cache_entries

# (label folder, id, rating, review bytes) per split, ids out of lexicographic order on purpose.
REVIEWS = {
    "train": [
        ("pos", 10, 8, b"Great!"),
        ("neg", 2, 1, b"Bad."),
        ("neg", 10, 3, "Nul \u00e9".encode()),
        ("pos", 9, 10, b'"Fine"'),
        ("neg", 1, 2, b"Meh\n<br />"),
    ],
    "test": [("pos", 0, 7, b"ok"), ("neg", 3, 4, b"No")],
}
# The reviews in the order the arrays hold them: negatives, then positives, by numeric id.
TRAIN_ORDER = [b"Meh\n<br />", b"Bad.", "Nul \u00e9".encode(), b'"Fine"', b"Great!"]
TRAIN_LABELS = [0, 0, 0, 1, 1]
# Hand-computed ids (byte + 1): "Bad." = 66 97 100 46; "Nul é" = 78 117 108 32 C3 A9.
IDS_BAD = [67, 98, 101, 47]
IDS_NUL_E = [79, 118, 109, 33, 196, 170]


def write_aclimdb(root: Path, reviews: dict = REVIEWS) -> Path:
    """The Stanford layout at root/aclImdb, with the files a loader must ignore."""
    top = root / "aclImdb"
    for split, rows in reviews.items():
        for label, review_id, rating, data in rows:
            path = top / split / label / f"{review_id}_{rating}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (top / split / "labeledBow.feat").write_text("0 0:1\n")
        (top / split / "urls_pos.txt").write_text("http://www.imdb.com/title/tt0/usercomments\n")
    (top / "train" / "unsup").mkdir(parents=True, exist_ok=True)
    (top / "train" / "unsup" / "0_0.txt").write_bytes(b"unlabelled")
    (top / "imdb.vocab").write_text("the\n")
    return top


def write_tarball(path: Path, staging: Path, reviews: dict = REVIEWS) -> Path:
    """aclImdb_v1.tar.gz as Stanford ships it: a gzip tar whose top folder is aclImdb/."""
    write_aclimdb(staging, reviews)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging / "aclImdb", arcname="aclImdb")
    return path


def make_dm(data_dir: Path, max_length: int = 16, text_length: int = 12, **kw) -> TextDataModule:
    return TextDataModule(
        data_dir=str(data_dir),
        batch_size=8,
        max_length=max_length,
        text_length=text_length,
        **kw,
    )


def test_byte_tokeniser_hand_computed() -> None:
    ids, lengths = byte_token_ids(["Nul \u00e9".encode(), b"", b"Bad."], 5, 7)
    assert ids.dtype == np.uint16 and ids.shape == (3, 7)
    # The cut at 5 bytes splits the two-byte é: only its first byte (0xC3 -> 196) is kept.
    assert ids[0].tolist() == [79, 118, 109, 33, 196, 0, 0]
    assert ids[1].tolist() == [0] * 7
    assert ids[2].tolist() == IDS_BAD + [0, 0, 0]
    assert lengths.tolist() == [5, 0, 4]
    every_byte, _ = byte_token_ids([bytes(range(256))], 256, 256)
    assert every_byte[0].tolist() == list(range(1, 257))  # vocab 257: pad 0, bytes 1..256


def test_folder_reviews_as_batches(tmp_path, caplog) -> None:
    write_aclimdb(tmp_path)
    dm = make_dm(tmp_path)
    assert (dm.num_classes, dm.vocab_size) == (2, 257)
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
        dm.setup("fit")
    assert "text has no val split: val uses the test split" in caplog.text
    train = dm.datasets["train"].arrays
    assert train["label"].tolist() == TRAIN_LABELS
    assert train["length"].tolist() == [len(t) for t in TRAIN_ORDER]
    assert train["input_ids"][1].tolist() == IDS_BAD + [0] * 12
    assert train["input_ids"][2].tolist() == IDS_NUL_E + [0] * 10
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == [0, 1]  # test: neg 3, pos 0
    assert batch["input_ids"][0, :3].tolist() == [ord("N") + 1, ord("o") + 1, 0]
    assert batch["mask"][0].tolist() == [1.0, 1.0] + [0.0] * 14
    # IMDB has no validation split: val reads the test arrays, which are stored once.
    manifest = json.loads((dm.datasets["val"].entry / "manifest.json").read_text())
    assert not [name for name in manifest["arrays"] if name.startswith("val_")]
    assert dm.datasets["val"].split == "test"


def test_tarball_reads_the_same_as_the_folder(tmp_path) -> None:
    folder_dir, tar_dir = tmp_path / "folder", tmp_path / "tar"
    write_aclimdb(folder_dir)
    tar_dir.mkdir()
    write_tarball(tar_dir / "aclImdb_v1.tar.gz", tmp_path / "staging")
    arrays = []
    for data_dir in (folder_dir, tar_dir):
        dm = make_dm(data_dir)
        dm.prepare_data()
        dm.setup()
        arrays.append({k: np.asarray(v) for k, v in dm.datasets["train"].arrays.items()})
    assert arrays[0].keys() == arrays[1].keys()
    for name in arrays[0]:
        np.testing.assert_array_equal(arrays[0][name], arrays[1][name], err_msg=name)


def test_source_points_elsewhere(tmp_path) -> None:
    archive = write_tarball(tmp_path / "downloads" / "imdb.tgz", tmp_path / "staging")
    data_dir = tmp_path / "data"
    dm = make_dm(data_dir, source=str(archive))
    dm.prepare_data()
    dm.setup()
    assert dm.datasets["train"].arrays["label"].tolist() == TRAIN_LABELS


def test_archive_without_imdb_is_refused_and_not_remembered(tmp_path) -> None:
    """LRA's release archive (no aclImdb/ inside) given as Text's source, as `prepare task=all
    source=lra_release.gz` does: an error naming the fix, no cache entry, no sources.json entry;
    the IMDB tarball put into the data folder afterwards is then read."""
    staging = tmp_path / "staging" / "lra_release" / "listops-1000"
    staging.mkdir(parents=True)
    (staging / "basic_test.tsv").write_text("Source\tTarget\n")
    release = tmp_path / "lra_release.gz"
    with tarfile.open(release, "w:gz") as tar:
        tar.add(staging.parent, arcname="lra_release")
    data_dir = tmp_path / "data"
    with pytest.raises(SourceError, match="holds no IMDB reviews.*aclImdb_v1.tar.gz"):
        make_dm(data_dir, source=str(release)).prepare_data()
    assert cache_entries(data_dir, "text") == []
    assert not (data_dir / "sources.json").exists()
    write_tarball(data_dir / "aclImdb_v1.tar.gz", tmp_path / "imdb")
    dm = make_dm(data_dir)
    dm.prepare_data()
    dm.setup()
    assert dm.datasets["train"].arrays["label"].tolist() == TRAIN_LABELS


def test_text_length_cuts_and_is_checked_against_max_length(tmp_path) -> None:
    write_aclimdb(tmp_path)
    dm = make_dm(tmp_path, max_length=8, text_length=5)
    dm.prepare_data()
    dm.setup()
    train = dm.datasets["train"].arrays
    assert train["input_ids"][2].tolist() == IDS_NUL_E[:5] + [0, 0, 0]
    assert train["length"].tolist() == [min(len(t), 5) for t in TRAIN_ORDER]
    with pytest.raises(ValueError, match="data.text_length=4000 exceeds data.max_length=1024"):
        make_dm(tmp_path, max_length=1024, text_length=4000)


def test_missing_files_say_what_to_get_and_where(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        make_dm(tmp_path).prepare_data()
    message = str(err.value)
    assert text.IMDB_URL in message and str(tmp_path / "aclImdb_v1.tar.gz") in message
    assert "data.source=" in message and "plain_text" in message


def test_split_size_other_than_the_release_warns(tmp_path, caplog) -> None:
    write_aclimdb(tmp_path)
    with caplog.at_level(logging.WARNING, logger=text.__name__):
        make_dm(tmp_path).prepare_data()
    messages = [r.getMessage() for r in caplog.records]
    assert any("train split has 5 examples, the release has 25000" in m for m in messages)
    assert any("test split has 2 examples, the release has 25000" in m for m in messages)


def test_truncated_tarball_errors_and_caches_nothing(tmp_path) -> None:
    whole = write_tarball(tmp_path / "whole.tar.gz", tmp_path / "staging").read_bytes()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Every cut loses data, wherever it falls: in a review, in a tar header, between members
    # (where tarfile alone would see an end of archive) or in the gzip trailer.
    for cut in [*range(16, len(whole), max(1, len(whole) // 25)), len(whole) - 4]:
        (data_dir / "aclImdb_v1.tar.gz").write_bytes(whole[:cut])
        with pytest.raises(SourceError, match="truncated or corrupt"):
            make_dm(data_dir).prepare_data()
        assert cache_entries(data_dir, "text") == [], cut


def test_interrupted_build_leaves_no_entry_and_reruns(tmp_path, monkeypatch) -> None:
    write_aclimdb(tmp_path)
    calls = []

    def fail_on_second_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return byte_token_ids(*args, **kwargs)

    monkeypatch.setattr(text, "byte_token_ids", fail_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "text") == []
    assert not list((tmp_path / "cache" / "text").iterdir())  # no temporary folder either
    monkeypatch.undo()
    dm = make_dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert len(cache_entries(tmp_path, "text")) == 1
    assert dm.datasets["train"].arrays["label"].tolist() == TRAIN_LABELS


def test_cache_key_follows_text_length_and_files(tmp_path) -> None:
    top = write_aclimdb(tmp_path)
    first = make_dm(tmp_path).ensure_cache()
    assert make_dm(tmp_path).ensure_cache() == first
    assert make_dm(tmp_path, text_length=8).ensure_cache() != first
    (top / "test" / "pos" / "0_7.txt").write_bytes(b"okay")  # an edited review: a new entry
    third = make_dm(tmp_path).ensure_cache()
    assert third != first and len(cache_entries(tmp_path, "text")) == 3
    manifest = json.loads((third / "manifest.json").read_text())
    assert manifest["options"]["source"]["folder"]["files"] == 7  # unsup/ is not read


def write_parquet(folder: Path, reviews: dict = REVIEWS) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    plain = folder / "plain_text"
    plain.mkdir(parents=True)
    for split, rows in reviews.items():
        table = pa.table(
            {
                "text": [data.decode() for _, _, _, data in rows],
                "label": [text.LABELS[label] for label, _, _, _ in rows],
            }
        )
        pq.write_table(table, plain / f"{split}-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["x"], "label": [-1]}), plain / "unsupervised-0.parquet")
    return plain


def test_parquet_files_read_in_their_order(tmp_path) -> None:
    write_parquet(tmp_path / "imdb")
    dm = make_dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    train = dm.datasets["train"].arrays
    assert train["label"].tolist() == [1, 0, 0, 1, 0]
    assert train["input_ids"][1].tolist() == IDS_BAD + [0] * 12
    assert train["input_ids"][2].tolist() == IDS_NUL_E + [0] * 10


def test_parquet_without_pyarrow_says_pip_install(tmp_path, monkeypatch) -> None:
    plain = tmp_path / "imdb" / "plain_text"
    plain.mkdir(parents=True)
    for split in ("train", "test"):
        (plain / f"{split}-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow") as err:
        make_dm(tmp_path).prepare_data()
    assert isinstance(err.value, SourceError)  # train.py and prepare print it without a traceback


def test_a_few_training_steps(compose_cfg, tmp_path) -> None:
    from mra_lra.train import run

    write_aclimdb(tmp_path / "data")
    overrides = [
        "task=text",
        "attn=mra",
        "data.max_length=128",
        "data.text_length=100",
        "data.batch_size=2",
        "data.num_workers=0",
        *THREE_CPU_STEPS,
    ]
    cfg = compose_cfg(overrides, run_dir=tmp_path / "run", data_dir=tmp_path / "data")
    assert cfg.attn.initial_prior_first_n_blocks == 1
    assert cfg.attn.initial_prior_diagonal_n_blocks == 1
    results = run(cfg)
    assert results["task"] == "text" and results["steps"] == 3
    assert results["val_acc_best"] is not None and 0.0 <= results["test_acc"] <= 1.0


def test_empty_split_cached_by_an_older_version_is_an_error(tmp_path, monkeypatch) -> None:
    """Older versions cached the 0 reviews of a wrong archive; such an entry names its fix."""
    from mra_lra.data.base import LRADataModule

    write_aclimdb(tmp_path)
    monkeypatch.setattr(text, "_read_review_files", lambda tree: {s: ([], []) for s in REVIEWS})
    monkeypatch.setattr(LRADataModule, "_checked_arrays", lambda self: self.build_arrays())
    dm = make_dm(tmp_path)
    dm.prepare_data()
    (entry,) = cache_entries(tmp_path, "text")
    with pytest.raises(
        SourceError, match=f"train, val, test split.*hold no examples.*Delete {entry}"
    ):
        dm.setup()
