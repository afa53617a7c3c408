"""LRA Image (CIFAR-10 grayscale): reading the release formats, grayscale values, splits, the
pixel fidelity switches, the continuous input encoding and a few training steps."""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mra_lra.data import image
from mra_lra.data.image import ImageDataModule, rgb_to_grayscale
from mra_lra.data.pixels import patch_permutation
from mra_lra.data.sources import SourceError
from mra_lra.models.encoder import LRAClassifier
from tests.data.helpers import THREE_CPU_STEPS, cache_entries, ready

SIDE = 32
PER_TRAIN_BATCH = 4  # 5 batches -> 20 train+val images -> 18 train / 2 val
PER_TEST_BATCH = 3

# (R, G, B) -> torchvision's uint8 grayscale, worked by hand: 0.2989 R + 0.587 G + 0.114 B,
# truncated. The weights sum to 0.9999, so grey levels drop by one (255 -> 254, 2 -> 1).
HAND_GRAY = [
    ((0, 0, 0), 0),
    ((255, 255, 255), 254),  # 254.9745
    ((1, 1, 1), 0),  # 0.9999
    ((2, 2, 2), 1),  # 1.9998
    ((255, 0, 0), 76),  # 76.2195
    ((0, 255, 0), 149),  # 149.685
    ((0, 0, 255), 29),  # 29.07
    ((100, 150, 200), 140),  # 29.89 + 88.05 + 22.8 = 140.74
    ((200, 100, 50), 124),  # 59.78 + 58.7 + 5.7 = 124.18
    ((10, 20, 30), 18),  # 2.989 + 11.74 + 3.42 = 18.149
]


def cifar_image(index: int) -> np.ndarray:
    """A 3072-byte CIFAR row (R, G, B planes) that identifies itself and tests the layout: pixel
    (0, 0) is pure red, (0, 1) pure green, (1, 0) pure blue, (0, 8) white, and the last pixel
    (31, 31) is grey `index + 10` in all three planes (gray index + 9)."""
    planes = np.zeros((3, SIDE, SIDE), dtype=np.uint8)
    planes[0, 0, 0] = 255
    planes[1, 0, 1] = 255
    planes[2, 1, 0] = 255
    planes[:, 0, 8] = 255
    planes[:, 31, 31] = index + 10
    return planes.reshape(-1)


def batch_blob(first: int, count: int) -> bytes:
    data = np.stack([cifar_image(first + i) for i in range(count)])
    labels = [(first + i) % 10 for i in range(count)]
    # As distributed: a dict with bytes keys (written by Python 2's cPickle).
    batch = {b"batch_label": b"fixture", b"labels": labels, b"data": data, b"filenames": []}
    return pickle.dumps(batch, protocol=2)


