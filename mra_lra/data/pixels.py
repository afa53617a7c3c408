"""What the pixel tasks (Image, Pathfinder, Path-X) share: two fidelity switches applied when
batches are cut (the cache keeps raster order, so one entry serves every setting).

- `patch_order: [ph, pw]` orders pixels patch by patch (both in raster order), so that with the
  MRA paper's [4, 8] each 32-token MRA block covers a 4 x 8 patch instead of one image row.
- `pixel_zero_is_pad: true` masks every black pixel, as the LRA reference code does by treating
  token id 0 as padding (most of a Pathfinder image is black).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from mra_lra.data.base import LRADataModule

log = logging.getLogger(__name__)


def patch_permutation(height: int, width: int, patch: Sequence[int]) -> np.ndarray:
    """Positions in patch order: `order[p]` is the raster index of the pixel placed at `p`."""
    if len(patch) != 2:
        raise ValueError(f"data.patch_order must be [rows, columns], got {list(patch)}")
    ph, pw = (int(v) for v in patch)
    if ph <= 0 or pw <= 0 or height % ph or width % pw:
        raise ValueError(
            f"data.patch_order={[ph, pw]} must divide the {height} x {width} image "
            "(e.g. [4, 8]), or be null for raster order"
        )
    raster = np.arange(height * width, dtype=np.int64)
    return raster.reshape(height // ph, ph, width // pw, pw).transpose(0, 2, 1, 3).reshape(-1)


def pixel_dataset_options(
    height: int,
    width: int,
    max_length: int,
    pixel_zero_is_pad: bool,
    patch_order: Sequence[int] | None,
) -> dict[str, Any]:
    """`CachedArrayDataset` keyword arguments for the two switches; positions past the image
    stay where they are."""
    options: dict[str, Any] = {"mask_mode": "nonzero" if pixel_zero_is_pad else "length"}
    if patch_order is not None:
        num_pixels = height * width
        if max_length < num_pixels:
            raise ValueError(
                f"data.patch_order needs the whole {height} x {width} image, but "
                f"data.max_length={max_length} < {num_pixels}; raise data.max_length or set "
                "data.patch_order=null"
            )
        tail = np.arange(num_pixels, max_length, dtype=np.int64)
        options["order"] = np.concatenate([patch_permutation(height, width, patch_order), tail])
    return options


def pixel_arrays(
    images: np.ndarray, labels: np.ndarray, max_length: int, what: str
) -> dict[str, np.ndarray]:
    """The cache arrays of one split from uint8 images [N, H*W] in raster order (pixel value =
    token id); `length` is the pixel count, so the default mask covers the whole image."""
    num, num_pixels = images.shape
    kept = min(num_pixels, max_length)
    if kept < num_pixels:
        log.warning("%s: data.max_length keeps %d of %d pixels per image", what, kept, num_pixels)
    input_ids = np.zeros((num, max_length), dtype=np.uint8)
    input_ids[:, :kept] = images[:, :kept]
    return {
        "input_ids": input_ids,
        "length": np.full(num, num_pixels, dtype=np.int32),
        "label": np.asarray(labels, dtype=np.uint8),
    }


class PixelDataModule(LRADataModule):
    """A grayscale image task: one token per pixel (0-255) of a `side` x `side` image."""

    vocab_size = 256

    def __init__(
        self,
        *args: Any,
        side: int,
        pixel_zero_is_pad: bool,
        patch_order: Sequence[int] | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.side = side
        self.pixel_zero_is_pad = pixel_zero_is_pad
        self.patch_order = None if patch_order is None else [int(v) for v in patch_order]
        self.dataset_options()  # fail at construction, not after the cache is built

    def dataset_options(self) -> dict[str, Any]:
        return pixel_dataset_options(
            self.side, self.side, self.max_length, self.pixel_zero_is_pad, self.patch_order
        )
