"""Pathfinder / Path-X: the release's PNG + metadata layout from a tar.gz or a folder, the
numeric metadata order and seeded split, bad files, generated sets, and a few training steps."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mra_lra.data import pathfinder, pathfinder_generator
from mra_lra.data.pathfinder import PathfinderDataModule, parse_metadata, split_indices
from mra_lra.data.pixels import pixel_dataset_options
from mra_lra.data.sources import SourceError
from tests.data.helpers import THREE_CPU_STEPS, cache_entries, ready

HARD = "curv_contour_length_14"
# Metadata files 0, 1, 2 and 10: read numerically (0, 1, 2, 10), not as strings (0, 1, 10, 2).
FILE_NUMBERS = (0, 1, 2, 10)
PER_FILE = 5  # 20 images -> 16 train / 2 val / 2 test


def fixture_image(ident: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """A side x side uint8 image that says which one it is: pixel (0, 0) = ident, pixel (0, 1) =
    255, pixel (1, 0) = 0, and dim noise (1-40) elsewhere (so the PNGs do not compress away)."""
    pixels = rng.integers(1, 41, size=(side, side), dtype=np.uint8)
    pixels[0, 0], pixels[0, 1], pixels[1, 0] = ident, 255, 0
    return pixels


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def release_files(side: int = 32, numbers=FILE_NUMBERS, per_file: int = PER_FILE) -> dict:
    """Files below `pathfinder<side>/<difficulty>/`: PNGs and metadata lines as the release writes
    them. Image ident (its pixel (0, 0)) counts 1, 2, ... in metadata order; label = ident % 2."""
    rng = np.random.default_rng(0)
    files, ident = {}, 0
    for k in numbers:
        lines = []
        for i in range(per_file):
            ident += 1
            files[f"imgs/{k}/sample_{i}.png"] = png(fixture_image(ident, side, rng))
            lines.append(f"imgs/{k} sample_{i}.png {i} {ident % 2} 2 14 1.5\n")
        files[f"metadata/{k}.npy"] = "".join(lines).encode()
    return files


def metadata_order_idents(numbers=FILE_NUMBERS, per_file: int = PER_FILE) -> list[int]:
    return list(range(1, len(numbers) * per_file + 1))


def write_tree(root: Path, files: dict, side: int = 32, difficulty: str = HARD) -> Path:
    base = root / f"pathfinder{side}" / difficulty
    for rel, blob in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(blob)
    return base


def write_archive(path: Path, files: dict, side: int = 32, other: dict | None = None) -> Path:
    """A gzip tar like lra_release.gz: nested lra_release/lra_release/, the images before the
    metadata, and another difficulty (`other`) that must be ignored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    top = "lra_release/lra_release"
    members = {f"{top}/listops-1000/basic_test.tsv": b"Source\tTarget\n"}
    for rel, blob in (other or {}).items():
        members[f"{top}/pathfinder{side}/curv_baseline/{rel}"] = blob
    ordered = sorted(files, key=lambda rel: rel.startswith("metadata/"))
    for rel in ordered:
        members[f"{top}/pathfinder{side}/{HARD}/{rel}"] = files[rel]
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def make_dm(data_dir: Path, **overrides) -> PathfinderDataModule:
    args = dict(
        data_dir=str(data_dir),
        batch_size=64,
        max_length=1024,
        num_workers=0,
        resolution=32,
        difficulty=HARD,
        split_seed=0,
        num_train=24,
        num_val=4,
        num_test=4,
        gen_seed=0,
        gen_workers=1,
        pixel_zero_is_pad=False,
        patch_order=None,
    )
    return PathfinderDataModule(**{**args, **overrides})


def split_batch(dm: PathfinderDataModule, split: str) -> dict[str, torch.Tensor]:
    return next(iter(dm._loader(split, shuffle=False)))