def cifar_files() -> dict[str, bytes]:
    files = {
        f"data_batch_{b + 1}": batch_blob(b * PER_TRAIN_BATCH, PER_TRAIN_BATCH) for b in range(5)
    }
    files["test_batch"] = batch_blob(100, PER_TEST_BATCH)
    files["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
    return files


def write_folder(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, blob in cifar_files().items():
        (folder / name).write_bytes(blob)
    return folder


def write_archive(path: Path, files: dict[str, bytes] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in (files or cifar_files()).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def make_dm(data_dir: Path, **overrides) -> ImageDataModule:
    args = dict(
        data_dir=str(data_dir),
        batch_size=32,
        max_length=1024,
        num_workers=0,
        split_seed=0,
        pixel_zero_is_pad=False,
        patch_order=None,
    )
    return ImageDataModule(**{**args, **overrides})


def image_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    """Which fixture image each row is (its last pixel is grey index + 10 -> gray index + 9)."""
    return [v - 9 for v in batch["input_ids"][:, 1023].tolist()]


# -- grayscale ----------------------------------------------------------------------------------
def test_grayscale_matches_hand_computed_pixels() -> None:
    rgb = np.array([c for c, _ in HAND_GRAY], dtype=np.uint8)  # [P, 3]
    planes = rgb.T.reshape(3, 1, len(HAND_GRAY))
    assert rgb_to_grayscale(planes).reshape(-1).tolist() == [g for _, g in HAND_GRAY]


def test_grayscale_matches_torchvision_formula_on_random_pixels() -> None:
    # torchvision's rgb_to_grayscale on uint8 tensors: (0.2989 r + 0.587 g + 0.114 b).to(uint8).
    planes = np.random.default_rng(0).integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)
    r, g, b = torch.from_numpy(planes).unbind(dim=-3)
    expected = (0.2989 * r + 0.587 * g + 0.114 * b).to(torch.uint8).numpy()
    np.testing.assert_array_equal(rgb_to_grayscale(planes), expected)


# -- reading the release ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["archive", "folder", "source_archive"])
def test_release_shapes_give_the_same_tokens(tmp_path, shape) -> None:
    data_dir = tmp_path / "data"
    source = None
    if shape == "archive":
        write_archive(data_dir / "cifar-10-python.tar.gz")
    elif shape == "folder":
        write_folder(data_dir)
    else:
        source = str(write_archive(tmp_path / "elsewhere" / "c10.tar.gz"))
    dm = ready(make_dm(data_dir, source=source))
    assert (dm.num_classes, dm.vocab_size) == (10, 256)
    train = next(iter(dm.val_dataloader()))
    assert set(train) == {"input_ids", "mask", "label"}
    assert train["input_ids"].dtype == torch.long and train["input_ids"].shape == (2, 1024)
    expected = np.zeros(1024, dtype=np.int64)
    expected[0], expected[1], expected[32], expected[8] = 76, 149, 29, 254
    for row, index in enumerate(image_ids(train)):
        expected[1023] = index + 9
        np.testing.assert_array_equal(train["input_ids"][row].numpy(), expected)
        assert train["label"][row].item() == index % 10
    assert train["mask"].dtype == torch.float32 and bool((train["mask"] == 1).all())
    test = next(iter(dm.test_dataloader()))
    assert image_ids(test) == [100, 101, 102]
    assert test["label"].tolist() == [0, 1, 2]


def test_split_is_seeded_and_partitions_the_training_batches(tmp_path) -> None:
    write_folder(tmp_path)
    dm = ready(make_dm(tmp_path))
    splits = {s: image_ids(next(iter(dm._loader(s, shuffle=False)))) for s in ("train", "val")}
    assert len(splits["train"]) == 18 and len(splits["val"]) == 2
    assert sorted(splits["train"] + splits["val"]) == list(range(20))
    again = ready(make_dm(tmp_path))
    assert image_ids(next(iter(again.val_dataloader()))) == splits["val"]
    other = ready(make_dm(tmp_path, split_seed=1))
    assert image_ids(next(iter(other.val_dataloader()))) != splits["val"]
    assert len(cache_entries(tmp_path, "image")) == 2  # the seed is part of the cache key


def test_other_split_sizes_warn(tmp_path, caplog) -> None:
    write_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mra_lra.data.image"):
        make_dm(tmp_path).prepare_data()
    assert "train+val has 20 images, the release 50000" in caplog.text
    assert "test has 3 images, the release 10000" in caplog.text


def test_missing_files_name_url_and_place(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        make_dm(tmp_path).prepare_data()
    message = str(err.value)
    assert image.URL in message and "source=" in message
    assert str(tmp_path / "cifar-10-python.tar.gz") in message


def test_folder_without_test_batch_names_it(tmp_path) -> None:
    folder = write_folder(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        make_dm(tmp_path).prepare_data()


def test_corrupt_batch_names_the_file(tmp_path) -> None:
    files = cifar_files()
    files["data_batch_3"] = b"not a pickle"
    write_archive(tmp_path / "cifar-10-python.tar.gz", files)
    with pytest.raises(SourceError, match="data_batch_3 is not a CIFAR-10 python batch"):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "image") == []


def test_truncated_archive_errors_and_caches_nothing(tmp_path) -> None:
    # Photos compress poorly: a noisy last batch holds most of the archive's bytes, so cutting it
    # in half cuts inside that member, as a broken download of the real archive would.
    files = cifar_files()
    noise = np.random.default_rng(0).integers(0, 256, (50, 3072), dtype=np.uint8)
    files["test_batch"] = pickle.dumps({b"data": noise, b"labels": [0] * 50}, protocol=2)
    path = write_archive(tmp_path / "cifar-10-python.tar.gz", files)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SourceError, match="truncated or corrupt"):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "image") == []


def test_interrupted_build_leaves_no_entry_and_a_rerun_succeeds(tmp_path, monkeypatch) -> None:
    write_folder(tmp_path)
    calls = []

    def fail_on_second_split(planes):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return rgb_to_grayscale(planes)

    monkeypatch.setattr(image, "rgb_to_grayscale", fail_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        make_dm(tmp_path).prepare_data()
    assert cache_entries(tmp_path, "image", hidden=True) == []  # no temporary folder left
    monkeypatch.undo()
    dm = ready(make_dm(tmp_path))
    assert len(dm.datasets["train"]) == 18 and len(cache_entries(tmp_path, "image")) == 1


# -- fidelity switches --------------------------------------------------------------------------
def test_patch_permutation_hand_built() -> None:
    # A 4 x 4 image in 2 x 2 patches: raster indices
    #    0  1 |  2  3
    #    4  5 |  6  7
    #   ------+------
    #    8  9 | 10 11
    #   12 13 | 14 15
    assert patch_permutation(4, 4, [2, 2]).tolist() == [
        0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
    ]  # fmt: skip
    # 2 x 4 patches of a 4 x 8 image: rows 0-1 of columns 0-3 first, then of columns 4-7.
    assert patch_permutation(4, 8, [2, 4]).tolist()[:16] == [
        0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="must divide"):
        patch_permutation(32, 32, [5, 8])


def test_patch_order_4x8_on_batches(tmp_path) -> None:
    write_folder(tmp_path)
    dm = ready(make_dm(tmp_path, patch_order=[4, 8]))
    ids = next(iter(dm.test_dataloader()))["input_ids"][0]
    # Tokens 0-31 are rows 0-3 x columns 0-7: (0,0) red at 0, (0,1) green at 1, (1,0) blue at 8.
    assert (ids[0].item(), ids[1].item(), ids[8].item()) == (76, 149, 29)
    # Tokens 32-63 are rows 0-3 x columns 8-15: the white (0, 8) comes first.
    assert ids[32].item() == 254
    # The last patch (rows 28-31, columns 24-31) ends with pixel (31, 31).
    assert ids[1023].item() == 100 + 9
    assert int((ids != 0).sum()) == 5


def test_pixel_zero_is_pad_masks_black_pixels(tmp_path) -> None:
    write_folder(tmp_path)
    dm = ready(make_dm(tmp_path, pixel_zero_is_pad=True, max_length=1056))
    batch = next(iter(dm.test_dataloader()))
    expected = torch.zeros(1056)
    expected[[0, 1, 8, 32, 1023]] = 1.0
    for row in batch["mask"]:
        torch.testing.assert_close(row, expected)


def test_padding_past_the_image_and_patch_order_needs_the_whole_image(tmp_path) -> None:
    write_folder(tmp_path)
    batch = next(iter(ready(make_dm(tmp_path, max_length=1056)).test_dataloader()))
    assert batch["mask"][0].tolist() == [1.0] * 1024 + [0.0] * 32
    assert batch["input_ids"][:, 1024:].abs().sum() == 0
    with pytest.raises(ValueError, match="max_length=256 < 1024"):
        make_dm(tmp_path, max_length=256, patch_order=[4, 8])


# -- continuous pixel input ---------------------------------------------------------------------
def classifier(input_encoding: str) -> LRAClassifier:
    return LRAClassifier(
        vocab_size=256, num_classes=10, max_length=64, d_model=16, n_layers=1, n_heads=2,
        d_ffn=32, dropout=0.0, pooling="mean", attn={"name": "softmax"},
        input_encoding=input_encoding,
    )  # fmt: skip


def test_continuous_encoding_is_a_linear_map_of_pixel_over_255() -> None:
    torch.manual_seed(0)
    net = classifier("continuous")
    embed = net.encoder.embed
    assert isinstance(embed, torch.nn.Linear) and embed.in_features == 1
    ids = torch.tensor([[0, 51, 255, 128]])
    captured = {}
    net.encoder.drop.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    net({"input_ids": ids, "mask": torch.ones(1, 4)})
    pixels = torch.tensor([0.0, 0.2, 1.0, 128 / 255])
    expected = pixels[:, None] * embed.weight[:, 0] + embed.bias + net.encoder.pos.weight[:4]
    torch.testing.assert_close(captured["x"][0], expected)
    logits = net({"input_ids": ids, "mask": torch.ones(1, 4)})
    logits.sum().backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0


def test_input_encoding_is_validated_and_tokens_keeps_the_embedding() -> None:
    assert isinstance(classifier("tokens").encoder.embed, torch.nn.Embedding)
    with pytest.raises(ValueError, match="model.input_encoding must be one of"):
        classifier("pixels")


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra",
    [
        ["attn=mra", "data.max_length=256"],
        # The whole image (patch order needs it) at batch 2 keeps this one fast.
        ["attn=softmax", "data.patch_order=[4,8]", "model.input_encoding=continuous"]
        + ["data.batch_size=2"],
    ],
)
def test_a_few_training_steps(compose_cfg, tmp_path, extra) -> None:
    from mra_lra.train import run

    source = write_archive(tmp_path / "src" / "cifar-10-python.tar.gz")
    overrides = [
        "task=image",
        f"data.source={source}",
        "data.num_workers=0",
        *THREE_CPU_STEPS,
        "test=false",
        "data.batch_size=4",
        *extra,
    ]
    results = run(compose_cfg(overrides, run_dir=tmp_path / "run", data_dir=tmp_path / "data"))
    assert results["task"] == "image" and results["steps"] == 3
    assert results["val_acc_best"] is not None
