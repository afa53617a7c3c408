"""A seeded Pathfinder / Path-X generator (Linsley et al. 2018), reimplemented and vectorised.

An image holds dashed curves ("snakes" of short straight "paddles") on black. A snake is grown
from a pivot point: paddle k spans pivot_k + m*u_k .. pivot_k + (L + m)*u_k (L = paddle length,
m = margin, u_k the paddle's direction) and the next pivot is pivot_k + (L + 2m)*u_k, so the dashes
are L long with gaps of about 2m. The next direction turns by an angle delta drawn with weight
cos(min(|delta| * continuity, pi/2))^2 (small turns favoured; continuity 1 allows up to 90
degrees, 1.8 up to 50) and zero where the new paddle would come within 2m of a paddle already
drawn (other than the snake's own previous one) or leave the image's border padding. Per image:

1. Two target snakes: the first starts at a point at least 2 * seed_distance from every border
   (near the centre, as in the release code), the second seed_distance away from it; both grow in
   lockstep, one paddle each per step, to contour_length paddles. A snake that gets stuck restarts
   the pair.
2. num_distractors snakes of distractor_length paddles, seeded anywhere free (a distractor that
   cannot be placed in a few tries is left out, as in the release).
3. Two round markers of marker_radius: at the start of one target snake, and at the end of the
   same snake (label 1, connected) or of the other one (label 0). The label is drawn 50/50.
4. Drawing: every paddle and marker is an antialiased distance-field stroke on a canvas
   `supersampling` times finer, paddles at intensity snake_contrast * paddle_contrast and markers
   at 1; the canvas is averaged down and scaled so that the brightest pixel is 255.

Image i of a data set depends only on (seed, i) (`np.random.default_rng([seed, i])`), so the output
is the same for any number of workers and any shard size.

Public API (what the Pathfinder datamodule calls):

- `PathfinderSettings`, `PRESETS` (`pathfinder32`, `pathfinder32_easy`, `pathfinder32_medium`,
  `pathx128`): the knobs, with LRA's values.
- `generate_image(settings, rng) -> (image uint8 [H, W], label)`: one sample.
- `generate_dataset(out_dir, num_images, settings, seed)`: writes shards `images-<k>.npy` (uint8
  [n, H, W]) and `labels-<k>.npy` (uint8 [n]) with a `manifest.json`, each file atomically; a rerun
  skips complete shards, so an interrupted run resumes. All cores by default.
- `load_dataset(out_dir)`: (images, labels) of a finished folder, concatenated from memory-mapped
  shards (pass `out=` to fill an array of your own, e.g. a memory-mapped cache file);
  `iter_shards(out_dir)` streams them instead.

    python -m mra_lra.data.pathfinder_generator --preset pathfinder32 --num 200000 \\
        --out data/generated/pathfinder32 --grid docs/pathfinder_samples.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from mra_lra.data.sources import SourceError
from mra_lra.utils import atomic_open, atomic_write_json, ensure_writable_dir


@dataclass(frozen=True)
class PathfinderSettings:
    """What an image looks like. Lengths are in output pixels (pixel (r, c) spans [c, c+1) x
    [r, r+1), so the image spans [0, image_size] on both axes)."""

    image_size: int  # side of the square output image
    paddle_length: float  # L, the length of one dash
    paddle_thickness: float  # stroke width of a dash
    paddle_margins: tuple[float, ...]  # m, one drawn per image: gap between dashes ~2m, and
    # paddles of different snakes (or far apart on one snake) stay >= 2m apart (centre lines)
    seed_distance: float  # distance between the starts of the two target snakes
    marker_radius: float  # radius of the two round markers
    contour_length: int  # paddles per target snake
    distractor_length: int  # paddles per distractor snake
    num_distractors: int  # distractor snakes per image
    continuity: float  # turn weight cos(min(|turn| * continuity, pi/2))^2: higher = smoother
    snake_contrast: float  # intensity factor of a snake (the release's snake_contrast_list)
    paddle_contrast: float  # intensity factor of a paddle; a paddle's intensity is the product
    border_padding: float  # paddles keep their end points at least this far inside the border
    supersampling: int = 2  # drawing canvas is this many times finer, then averaged down

    def __post_init__(self) -> None:
        positive = {
            "image_size": self.image_size,
            "paddle_length": self.paddle_length,
            "paddle_thickness": self.paddle_thickness,
            "seed_distance": self.seed_distance,
            "marker_radius": self.marker_radius,
            "continuity": self.continuity,
            "snake_contrast": self.snake_contrast,
            "paddle_contrast": self.paddle_contrast,
            "supersampling": self.supersampling,
        }
        bad = {k: v for k, v in positive.items() if not v > 0}
        if bad:
            raise ValueError(f"Pathfinder settings must be > 0: {bad}")
        if not self.paddle_margins or any(not m > 0 for m in self.paddle_margins):
            raise ValueError(
                f"paddle_margins must be a non-empty tuple of values > 0, got {self.paddle_margins}"
            )
        if self.contour_length < 1 or self.distractor_length < 1 or self.num_distractors < 0:
            raise ValueError(
                "need contour_length >= 1, distractor_length >= 1 and num_distractors >= 0, got "
                f"{self.contour_length}, {self.distractor_length}, {self.num_distractors}"
            )
        if self.border_padding < 0:
            raise ValueError(f"border_padding must be >= 0, got {self.border_padding}")
        if self.image_size <= 4 * self.seed_distance:
            raise ValueError(
                f"image_size {self.image_size} leaves no room for the first target snake's start, "
                f"which must be 2 * seed_distance = {2 * self.seed_distance} from every border; "
                "lower seed_distance or raise image_size"
            )

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["paddle_margins"] = list(self.paddle_margins)
        return d


# LRA's sets, from the spec (spec/lra.md, "Pathfinder generator"). The 32 x 32 sets differ only
# in contour length: 6 (release folder curv_baseline), 9, 14 (the "hard" set LRA reports).
_PATHFINDER32 = {
    "image_size": 32,
    "paddle_length": 2,
    "paddle_thickness": 0.5,
    "paddle_margins": (1,),
    "seed_distance": 7,
    "marker_radius": 1.5,
    "distractor_length": 4,
    "num_distractors": 5,
    "continuity": 1.0,
    "snake_contrast": 2.0,
    "paddle_contrast": 0.75,
    "border_padding": 1,
}
PRESETS: dict[str, PathfinderSettings] = {
    "pathfinder32": PathfinderSettings(contour_length=14, **_PATHFINDER32),
    "pathfinder32_easy": PathfinderSettings(contour_length=6, **_PATHFINDER32),
    "pathfinder32_medium": PathfinderSettings(contour_length=9, **_PATHFINDER32),
    # The spec gives Path-X one "contrast 0.9" and no border padding: we read the contrast as the
    # paddle contrast (snake contrast 1) and keep the 32 x 32 sets' padding of 1 pixel.
    "pathx128": PathfinderSettings(
        image_size=128,
        paddle_length=5,
        paddle_thickness=1.5,
        paddle_margins=(2, 3),
        seed_distance=20,
        marker_radius=3,
        contour_length=14,
        distractor_length=4,
        num_distractors=8,
        continuity=1.8,
        snake_contrast=1.0,
        paddle_contrast=0.9,
        border_padding=1,
    ),
}

# Bump when a change here changes the images a seed gives, so that shards written by an older
# version are reported as made with other settings.
GENERATOR_VERSION = 1
NUM_DIRECTIONS = 64  # a snake turns in whole steps of 2 pi / 64 (5.6 degrees)
STAMP_BINS = 64  # paddle orientations in [0, pi) with a precomputed occupancy stamp (_Layout)
SEED_BATCH = 16  # candidate starts tried at once
SEED_BATCHES = 4  # batches before a snake's start counts as impossible
DISTRACTOR_TRIES = 5  # attempts per distractor snake before it is left out (the release's 4 + 1)
TARGET_TRIES = 20_000  # attempts at the two target snakes before the settings count as impossible
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_SIZE = 5000


class PathfinderGeometry(NamedTuple):
    """What `sample_geometry` placed, in output pixels, points as complex x + iy (x = column)."""

    tails: np.ndarray  # complex [P], start of each paddle
    heads: np.ndarray  # complex [P], end of each paddle
    snake_ids: np.ndarray  # int [P]: 0 and 1 are the target snakes, 2.. the distractors
    markers: np.ndarray  # complex [2]: origin marker, terminal marker
    label: int  # 1 if both markers sit on the same target snake
    margin: float  # the paddle margin drawn for this image


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|p - closest point of segment ab|, broadcast over complex arrays (a == b allowed)."""
    ab = b - a
    length2 = np.maximum((ab * ab.conjugate()).real, 1e-12)
    t = np.clip(((p - a) * ab.conjugate()).real / length2, 0.0, 1.0)
    return np.abs(p - a - t * ab)


