"""LRA Image: CIFAR-10 in grayscale, one pixel per token (vocabulary 256), as a datamodule.

Source: the CIFAR-10 "python version" (not in lra_release.gz), `cifar-10-python.tar.gz` or the
`cifar-10-batches-py/` it extracts to. data_batch_1..5 give 45k train and 5k val images (a tenth
drawn with `data.split_seed`), test_batch 10k test images; grayscale as torchvision computes it.
"""

from __future__ import annotations

import logging
import pickle
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mra_lra.data.cache import file_fingerprint
from mra_lra.data.pixels import PixelDataModule, pixel_arrays
from mra_lra.data.sources import SourceError, SourceTree, locate_source

log = logging.getLogger(__name__)

# Bump when the decoding or the grayscale conversion changes, so that cached arrays are rebuilt.
FORMAT_VERSION = 1
SIDE = 32
ANCHOR = "cifar-10-batches-py"
CANDIDATES = ("cifar-10-python.tar.gz", "cifar-10-batches-py")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# The release's sizes; other sizes (a subsample) get a warning, not an error.
RELEASE_SIZES = {"train+val": 50_000, "test": 10_000}
VAL_FRACTION = 0.1

# ITU-R 601-2 luma weights as torchvision writes them (they sum to 0.9999, not 1).
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def rgb_to_grayscale(planes: np.ndarray) -> np.ndarray:
    """uint8 [..., 3, H, W] (R, G, B planes) -> uint8 [..., H, W] as torchvision computes it: the
    weighted sum in float32, then a truncating cast (white becomes 254)."""
    planes = np.asarray(planes)
    if planes.dtype != np.uint8 or planes.ndim < 3 or planes.shape[-3] != 3:
        raise ValueError(f"expected uint8 [..., 3, H, W], got {planes.dtype} {planes.shape}")
    r, g, b = (planes[..., c, :, :].astype(np.float32) for c in range(3))
    gray = GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b
    return gray.astype(np.uint8)


def how_to_get(data_dir: Path) -> str:
    return (
        f"Download {URL} (CIFAR-10, python version, 163 MB) and put it at "
        f"{data_dir / CANDIDATES[0]} (or extract it there, giving {data_dir / ANCHOR}/), or point "
        "source= at the archive or folder where you keep it: "
        "`python -m mra_lra.data.prepare task=image source=/path/to/cifar-10-python.tar.gz`."
    )


def read_cifar_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels uint8 [N, 3072] and labels uint8 [N] of one pickled batch file named `where`."""
    fix = f"Replace it with the file from {URL}."
    try:
        batch = pickle.loads(blob, encoding="bytes")
    except Exception as err:
        raise SourceError(
            f"{where} is not a CIFAR-10 python batch ({type(err).__name__}: {err}). {fix}"
        ) from err
    if not isinstance(batch, dict):
        raise SourceError(f"{where} holds a {type(batch).__name__}, not a dict. {fix}")
    # Keys are bytes as distributed; str keys appear when someone re-pickled it with latin1.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise SourceError(f"{where} has no 'data' and 'labels' entries. {fix}")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise SourceError(
            f"{where}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]. {fix}"
        )
    if labels.shape != (len(data),) or labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise SourceError(f"{where}: 'labels' must be {len(data)} integers 0-9. {fix}")
    return data, labels.astype(np.uint8)


class ImageDataModule(PixelDataModule):
    task = "image"
    num_classes = 10

    def __init__(self, *args: Any, split_seed: int, **kwargs: Any) -> None:
        super().__init__(*args, side=SIDE, **kwargs)
        self.split_seed = split_seed

    @cached_property
    def tree(self) -> SourceTree:
        return locate_source(
            self.data_dir, self.source, ANCHOR, CANDIDATES, how_to_get(self.data_dir)
        )

    def ensure_sources(self) -> None:
        self.tree  # noqa: B018 (locating is the check)

    def _fingerprint(self) -> dict[str, Any]:
        tree = self.tree
        if tree.is_archive:
            return file_fingerprint(tree.path)
        paths = [tree.root / name for name in (*TRAIN_FILES, TEST_FILE)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{tree.root} lacks {', '.join(missing)}. {how_to_get(self.data_dir)}"
            )
        return {p.name: file_fingerprint(p) for p in paths}

    def cache_options(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "format_version": FORMAT_VERSION,
            "source": self._fingerprint(),
            "max_length": self.max_length,
            "split_seed": self.split_seed,
            "val_fraction": VAL_FRACTION,
        }

    def build_arrays(self) -> dict[str, np.ndarray]:
        wanted = {*TRAIN_FILES, TEST_FILE}
        batches = {}
        with tqdm(total=len(wanted), desc="image: CIFAR-10 batches", disable=None) as bar:
            for name, blob in self.tree.iter_files(wanted.__contains__):
                batches[name] = read_cifar_batch(blob, f"{self.tree.path}: {ANCHOR}/{name}")
                bar.update()
        missing = sorted(wanted - batches.keys())
        if missing:
            raise SourceError(
                f"{self.tree.path} lacks {', '.join(f'{ANCHOR}/{m}' for m in missing)}. "
                f"{how_to_get(self.data_dir)}"
            )
        train_pixels = np.concatenate([batches[name][0] for name in TRAIN_FILES])
        train_labels = np.concatenate([batches[name][1] for name in TRAIN_FILES])
        test_pixels, test_labels = batches[TEST_FILE]
        for what, count in (("train+val", len(train_labels)), ("test", len(test_labels))):
            if count != RELEASE_SIZES[what]:
                log.warning(
                    "image: %s has %d images, the release %d (a subsample?)",
                    what,
                    count,
                    RELEASE_SIZES[what],
                )
        num_val = round(VAL_FRACTION * len(train_labels))
        order = np.random.default_rng(self.split_seed).permutation(len(train_labels))
        rows = {"train": order[num_val:], "val": order[:num_val]}
        splits = {split: (train_pixels[r], train_labels[r]) for split, r in rows.items()}
        splits["test"] = (test_pixels, test_labels)
        arrays = {}
        for split, (pixels, labels) in splits.items():
            gray = rgb_to_grayscale(pixels.reshape(-1, 3, SIDE, SIDE)).reshape(len(labels), -1)
            for name, array in pixel_arrays(gray, labels, self.max_length, split).items():
                arrays[f"{split}_{name}"] = array
        return arrays