def idents(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


# -- metadata -----------------------------------------------------------------------------------
def test_metadata_lines_hand_parsed() -> None:
    text = "imgs/3 sample_0.png 0 1 2 14\n\nimgs/3 sample_17.png 17 0\n"
    assert parse_metadata(text, "m/3.npy") == [
        ("imgs/3/sample_0.png", 1),
        ("imgs/3/sample_17.png", 0),
    ]
    with pytest.raises(ValueError, match=r"m/3.npy:2: expected `imgs/<k> sample_<i>.png"):
        parse_metadata("imgs/3 sample_0.png 0 1\nimgs/3 sample_1.png 1\n", "m/3.npy")
    with pytest.raises(ValueError, match=r"m/3.npy:1: the label .* '2' is not 0 or 1"):
        parse_metadata("imgs/3 sample_0.png 0 2\n", "m/3.npy")


def test_split_is_80_10_10_of_a_seeded_permutation() -> None:
    splits = split_indices(20, seed=5)
    order = np.random.default_rng(5).permutation(20)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    np.testing.assert_array_equal(np.concatenate(list(splits.values())), order)


# -- reading the release ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["archive", "nested_folder", "folder", "source_archive"])
def test_release_shapes_give_the_same_tokens(tmp_path, shape) -> None:
    data_dir, source, files = tmp_path / "data", None, release_files()
    if shape == "archive":
        write_archive(data_dir / "lra_release.gz", files, other=release_files(numbers=(0,)))
    elif shape == "nested_folder":
        write_tree(data_dir / "lra_release" / "lra_release", files)
    elif shape == "folder":
        write_tree(data_dir / "lra_release", files)
    else:
        source = str(write_archive(tmp_path / "dl" / "lra_release.gz", files))
    dm = ready(make_dm(data_dir, source=source))
    assert (dm.task, dm.num_classes, dm.vocab_size) == ("pathfinder", 2, 256)
    assert dm.generated is None  # results.json: data_generated null, a release number
    batches = {s: split_batch(dm, s) for s in ("train", "val", "test")}
    assert [len(b["label"]) for b in batches.values()] == [16, 2, 2]
    # The split follows the metadata in numeric file order (0, 1, 2, 10) through the seeded
    # permutation; idents count 1..20 in that order.
    order = metadata_order_idents()
    for split, rows in split_indices(20, seed=0).items():
        assert idents(batches[split]) == [order[r] for r in rows], split
    rng = np.random.default_rng(0)
    pixels = {i + 1: fixture_image(i + 1, 32, rng).reshape(-1) for i in range(20)}
    for batch in batches.values():
        for ids, label in zip(batch["input_ids"], batch["label"], strict=True):
            ident = ids[0].item()
            np.testing.assert_array_equal(ids.numpy(), pixels[ident])
            assert label.item() == ident % 2
        assert batch["mask"].shape == (len(batch["label"]), 1024) and bool(batch["mask"].all())


def test_lexicographic_metadata_order_would_split_differently() -> None:
    # Guards the test above: with files 0, 1, 2, 10 the string order gives other splits.
    numeric = metadata_order_idents()
    lexicographic = numeric[:10] + numeric[15:] + numeric[10:15]  # 0, 1, 10, 2
    rows = split_indices(20, seed=0)["test"]
    assert [numeric[r] for r in rows] != [lexicographic[r] for r in rows]


def test_empty_png_and_missing_image_are_skipped_and_counted(tmp_path, caplog) -> None:
    files = release_files()
    files["imgs/0/sample_2.png"] = b""  # as pathfinder32/curv_baseline/imgs/0/sample_172.png
    files["imgs/1/sample_3.png"] = b"\x89PNG\r\n\x1a\n broken"
    del files["imgs/10/sample_4.png"]
    write_tree(tmp_path / "lra_release", files)
    with caplog.at_level(logging.WARNING, logger=pathfinder.__name__):
        dm = ready(make_dm(tmp_path))
    assert dm.skipped == {"unreadable": 2, "missing": 1}
    assert "skipped 2 images that are empty or unreadable" in caplog.text
    assert "imgs/0/sample_2.png (empty file)" in caplog.text
    assert "skipped 1 images listed in the metadata but missing" in caplog.text
    assert "imgs/10/sample_4.png" in caplog.text
    assert "the metadata lists 20 images, the release 200000" in caplog.text
    kept = sorted(i for s in ("train", "val", "test") for i in idents(split_batch(dm, s)))
    assert kept == sorted(set(range(1, 21)) - {3, 9, 20})


def test_malformed_metadata_names_file_and_line(tmp_path) -> None:
    files = release_files()
    files["metadata/2.npy"] = b"imgs/2 sample_0.png 0 1\nimgs/2 sample_1.png\n"
    write_tree(tmp_path / "lra_release", files)
    with pytest.raises(ValueError, match=r"metadata/2.npy:2: expected"):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "pathfinder") == []


def test_truncated_archive_errors_and_caches_nothing(tmp_path) -> None:
    path = write_archive(tmp_path / "lra_release.gz", release_files())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SourceError, match="truncated or corrupt"):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "pathfinder") == []