class _Layout:
    """Tables shared by every image with the same settings and margin (built once per process).

    Occupancy lives on a raster of `cells` cells per pixel whose border band (outside the
    padding) starts out marked. A placed paddle marks, through a precomputed stamp for its
    orientation, every cell whose centre lies within `mark_radius` of it; a candidate paddle is
    free when none of its sample points (spaced at most one cell apart, end points included)
    falls on a marked cell. mark_radius is 2m plus the sampling and cell slack, and the stamps
    add the error of snapping a paddle to a cell and an orientation bin, so a free paddle is
    truly >= 2m from every marked one (the raster only ever errs on the side of "occupied")."""

    def __init__(self, settings: PathfinderSettings, margin: float) -> None:
        length, gap = float(settings.paddle_length), 2.0 * margin
        self.margin, self.gap, self.length = margin, gap, length
        # About 16 cells across the gap keeps the slack near 15% of it.
        self.cells = cells = 2 ** max(1, math.ceil(math.log2(16.0 / gap)))
        num_points = math.ceil(length * cells) + 1
        fractions = np.linspace(0.0, 1.0, num_points)
        self.slack = length / (num_points - 1) / 2  # a paddle point is this close to a sample
        self.seed_radii = length * fractions  # sample points, as distances from a paddle's tail
        self.grow_radii = margin + length * fractions  # ... and from the pivot of a new paddle
        # Turns are whole steps of 2 pi / NUM_DIRECTIONS; keep those with non-zero weight.
        step = 2.0 * math.pi / NUM_DIRECTIONS
        k_max = math.ceil(math.pi / (2.0 * settings.continuity * step)) - 1
        k_max = min(k_max, (NUM_DIRECTIONS - 1) // 2)
        self.turn_offsets = np.arange(-k_max, k_max + 1)
        # candidates[k]: the directions a snake heading in direction k may take next
        self.candidates = (np.arange(NUM_DIRECTIONS)[:, None] + self.turn_offsets) % NUM_DIRECTIONS
        self.turn_weights = np.cos(self.turn_offsets * step * settings.continuity) ** 2
        self.direction_angles = np.arange(NUM_DIRECTIONS) * step

        half_diagonal = math.sqrt(0.5) / cells
        self.mark_radius = gap + self.slack + half_diagonal
        # A stamp is drawn for the midpoint snapped to its cell's centre and the orientation
        # snapped to its bin: widen it by both errors.
        snap_error = half_diagonal + length / 2 * math.pi / (2 * STAMP_BINS)
        stamp_radius = self.mark_radius + snap_error
        self.stamp_half = h = math.ceil((length / 2 + stamp_radius) * cells) + 1
        offsets = np.arange(-h, h + 1) / cells
        grid = offsets[None, :] + 1j * offsets[:, None]
        self.stamps = np.empty((STAMP_BINS, 2 * h + 1, 2 * h + 1), bool)
        for b in range(STAMP_BINS):
            half = length / 2 * np.exp(1j * math.pi * b / STAMP_BINS)
            self.stamps[b] = _point_segment_distance(grid, -half, half) <= stamp_radius

        # Candidate points reach at most length + 2m outside the padded square; stamps reach h.
        self.pad = pad = h + math.ceil((length + 2.0 * margin + 1.0) * cells) + 1
        side = settings.image_size * cells + 2 * pad
        lo, hi = settings.border_padding, settings.image_size - settings.border_padding
        cell_lo = (np.arange(side) - pad) / cells  # each cell spans [cell_lo, cell_lo + 1/cells)
        inside = (cell_lo >= lo) & (cell_lo + 1.0 / cells <= hi)
        self.template = ~(inside[:, None] & inside[None, :])
        self.lo, self.hi = lo, hi


_LAYOUTS: dict[tuple[PathfinderSettings, float], _Layout] = {}


def _layout(settings: PathfinderSettings, margin: float) -> _Layout:
    key = (settings, margin)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _Layout(settings, margin)
    return _LAYOUTS[key]


class _Placer:
    """The paddles placed so far in one image and the occupancy raster (see `_Layout`). A snake's
    last paddle stays off the raster until the snake grows again (its next paddle must not be
    tested against it); other snakes test against it exactly."""

    def __init__(self, layout: _Layout, capacity: int) -> None:
        self.layout = layout
        self.occupied = layout.template.copy()
        self.tails = np.empty(capacity, np.complex128)
        self.heads = np.empty(capacity, np.complex128)
        self.snake_ids = np.empty(capacity, np.int64)
        self.n = 0
        self.pending: dict[int, int] = {}  # snake id -> its last paddle, not yet on the raster

    def free(
        self,
        cols: np.ndarray,
        rows: np.ndarray,
        snake_id: int,
        centre: complex | None = None,
        reach: float = 0.0,
    ) -> np.ndarray:
        """Which candidate paddles, given as sample points [candidates, points] in raster
        coordinates (`x * cells + pad`, `y * cells + pad`), are free for snake `snake_id`. If
        all points lie within `reach` pixels of `centre`, saying so skips the exact test against
        other snakes' last paddles that are far away."""
        layout = self.layout
        ok = ~self.occupied[rows.astype(np.intp), cols.astype(np.intp)].any(axis=1)
        for other, i in self.pending.items():
            if other == snake_id:
                continue
            if centre is not None:
                a, b = complex(self.tails[i]), complex(self.heads[i])
                ab = b - a
                t = ((centre - a) * ab.conjugate()).real / (ab * ab.conjugate()).real
                if abs(centre - a - min(max(t, 0.0), 1.0) * ab) > reach + layout.gap + layout.slack:
                    continue  # every point is farther than gap + slack from that paddle
            points = (cols - layout.pad + 1j * (rows - layout.pad)) / layout.cells
            dist = _point_segment_distance(points, self.tails[i], self.heads[i])
            ok &= dist.min(axis=1) >= layout.gap + layout.slack
        return ok

    def _mark(self, i: int) -> None:
        layout = self.layout
        tail, head = self.tails[i], self.heads[i]
        mid = (tail + head) / 2
        angle = math.atan2((head - tail).imag, (head - tail).real) % math.pi
        stamp = layout.stamps[round(angle * STAMP_BINS / math.pi) % STAMP_BINS]
        h = layout.stamp_half
        col = int(mid.real * layout.cells) + layout.pad
        row = int(mid.imag * layout.cells) + layout.pad
        self.occupied[row - h : row + h + 1, col - h : col + h + 1] |= stamp

    def add(self, tail: complex, head: complex, snake_id: int) -> None:
        """Place a paddle as the snake's new last paddle; its previous one goes on the raster."""
        if snake_id in self.pending:
            self._mark(self.pending[snake_id])
        i = self.n
        self.tails[i], self.heads[i], self.snake_ids[i] = tail, head, snake_id
        self.n += 1
        self.pending[snake_id] = i

    def finish(self, snake_id: int) -> None:
        """The snake is complete: its last paddle goes on the raster too."""
        self._mark(self.pending.pop(snake_id))

    def save(self) -> tuple[int, dict[int, int], np.ndarray]:
        return self.n, dict(self.pending), self.occupied.copy()

    def restore(self, state: tuple[int, dict[int, int], np.ndarray]) -> None:
        self.n, self.pending, self.occupied = state

    def start_snake(
        self, snake_id: int, xs: np.ndarray, ys: np.ndarray, angles: np.ndarray
    ) -> _Snake | None:
        """A new snake whose first paddle is the first free one among candidate tails (xs, ys)
        and directions, or None if none is free."""
        layout = self.layout
        radii = layout.seed_radii
        ok = self.free(
            (xs[:, None] + radii * np.cos(angles)[:, None]) * layout.cells + layout.pad,
            (ys[:, None] + radii * np.sin(angles)[:, None]) * layout.cells + layout.pad,
            snake_id,
        )
        hits = np.flatnonzero(ok)
        if hits.size == 0:
            return None
        j = hits[0]
        return _Snake(self, snake_id, complex(xs[j], ys[j]), float(angles[j]))


class _Snake:
    """A growing snake. Its directions are its first direction plus whole turn steps, so the
    sample-point offsets of every direction are tabulated once per snake."""

    def __init__(self, placer: _Placer, snake_id: int, tail: complex, angle: float) -> None:
        layout = placer.layout
        self.placer, self.snake_id = placer, snake_id
        self.direction = 0  # index into the tables below; 0 is the first direction
        self.start = tail
        self.end = tail + layout.length * complex(math.cos(angle), math.sin(angle))
        angles = angle + layout.direction_angles
        self.ux, self.uy = np.cos(angles), np.sin(angles)
        # offsets of the sample points in raster cells, per direction
        self.dx = self.ux[:, None] * (layout.grow_radii * layout.cells)
        self.dy = self.uy[:, None] * (layout.grow_radii * layout.cells)
        placer.add(tail, self.end, snake_id)

    def grow(self, rng: np.random.Generator) -> bool:
        """Add one paddle; False when every direction is blocked (the snake is stuck)."""
        placer, layout = self.placer, self.placer.layout
        k = self.direction
        pivot = self.end + layout.margin * complex(self.ux[k], self.uy[k])
        candidates = layout.candidates[k]
        ok = placer.free(
            (pivot.real * layout.cells + layout.pad) + self.dx[candidates],
            (pivot.imag * layout.cells + layout.pad) + self.dy[candidates],
            self.snake_id,
            pivot,
            layout.margin + layout.length,
        )
        cdf = np.cumsum(layout.turn_weights * ok)
        if cdf[-1] <= 0.0:
            return False
        j = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)
        self.direction = k = int(candidates[j])
        u = complex(self.ux[k], self.uy[k])
        tail = pivot + layout.margin * u
        self.end = tail + layout.length * u
        placer.add(tail, self.end, self.snake_id)
        return True


