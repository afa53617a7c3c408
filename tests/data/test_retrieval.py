"""Retrieval (AAN pairs): the release's TSVs from a nested folder, lra_release.gz or source=,
hand-computed byte ids of both documents, bad rows, the cache, and the two-tower model."""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mra_lra.data import retrieval
from mra_lra.data.retrieval import RetrievalDataModule, parse_aan_rows
from mra_lra.data.sources import SourceError
from tests.data.helpers import THREE_CPU_STEPS, cache_entries

# Rows as the release writes them: label as a float, two ids, two texts; quotes and commas are
# ordinary characters (a csv reader with its default quoting would merge or strip them).
ROWS = {
    "train": [
        ("1.0", "P05-1", "W04-2", 'He said "hi', "A, b"),
        ("0.0", "P05-2", "J93-1", "Zz", '"q" x"'),
        ("1.0", "D07-9", "P05-1", "caf\u00e9", "ok"),
        ("0.0", "A00-1", "A00-2", "x", "y"),
    ],
    "val": [("0.0", "E1", "E2", "ab", "c")],
    "test": [("1.0", "T1", "T2", "T", "tt"), ("0.0", "T3", "T4", "u", "v")],
}
# Hand-computed ids (byte + 1): 'He said "hi' = 72 101 32 115 97 105 100 32 34 104 105;
# 'A, b' = 65 44 32 98; 'café' = 99 97 102 C3 A9.
IDS_HE_SAID = [73, 102, 33, 116, 98, 106, 101, 33, 35, 105, 106]
IDS_A_B = [66, 45, 33, 99]
IDS_CAFE = [100, 98, 103, 196, 170]


def tsv(rows) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


def write_tsv_data(folder: Path, rows: dict = ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, file in retrieval.FILES.items():
        (folder / file).write_text(tsv(rows[split]), encoding="utf-8")
    return folder


def write_release_archive(path: Path, staging: Path, rows: dict = ROWS) -> Path:
    """lra_release.gz as distributed: a gzip tar with a nested lra_release/lra_release/ folder
    (and other tasks' files around tsv_data/)."""
    top = staging / "lra_release" / "lra_release"
    write_tsv_data(top / "tsv_data", rows)
    (top / "listops-1000").mkdir(parents=True)
    (top / "listops-1000" / "basic_val.tsv").write_text("Source\tTarget\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging / "lra_release", arcname="lra_release")
    return path


def make_dm(data_dir: Path, max_length: int = 16, text_length: int = 12, **kw):
    return RetrievalDataModule(
        data_dir=str(data_dir), batch_size=8, max_length=max_length, text_length=text_length, **kw
    )


def padded(ids: list[int], length: int = 16) -> list[int]:
    return ids + [0] * (length - len(ids))


def test_nested_folder_pairs_as_batches(tmp_path) -> None:
    write_tsv_data(tmp_path / "lra_release" / "lra_release" / "tsv_data")
    dm = make_dm(tmp_path)
    assert (dm.num_classes, dm.vocab_size) == (2, 257)
    dm.prepare_data()
    dm.setup()
    batch = dm.datasets["train"].__getitems__([0, 2])
    assert set(batch) == {"input_ids", "mask", "input_ids_2", "mask_2", "label"}
    assert batch["label"].tolist() == [1, 1]
    assert batch["input_ids"][0].tolist() == padded(IDS_HE_SAID)
    assert batch["input_ids_2"][0].tolist() == padded(IDS_A_B)
    assert batch["input_ids"][1].tolist() == padded(IDS_CAFE)
    assert batch["input_ids_2"][1].tolist() == padded([ord("o") + 1, ord("k") + 1])
    assert batch["mask"][0].tolist() == [1.0] * 11 + [0.0] * 5
    assert batch["mask_2"][1].tolist() == [1.0] * 2 + [0.0] * 14
    assert dm.datasets["train"].arrays["label"].tolist() == [1, 0, 1, 0]
    # The eval file is the validation split.
    val = next(iter(dm.val_dataloader()))
    assert val["label"].tolist() == [0]
    assert val["input_ids"][0].tolist() == padded([ord("a") + 1, ord("b") + 1])
    assert next(iter(dm.test_dataloader()))["label"].tolist() == [1, 0]


@pytest.mark.parametrize("where", ["archive", "source_archive", "source_folder"])
def test_archive_and_source_read_the_same_as_the_folder(tmp_path, where: str) -> None:
    reference = tmp_path / "reference"
    write_tsv_data(reference / "lra_release" / "tsv_data")
    data_dir, kw = tmp_path / "data", {}
    if where == "archive":
        write_release_archive(data_dir / "lra_release.gz", tmp_path / "staging")
    elif where == "source_archive":
        kw["source"] = str(write_release_archive(tmp_path / "dl" / "lra.tar.gz", tmp_path / "s"))
    else:
        kw["source"] = str(write_tsv_data(tmp_path / "elsewhere" / "tsv_data"))
    arrays = []
    for dm in (make_dm(reference), make_dm(data_dir, **kw)):
        dm.prepare_data()
        dm.setup()
        arrays.append({s: dict(d.arrays) for s, d in dm.datasets.items()})
    for split, named in arrays[0].items():
        assert named.keys() == arrays[1][split].keys()
        for name, array in named.items():
            np.testing.assert_array_equal(array, arrays[1][split][name], err_msg=name)


def test_text_length_per_document(tmp_path) -> None:
    write_tsv_data(tmp_path / "lra_release" / "tsv_data")
    dm = make_dm(tmp_path, max_length=8, text_length=4)
    dm.prepare_data()
    dm.setup()
    train = dm.datasets["train"].arrays
    assert train["input_ids"][0].tolist() == IDS_HE_SAID[:4] + [0] * 4
    assert train["input_ids_2"][0].tolist() == IDS_A_B + [0] * 4
    assert train["length"].tolist() == [4, 2, 4, 1]
    assert train["length_2"].tolist() == [4, 4, 2, 1]
    with pytest.raises(ValueError, match="data.text_length=4000 exceeds data.max_length=1024"):
        make_dm(tmp_path, max_length=1024, text_length=4000)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("1.0\tA\tB\tonly four", "expected 5 tab-separated columns .*found 4"),
        ("1.0\tA\tB\tx\ty\tz", "found 6"),
        ("2.0\tA\tB\tx\ty", "the label '2.0' is not 0.0 or 1.0"),
        ("yes\tA\tB\tx\ty", "the label 'yes' is not 0.0 or 1.0"),
        ("\tA\tB\tx\ty", "the label '' is not 0.0 or 1.0"),
    ],
)
def test_malformed_row_names_file_and_line(row: str, problem: str) -> None:
    lines = [b"0.0\tA\tB\tx\ty\n", b"\n", row.encode() + b"\n"]
    with pytest.raises(ValueError, match=f"^some/file.tsv:3: .*{problem}"):
        parse_aan_rows(lines, "some/file.tsv", 10)