def test_interrupted_build_leaves_no_entry_and_a_rerun_succeeds(tmp_path, monkeypatch) -> None:
    write_tree(tmp_path / "lra_release", release_files())
    decode, calls = pathfinder.decode_png, []

    def interrupted(blob, side):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return decode(blob, side)

    monkeypatch.setattr(pathfinder, "decode_png", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "pathfinder", hidden=True) == []  # no temporary folder left
    monkeypatch.undo()
    dm = ready(make_dm(tmp_path))
    assert len(dm.datasets["train"]) == 16 and len(cache_entries(tmp_path, "pathfinder")) == 1


def test_folder_changes_select_a_new_cache_entry(tmp_path) -> None:
    base = write_tree(tmp_path / "lra_release", release_files())
    ready(make_dm(tmp_path))
    shutil.rmtree(base / "imgs" / "10")
    dm = ready(make_dm(tmp_path))
    assert len(cache_entries(tmp_path, "pathfinder")) == 2 and dm.skipped["missing"] == 5


def test_bad_settings_and_missing_sources(tmp_path) -> None:
    with pytest.raises(ValueError, match="data.difficulty must be one of"):
        make_dm(tmp_path, difficulty="curv_contour_length_20")
    with pytest.raises(FileNotFoundError, match="source=.* does not exist"):
        make_dm(tmp_path, source=str(tmp_path / "nowhere.gz")).prepare_data()
    # No generator preset for 64 x 64: the message says where to put the release.
    with pytest.raises(FileNotFoundError) as err:
        make_dm(tmp_path, resolution=64, max_length=4096).prepare_data()
    assert pathfinder.URL in str(err.value) and "pathfinder64/curv_contour_length_14" in str(
        err.value
    )


# -- Path-X (128 x 128) -------------------------------------------------------------------------
def test_pathx_release_and_patch_order(tmp_path) -> None:
    files = release_files(side=128, numbers=(0, 1), per_file=5)
    write_archive(tmp_path / "lra_release.gz", files, side=128)
    dm = ready(make_dm(tmp_path, resolution=128, max_length=16384, patch_order=[4, 8]))
    assert dm.task == "pathx" and len(cache_entries(tmp_path, "pathx")) == 1
    batch = split_batch(dm, "train")
    assert batch["input_ids"].shape == (8, 16384)
    # [4, 8] patches of a 128-wide image: tokens 0-31 are rows 0-3 x columns 0-7, so pixel (0, 1)
    # (255) is token 1 and pixel (1, 0) (0) is token 8; token 32 starts the patch at column 8.
    assert bool((batch["input_ids"][:, 1] == 255).all())
    assert bool((batch["input_ids"][:, 8] == 0).all())
    order = pixel_dataset_options(128, 128, 16384, False, [4, 8])["order"]
    assert order[:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 128, 129]
    assert (order[32], order[511], order[512]) == (8, 3 * 128 + 127, 4 * 128)


# -- generated sets -----------------------------------------------------------------------------
def test_generated_when_no_release(tmp_path, caplog, monkeypatch) -> None:
    with caplog.at_level(logging.WARNING, logger=pathfinder.__name__):
        dm = ready(make_dm(tmp_path))
    assert "not comparable with numbers on the LRA release" in caplog.text
    assert dm.generated_dir.parent == tmp_path / "generated" / "pathfinder32"
    # results.json's data_generated: the preset, the generator version, the count and the seed.
    assert dm.generated["preset"] == "pathfinder32" and dm.generated["seed"] == dm.gen_seed
    assert dm.generated["num_images"] == 32
    images, labels = pathfinder_generator.load_dataset(dm.generated_dir)
    assert images.shape == (32, 32, 32)
    for split, (a, b) in {"train": (0, 24), "val": (24, 28), "test": (28, 32)}.items():
        batch = split_batch(dm, split)
        np.testing.assert_array_equal(batch["input_ids"].numpy(), images[a:b].reshape(b - a, -1))
        np.testing.assert_array_equal(batch["label"].numpy(), labels[a:b])
    # A second datamodule reuses the shards and the cache: nothing is generated again.
    monkeypatch.setattr(
        pathfinder_generator, "generate_image", lambda *a: pytest.fail("regenerated")
    )
    again = ready(make_dm(tmp_path))
    assert again.datasets["test"].entry == dm.datasets["test"].entry
    # Other generator settings: another folder.
    assert make_dm(tmp_path, gen_seed=1).generated_dir != dm.generated_dir