def _uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """n uniform draws from [lo, hi)."""
    return lo + (hi - lo) * rng.random(n)


def _target_snakes(
    rng: np.random.Generator, layout: _Layout, settings: PathfinderSettings, capacity: int
) -> tuple[_Placer, list[_Snake]] | None:
    """One attempt at the two target snakes; None if a start or a paddle could not be placed."""
    placer = _Placer(layout, capacity)
    size, sd = settings.image_size, settings.seed_distance
    xs, ys = (
        _uniform(rng, 2 * sd, size - 2 * sd, SEED_BATCH),
        _uniform(rng, 2 * sd, size - 2 * sd, SEED_BATCH),
    )
    first = placer.start_snake(0, xs, ys, _uniform(rng, -math.pi, math.pi, SEED_BATCH))
    if first is None:
        return None
    bearings = _uniform(rng, -math.pi, math.pi, SEED_BATCH)
    xs = first.start.real + sd * np.cos(bearings)
    ys = first.start.imag + sd * np.sin(bearings)
    second = placer.start_snake(1, xs, ys, _uniform(rng, -math.pi, math.pi, SEED_BATCH))
    if second is None:
        return None
    snakes = [first, second]
    for _ in range(settings.contour_length - 1):
        for snake in snakes:
            if not snake.grow(rng):
                return None
    placer.finish(0)
    placer.finish(1)
    return placer, snakes