def test_malformed_file_in_folder_names_its_path(tmp_path) -> None:
    folder = write_tsv_data(tmp_path / "lra_release" / "tsv_data")
    path = folder / retrieval.FILES["test"]
    path.write_text(tsv(ROWS["test"]) + "1.0\tA\tB\tno text2\n")
    with pytest.raises(ValueError, match=f"{path}:3: expected 5"):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "retrieval") == []


def test_integer_labels_and_crlf_are_read(tmp_path) -> None:
    texts1, texts2, labels = parse_aan_rows([b"1\ta\tb\tx\ty\r\n", b"0.0\ta\tb\tp\tq"], "f", 10)
    assert (texts1, texts2, labels) == ([b"x", b"p"], [b"y", b"q"], [1, 0])


def test_split_sizes_other_than_the_release_warn(tmp_path, caplog) -> None:
    write_tsv_data(tmp_path / "lra_release" / "tsv_data")
    with caplog.at_level(logging.WARNING):
        make_dm(tmp_path).prepare_data()
    assert "the train split has 4 examples, the release has 147086" in caplog.text
    assert "the val split has 1 examples, the release has 18090" in caplog.text
    assert "the test split has 2 examples, the release has 17437" in caplog.text


def test_missing_files_say_what_to_get_and_where(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        make_dm(tmp_path).prepare_data()
    message = str(err.value)
    assert retrieval.RELEASE_URL in message and str(tmp_path / "lra_release.gz") in message
    assert "data.source=" in message
    folder = write_tsv_data(tmp_path / "lra_release" / "tsv_data")
    (folder / retrieval.FILES["test"]).unlink()
    with pytest.raises(FileNotFoundError, match="lacks new_aan_pairs.test.tsv.*lra_release.gz"):
        make_dm(tmp_path).prepare_data()


def test_archive_without_a_split_file_names_it(tmp_path) -> None:
    staging = tmp_path / "staging"
    write_release_archive(tmp_path / "data" / "lra_release.gz", staging)
    archive = tmp_path / "data" / "lra_release.gz"
    with tarfile.open(archive, "w:gz") as tar:  # rewrite without the eval file
        tsv_data = staging / "lra_release" / "lra_release" / "tsv_data"
        for file in (retrieval.FILES["train"], retrieval.FILES["test"]):
            tar.add(tsv_data / file, arcname=f"lra_release/lra_release/tsv_data/{file}")
    with pytest.raises(FileNotFoundError, match="no tsv_data/new_aan_pairs.eval.tsv"):
        make_dm(tmp_path / "data").prepare_data()


def test_truncated_archive_errors_and_caches_nothing(tmp_path) -> None:
    # Random documents, so that the training file (the archive's last TSV) fills most of the
    # compressed archive and the cuts below fall inside it. (Reading stops after the last TSV:
    # a cut past it loses nothing this task reads.)
    rng = np.random.default_rng(0)
    train = [("0.0", "a", "b", rng.bytes(300).hex(), rng.bytes(300).hex()) for _ in range(60)]
    rows = {**ROWS, "train": train}
    whole = write_release_archive(tmp_path / "whole.gz", tmp_path / "staging", rows).read_bytes()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for cut in (len(whole) // 2, len(whole) * 9 // 10):
        (data_dir / "lra_release.gz").write_bytes(whole[:cut])
        with pytest.raises(SourceError, match="truncated or corrupt"):
            make_dm(data_dir).prepare_data()
        assert cache_entries(data_dir, "retrieval") == []


def test_interrupted_build_leaves_no_entry_and_reruns(tmp_path, monkeypatch) -> None:
    write_tsv_data(tmp_path / "lra_release" / "tsv_data")
    calls = []
    tokenise = retrieval.byte_token_ids

    def fail_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the first split's two towers
            raise RuntimeError("interrupted")
        return tokenise(*args, **kwargs)

    monkeypatch.setattr(retrieval, "byte_token_ids", fail_midway)
    with pytest.raises(RuntimeError, match="interrupted"):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "retrieval") == []
    monkeypatch.undo()
    dm = make_dm(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert len(cache_entries(tmp_path, "retrieval")) == 1
    assert dm.datasets["test"].arrays["label"].tolist() == [1, 0]


def test_cache_key_follows_text_length_and_files(tmp_path) -> None:
    folder = write_tsv_data(tmp_path / "lra_release" / "tsv_data")
    first = make_dm(tmp_path).ensure_cache()
    assert make_dm(tmp_path).ensure_cache() == first
    second = make_dm(tmp_path, text_length=6).ensure_cache()
    path = folder / retrieval.FILES["val"]
    path.write_text(path.read_text() + "1.0\tE3\tE4\tm\tn\n")
    third = make_dm(tmp_path).ensure_cache()
    assert len({first, second, third}) == 3


def test_two_towers_train_end_to_end(compose_cfg, tmp_path) -> None:
    import hydra

    from mra_lra.train import run

    write_tsv_data(tmp_path / "data" / "lra_release" / "lra_release" / "tsv_data")
    overrides = [
        "task=retrieval",
        "attn=softmax",
        "data.max_length=64",
        "data.text_length=60",
        "data.batch_size=2",
        "data.num_workers=0",
        *THREE_CPU_STEPS,
    ]
    cfg = compose_cfg(overrides, run_dir=tmp_path / "run", data_dir=tmp_path / "data")
    results = run(cfg)
    assert results["task"] == "retrieval" and results["steps"] == 3
    assert results["val_acc_best"] is not None and 0.0 <= results["test_acc"] <= 1.0

    # eval.py rebuilds the two-tower model; its predictions carry both documents' lengths.
    from mra_lra.evaluate import evaluate

    again = evaluate(tmp_path / "run", out=tmp_path / "eval.json", predictions=True)
    assert again["test_acc"] == pytest.approx(results["test_acc"], abs=1e-6)
    header = (tmp_path / "eval_test_predictions.csv").read_text().splitlines()[0]
    assert header == "index,prediction,label,length,length_2,correct"

    # The batched 2B-sequence pass equals encoding each document on its own, with the head on
    # [u, v, u*v, u-v] (spec/lra.md).
    net = hydra.utils.instantiate(cfg.model, _convert_="all").eval()
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        u = net.encoder(batch["input_ids"], batch["mask"])
        v = net.encoder(batch["input_ids_2"], batch["mask_2"])
        expected = net.head(torch.cat([u, v, u * v, u - v], dim=-1))
        torch.testing.assert_close(net(batch), expected)
    assert expected.shape == (2, 2)


def test_a_split_without_examples_is_refused_and_caches_nothing(tmp_path) -> None:
    """Empty TSV files (a damaged copy): no empty split is cached for later runs to trust."""
    write_tsv_data(tmp_path / "lra_release" / "tsv_data", {**ROWS, "val": []})
    with pytest.raises(SourceError, match="the val split.*hold no examples"):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "retrieval") == []