def test_pixel_zero_is_pad_masks_black_pixels(tmp_path) -> None:
    write_tree(tmp_path / "lra_release", release_files())
    dm = ready(make_dm(tmp_path, pixel_zero_is_pad=True))
    batch = split_batch(dm, "val")
    # Every fixture pixel is non-zero except pixel (1, 0), token 32.
    expected = torch.ones(1024)
    expected[32] = 0.0
    for row in batch["mask"]:
        torch.testing.assert_close(row, expected)


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "task,extra",
    [
        ("pathfinder", ["attn=softmax", "data.max_length=256"]),
        ("pathx", ["attn=mra", "data.max_length=256"]),
    ],
)
def test_a_few_training_steps(compose_cfg, tmp_path, task, extra) -> None:
    from mra_lra.train import run

    side = 32 if task == "pathfinder" else 128
    files = release_files(side=side, numbers=(0, 1, 2), per_file=4)
    source = write_archive(tmp_path / "src" / "lra_release.gz", files, side=side)
    overrides = [
        f"task={task}",
        f"data.source={source}",
        "data.num_workers=0",
        "data.batch_size=4",
        *THREE_CPU_STEPS,
        "test=false",
        *extra,
    ]
    results = run(compose_cfg(overrides, run_dir=tmp_path / "run", data_dir=tmp_path / "data"))
    assert results["task"] == task and results["steps"] == 3
    assert results["val_acc_best"] is not None
    assert results["data_generated"] is None  # the release's files were read


def test_generated_set_may_leave_a_split_empty(tmp_path) -> None:
    """num_val=0 is a choice for a generated set, not a sign of wrong files."""
    dm = make_dm(tmp_path, num_train=8, num_val=0, num_test=2)
    dm.prepare_data()
    dm.setup()
    assert {split: len(d) for split, d in dm.datasets.items()} == {"train": 8, "val": 0, "test": 2}


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"num_train": 0}, "with data.num_train=0, the generated set has no train examples"),
        ({"num_test": 0}, "with data.num_test=0, the generated set has no test examples"),
    ],
)
def test_generated_set_without_train_or_test_examples_is_refused_before_generating(
    tmp_path, sizes, message
) -> None:
    """num_train=0 trained 0 steps and "succeeded", after generating num_val + num_test images."""
    with pytest.raises(ValueError, match=message):
        make_dm(tmp_path, **sizes).prepare_data()
    assert not (tmp_path / "generated").exists() and cache_entries(tmp_path, "pathfinder") == []


def test_generated_release_layout_round_trips_through_the_loader(tmp_path) -> None:
    """`--layout release` writes the release's files (text metadata in the original's column
    order), which this loader reads as a release: the tokens are the generated images, split as
    any release folder is."""
    out = tmp_path / "made" / "pathfinder32" / HARD
    settings = pathfinder_generator.PRESETS["pathfinder32_easy"]
    argv = ["--preset", "pathfinder32_easy", "--num", "20", "--out", str(out), "--workers", "1"]
    pathfinder_generator.main([*argv, "--shard-size", "6", "--layout", "release"])
    assert sorted(p.name for p in (out / "imgs").iterdir()) == ["0", "1", "2", "3"]
    lines = (out / "metadata" / "3.npy").read_text().splitlines()
    images, labels = pathfinder_generator.generate_images(settings, 0, 0, 20)
    # folder 3 holds images 18 and 19 as sample_0, sample_1; the margin column is 1
    assert [line.split()[:4] for line in lines] == [
        ["imgs/3", f"sample_{i}.png", str(i), str(labels[18 + i])] for i in range(2)
    ]
    assert all(line.split()[4:] == ["1.0", "6", "4", "2", "0.5", "1", "1"] for line in lines)
    with Image.open(out / "imgs" / "3" / "sample_1.png") as png:
        assert png.mode == "L" and np.array_equal(np.asarray(png), images[19])
    dm = ready(make_dm(tmp_path / "data", source=str(tmp_path / "made")))
    assert dm.generated is None
    for split, rows in split_indices(20, seed=0).items():
        batch = split_batch(dm, split)
        np.testing.assert_array_equal(
            batch["input_ids"].numpy(), images[rows].reshape(len(rows), -1)
        )
        np.testing.assert_array_equal(batch["label"].numpy(), labels[rows])
    # and our own reader gives the same arrays back
    got = pathfinder_generator.load_dataset(out)
    assert np.array_equal(got[0], images) and np.array_equal(got[1], labels)