def _distractor(rng: np.random.Generator, placer: _Placer, snake_id: int, length: int) -> None:
    """Try to add one distractor snake; on failure remove its paddles and try again, a few times."""
    lo, hi = placer.layout.lo, placer.layout.hi
    for _ in range(DISTRACTOR_TRIES):
        state = placer.save()
        snake = None
        for _ in range(SEED_BATCHES):
            xs, ys = _uniform(rng, lo, hi, SEED_BATCH), _uniform(rng, lo, hi, SEED_BATCH)
            angles = _uniform(rng, -math.pi, math.pi, SEED_BATCH)
            snake = placer.start_snake(snake_id, xs, ys, angles)
            if snake is not None:
                break
        if snake is None:
            return  # the image is full
        if all(snake.grow(rng) for _ in range(length - 1)):
            placer.finish(snake_id)
            return
        placer.restore(state)


def sample_geometry(settings: PathfinderSettings, rng: np.random.Generator) -> PathfinderGeometry:
    """Place the snakes and markers of one image (see the module docstring)."""
    label = int(rng.integers(2))
    origin = int(rng.integers(2))
    margin = float(settings.paddle_margins[rng.integers(len(settings.paddle_margins))])
    capacity = 2 * settings.contour_length + settings.num_distractors * settings.distractor_length
    layout = _layout(settings, margin)
    for _ in range(TARGET_TRIES):
        placed = _target_snakes(rng, layout, settings, capacity)
        if placed is not None:
            break
    else:
        raise RuntimeError(
            f"could not place two target snakes of {settings.contour_length} paddles in "
            f"{TARGET_TRIES} tries with {settings}; the snakes are too long or the margins too "
            "wide for the image: lower contour_length, paddle_length or paddle_margins"
        )
    placer, snakes = placed
    for k in range(settings.num_distractors):
        _distractor(rng, placer, 2 + k, settings.distractor_length)
    terminal = origin if label == 1 else 1 - origin
    n = placer.n
    return PathfinderGeometry(
        tails=placer.tails[:n].copy(),
        heads=placer.heads[:n].copy(),
        snake_ids=placer.snake_ids[:n].copy(),
        markers=np.array([snakes[origin].start, snakes[terminal].end]),
        label=label,
        margin=margin,
    )


