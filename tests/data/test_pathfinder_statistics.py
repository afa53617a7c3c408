"""Our Pathfinder-32 images against the original generator's per-image statistics.

The original's numbers (mean, sd over its images) were measured on images made by the original
code (drewlinsley/pathfinder, snakes2.py + snakes.py) with LRA's 32 x 32 settings, as issue 18
and spec/lra.md report them. The bands are the issue's acceptance rule: within a quarter of the
original's mean or half its spread, whichever is wider. The statistics are computed here with
our own code (a flood fill for the pieces), independent of `image_statistics`, which is checked
against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from mra_lra.data.pathfinder_generator import PRESETS, generate_images, image_statistics
from tests.data.test_pathfinder_generator import _blobs

# statistic: (original's mean, original's sd)
ORIGINAL = {
    "gt0": (0.34, 0.04),  # fraction of pixels > 0
    "ge64": (0.11, 0.01),  # fraction of pixels >= 64
    "pieces": (14.6, 2.8),  # 8-connected components of pixels >= 64
    "median8": (134.0, 17.0),  # median value of the pixels >= 8
    "at255": (3.0, 2.8),  # pixels at 255
}
# half-width of each band: max(mean / 4, sd / 2)
#   gt0 0.085 -> [0.255, 0.425]     ge64 0.0275 -> [0.0825, 0.1375]
#   pieces 3.65 -> [10.95, 18.25]   median8 33.5 -> [100.5, 167.5]   at255 1.4 -> [1.6, 4.4]
BANDS = {k: (m - max(m / 4, sd / 2), m + max(m / 4, sd / 2)) for k, (m, sd) in ORIGINAL.items()}
NUM = 120  # seeded; the standard error of each mean is sd / 11, far inside the bands


@pytest.fixture(scope="module")
def hard_images() -> np.ndarray:
    return generate_images(PRESETS["pathfinder32"], 0, 0, NUM)[0]


def _per_image(images: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "gt0": np.array([(im > 0).mean() for im in images]),
        "ge64": np.array([(im >= 64).mean() for im in images]),
        "pieces": np.array([_blobs(im >= 64) for im in images]),
        "median8": np.array([np.median(im[im >= 8]) for im in images]),
        "at255": np.array([(im == 255).sum() for im in images]),
    }


def test_statistics_sit_in_the_original_bands(hard_images):
    means = {k: v.mean() for k, v in _per_image(hard_images).items()}
    outside = {
        k: (round(means[k], 3), BANDS[k])
        for k in BANDS
        if not (BANDS[k][0] <= means[k] <= BANDS[k][1])
    }
    assert not outside, outside


def test_image_statistics_counts_as_the_flood_fill(hard_images):
    reference = _per_image(hard_images[:60])
    ours = image_statistics(hard_images[:60])
    for key, values in reference.items():
        assert ours[key][0] == pytest.approx(values.mean(), rel=1e-9), key
        assert ours[key][1] == pytest.approx(values.std(), rel=1e-9, abs=1e-12), key