def render(geometry: PathfinderGeometry, settings: PathfinderSettings) -> np.ndarray:
    """Draw paddles and markers as antialiased strokes on a `supersampling` times finer canvas
    (value clip(radius + 1/2 - distance, 0, 1) in canvas pixels, times the intensity), average
    down, and scale so the brightest pixel is 255. Returns uint8 [H, W]."""
    s = settings.supersampling
    size = settings.image_size
    contrast = settings.snake_contrast * settings.paddle_contrast
    n = len(geometry.tails)
    # Every stroke is a segment with a radius (a marker is a segment of length 0).
    a = np.concatenate([geometry.tails, geometry.markers]) * s
    b = np.concatenate([geometry.heads, geometry.markers]) * s
    radius = np.array([settings.paddle_thickness / 2] * n + [settings.marker_radius] * 2) * s
    intensity = np.array([contrast] * n + [1.0, 1.0])
    # Each stroke is evaluated on its own patch of side `box` canvas pixels, which covers it.
    reach = max(settings.paddle_length * s / 2 + radius[0], radius[-1]) + 1.0
    box = int(math.ceil(2 * reach)) + 2
    centre = (a + b) / 2
    x0 = np.floor(centre.real - box / 2).astype(np.int64)
    y0 = np.floor(centre.imag - box / 2).astype(np.int64)
    offsets = np.arange(box)
    px = x0[:, None, None] + offsets[None, None, :] + 0.5
    py = y0[:, None, None] + offsets[None, :, None] + 0.5
    dist = _point_segment_distance(px + 1j * py, a[:, None, None], b[:, None, None])
    value = np.clip(radius[:, None, None] + 0.5 - dist, 0.0, 1.0) * intensity[:, None, None]
    # Scatter the patches into a canvas padded by `box` on every side, so no patch falls off.
    side = size * s + 2 * box
    rows = y0[:, None, None] + box + offsets[None, :, None]
    cols = x0[:, None, None] + box + offsets[None, None, :]
    canvas = np.zeros(side * side)
    np.maximum.at(canvas, (rows * side + cols).ravel(), value.ravel())
    canvas = canvas.reshape(side, side)[box : box + size * s, box : box + size * s]
    image = canvas.reshape(size, s, size, s).mean(axis=(1, 3))
    return np.rint(image * (255.0 / image.max())).astype(np.uint8)


def generate_image(
    settings: PathfinderSettings, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """One Pathfinder image (uint8 [H, W], brightest pixel 255) and its label (1 = connected)."""
    geometry = sample_geometry(settings, rng)
    return render(geometry, settings), geometry.label


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` of the data set with `seed`."""
    return np.random.default_rng([seed, index])


def generate_images(
    settings: PathfinderSettings, seed: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images start..stop-1 of the data set with `seed`: (uint8 [n, H, W], uint8 [n])."""
    n = stop - start
    images = np.empty((n, *settings.image_shape), np.uint8)
    labels = np.empty(n, np.uint8)
    for k in range(n):
        images[k], labels[k] = generate_image(settings, image_rng(seed, start + k))
    return images, labels


def _generate_chunk(
    task: tuple[PathfinderSettings, int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    return generate_images(*task)


def _available_cores() -> int:
    """The cores this process may run on (fewer than os.cpu_count() under a CPU limit)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through `atomic_open`: the file appears only when complete."""
    with atomic_open(path, binary=True) as f:
        np.save(f, array)


def _shard_paths(out_dir: Path, k: int) -> tuple[Path, Path]:
    return out_dir / f"images-{k:05d}.npy", out_dir / f"labels-{k:05d}.npy"


def _shard_bounds(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + shard_size, num_images)) for i in range(0, num_images, shard_size)]


def _shard_complete(out_dir: Path, k: int, n: int, shape: tuple[int, int]) -> bool:
    """Both files of shard k exist with the right shapes. Labels are written last, so their
    presence marks a shard whose images were written in full."""
    images_path, labels_path = _shard_paths(out_dir, k)
    if not (images_path.is_file() and labels_path.is_file()):
        return False
    try:
        images = np.load(images_path, mmap_mode="r")
        labels = np.load(labels_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return (
        images.shape == (n, *shape)
        and images.dtype == np.uint8
        and labels.shape == (n,)
        and labels.dtype == np.uint8
    )


def _manifest(
    num_images: int, settings: PathfinderSettings, seed: int, shard_size: int
) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "settings": settings.to_dict(),
        "seed": seed,
        "num_images": num_images,
        "shard_size": shard_size,
    }


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{out_dir} holds no generated Pathfinder images ({MANIFEST_NAME} is missing); "
            "make them with `python -m mra_lra.data.pathfinder_generator --out "
            f"{out_dir} ...`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        problem = f"cannot be read ({err})"
    else:
        if isinstance(manifest, dict):
            return manifest
        problem = "is not a shard manifest"
    raise SourceError(
        f"{path} {problem}, so the settings of the shards in {out_dir} are unknown; delete "
        f"{out_dir} and run again (its images are generated anew)"
    )


def generate_dataset(
    out_dir: str | os.PathLike,
    num_images: int,
    settings: PathfinderSettings,
    seed: int = 0,
    *,
    workers: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Write images 0..num_images-1 of the data set with `seed` into `out_dir` as shards (see the
    module docstring), with `workers` processes (default: all cores). Complete shards already in
    `out_dir` are kept, so rerunning an interrupted call finishes the job; a folder made with
    other settings, seed, size or shard size is an error."""
    if num_images < 1 or shard_size < 1:
        raise ValueError(
            f"need num_images >= 1 and shard_size >= 1, got {num_images}, {shard_size}"
        )
    if workers is None:
        workers = _available_cores()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = ensure_writable_dir(out_dir, "Choose another output folder (--out).")
    manifest = _manifest(num_images, settings, seed, shard_size)
    if (out_dir / MANIFEST_NAME).is_file():
        existing = _read_manifest(out_dir)
        if existing != json.loads(json.dumps(manifest)):
            raise ValueError(
                f"the folder {out_dir} holds Pathfinder shards made with other settings "
                f"({existing}, asked for {manifest}); delete {out_dir} or choose another folder"
            )
    elif any(out_dir.glob("images-*.npy")) or any(out_dir.glob("labels-*.npy")):
        raise ValueError(
            f"the folder {out_dir} holds shard files but no {MANIFEST_NAME}, so their settings are "
            f"unknown; delete {out_dir} or choose another folder"
        )
    else:
        atomic_write_json(out_dir / MANIFEST_NAME, manifest)

    # Temporary files left by a killed writer (one process per folder at a time, so none is live).
    for stale in out_dir.glob(".*-*.npy.*.tmp"):
        stale.unlink(missing_ok=True)
    bounds = _shard_bounds(num_images, shard_size)
    todo = [
        k
        for k, (a, b) in enumerate(bounds)
        if not _shard_complete(out_dir, k, b - a, settings.image_shape)
    ]
    done = num_images - sum(bounds[k][1] - bounds[k][0] for k in todo)
    # Chunks of about 1 MB of pixels: small enough for a smooth progress bar and little memory.
    chunk = max(8, min(256, (1 << 20) // (settings.image_size**2)))
    tasks, owners = [], []
    for k in todo:
        a, b = bounds[k]
        for start in range(a, b, chunk):
            tasks.append((settings, seed, start, min(start + chunk, b)))
            owners.append(k)
    remaining = {k: sum(1 for o in owners if o == k) for k in todo}
    buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with tqdm(
        total=num_images, initial=done, desc="Pathfinder images", unit="img", disable=not progress
    ) as bar:
        with _ChunkResults(tasks, workers) as results:
            for (_, _, start, stop), k, (images, labels) in zip(
                tasks, owners, results, strict=True
            ):
                a, b = bounds[k]
                if k not in buffers:
                    buffers[k] = (
                        np.empty((b - a, *settings.image_shape), np.uint8),
                        np.empty(b - a, np.uint8),
                    )
                buffers[k][0][start - a : stop - a] = images
                buffers[k][1][start - a : stop - a] = labels
                remaining[k] -= 1
                if remaining[k] == 0:
                    images_path, labels_path = _shard_paths(out_dir, k)
                    shard_images, shard_labels = buffers.pop(k)
                    _atomic_save_npy(images_path, shard_images)
                    _atomic_save_npy(labels_path, shard_labels)  # last: marks the shard complete
                bar.update(stop - start)
    return out_dir


_IGNORE_SIGINT = (signal.SIGINT, signal.SIG_IGN)  # arguments of signal.signal


class _ChunkResults:
    """Context manager yielding chunk results in task order, from a Pool of `workers` processes
    (or in this process for one worker); the pool is terminated on exit, also on Ctrl-C."""

    def __init__(self, tasks: list, workers: int) -> None:
        self.tasks, self.workers, self.pool = tasks, min(workers, max(len(tasks), 1)), None

    def __enter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.workers == 1:
            return map(_generate_chunk, self.tasks)
        # fork where there is one (fast start); spawn elsewhere works too, the worker is importable
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        # Workers ignore Ctrl-C: the parent gets it, leaves the shards written so far, and
        # terminates the pool.
        self.pool = context.Pool(self.workers, initializer=signal.signal, initargs=_IGNORE_SIGINT)
        return self.pool.imap(_generate_chunk, self.tasks)

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def iter_shards(out_dir: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each shard in order, images memory-mapped. Raises FileNotFoundError if
    the folder is incomplete (rerun the generation: it resumes)."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    size = manifest["settings"]["image_size"]
    bounds = _shard_bounds(manifest["num_images"], manifest["shard_size"])
    missing = [
        k for k, (a, b) in enumerate(bounds) if not _shard_complete(out_dir, k, b - a, (size, size))
    ]
    if missing:
        raise FileNotFoundError(
            f"{out_dir} is incomplete: {len(missing)} of {len(bounds)} shards are missing (first: "
            f"{_shard_paths(out_dir, missing[0])[0].name}); rerun the same generation command "
            "(it resumes)"
        )
    for k in range(len(bounds)):
        images_path, labels_path = _shard_paths(out_dir, k)
        yield np.load(images_path, mmap_mode="r"), np.load(labels_path)


def load_dataset(
    out_dir: str | os.PathLike, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 [N, H, W]) and labels (uint8 [N]) of a finished folder. Shards are read
    memory-mapped and copied once into `out` (allocated if None; pass e.g. an
    `np.lib.format.open_memmap` to keep the images out of RAM)."""
    manifest = _read_manifest(Path(out_dir))
    size = manifest["settings"]["image_size"]
    shape = (manifest["num_images"], size, size)
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {out.shape}")
    labels = np.empty(shape[0], np.uint8)
    i = 0
    for images, shard_labels in iter_shards(out_dir):
        out[i : i + len(images)] = images
        labels[i : i + len(images)] = shard_labels
        i += len(images)
    return out, labels


def save_sample_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    path: str | os.PathLike,
    columns: int = 8,
    title: str = "",
) -> None:
    """A PNG grid of images, each upscaled to at least 128 pixels and captioned with its label."""
    from PIL import Image, ImageDraw

    size = images[0].shape[0]
    zoom = max(1, -(-128 // size))
    cell, caption, pad, header = size * zoom, 14, 4, 18 if title else 0
    rows = -(-len(images) // columns)
    width = columns * (cell + pad) + pad
    height = header + rows * (cell + caption + pad) + pad
    grid = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 3), title, fill=0)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x = pad + (i % columns) * (cell + pad)
        y = header + pad + (i // columns) * (cell + caption + pad)
        word = "connected" if int(label) == 1 else "not connected"
        draw.text((x, y), f"label {int(label)} ({word})", fill=0)
        tile = Image.fromarray(np.asarray(image, np.uint8)).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (x, y + caption))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mra_lra.data.pathfinder_generator",
        description="Generate Pathfinder / Path-X images as uint8 .npy shards (resumable).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="pathfinder32")
    parser.add_argument("--num", type=int, default=200_000, help="number of images")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    parser.add_argument("--grid", help="also write a PNG grid of the first images here")
    parser.add_argument("--grid-count", type=int, default=32, help="images in the grid")
    parser.add_argument("--grid-columns", type=int, default=8)
    args = parser.parse_args(argv)
    settings = PRESETS[args.preset]
    try:
        out = generate_dataset(
            args.out,
            args.num,
            settings,
            args.seed,
            workers=args.workers,
            shard_size=args.shard_size,
        )
    except (ValueError, SourceError) as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        parser.exit(
            130,
            f"\ninterrupted: the complete shards in {args.out} are kept; run the same "
            "command again to finish\n",
        )
    print(f"wrote {args.num} {args.preset} images to {out}")
    if args.grid:
        first = next(iter_shards(out))
        count = min(args.grid_count, len(first[0]))
        title = f"{args.preset}, seed {args.seed}, images 0-{count - 1}"
        save_sample_grid(first[0][:count], first[1][:count], args.grid, args.grid_columns, title)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
