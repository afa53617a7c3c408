"""A seeded Pathfinder / Path-X generator that draws like the original (Linsley et al. 2018).

A rewrite of drewlinsley/pathfinder's algorithm (same pixel grid, paddle stencils, occupancy mask
and sampling rules; none of its code) with LRA's settings as `PRESETS`, so that our images have
the original's statistics. docs/pathfinder_generator.md gives the rules, the statistics and our
few departures. Image i depends only on (seed, i), so the output is the same for any number of
workers and any shard size; `generate_dataset` writes resumable shards or the release's layout.

    python -m mra_lra.data.pathfinder_generator --preset pathfinder32 --num 200000 \\
        --out data/generated/pathfinder32 --grid docs/pathfinder_samples.png
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mra_lra.data.sources import SourceError
from mra_lra.utils import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    ordered_map,
    resolve_workers,
)


@dataclass(frozen=True)
class PathfinderSettings:
    """What an image looks like, in the original generator's terms; lengths in output pixels."""

    image_size: int  # side of the square output image
    paddle_length: int  # L, the length of one dash
    paddle_thickness: float  # stroke width of a dash; times antialias_scale a whole number
    paddle_margins: tuple[int, ...]  # m, one drawn per image: pivots are L + 2m apart, and a
    # paddle's mask reaches m beyond its line
    seed_distance: int  # distance between the starts of the two target snakes
    marker_radius: float  # radius of the two round markers
    contour_length: int  # paddles per target snake
    distractor_length: int  # paddles per distractor snake
    num_distractors: int  # distractor snakes per image
    continuity: float  # turn weight cos(min(|turn| * continuity, pi/2))^2: higher = smoother
    snake_contrast: float  # intensity of distractor paddles (the original's snake_contrast_list)
    paddle_contrast: float  # target paddles have intensity snake_contrast * paddle_contrast
    border_padding: int  # width of the border band that the mask starts with
    antialias_scale: int = 2  # paddles and markers are drawn this many times finer, then shrunk
    distractor_fraction: float = 1.0  # each distractor snake is attempted with this probability
    # (0.1 for the 32 x 32 presets, to match the original's images: docs/pathfinder_generator.md)

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        positive = "image_size paddle_length paddle_thickness seed_distance marker_radius"
        positive += " continuity snake_contrast paddle_contrast antialias_scale"
        bad = {k: values[k] for k in positive.split() if not values[k] > 0}
        if bad:
            raise ValueError(f"Pathfinder settings must be > 0: {bad}")
        whole = "image_size paddle_length seed_distance border_padding antialias_scale".split()
        bad = {k: values[k] for k in whole if not float(values[k]).is_integer()}
        fine_width = self.paddle_thickness * self.antialias_scale
        if not float(fine_width).is_integer():
            bad["paddle_thickness * antialias_scale"] = fine_width
        if bad:
            raise ValueError(f"Pathfinder settings must be whole numbers: {bad}")
        if not self.paddle_margins or any(
            not (m > 0 and float(m).is_integer()) for m in self.paddle_margins
        ):
            raise ValueError(
                "paddle_margins must be a non-empty tuple of whole numbers > 0, got "
                f"{self.paddle_margins}"
            )
        if self.contour_length < 1 or self.distractor_length < 1 or self.num_distractors < 0:
            raise ValueError(
                "need contour_length >= 1, distractor_length >= 1 and num_distractors >= 0, got "
                f"{self.contour_length}, {self.distractor_length}, {self.num_distractors}"
            )
        if not 0.0 <= self.distractor_fraction <= 1.0:
            raise ValueError(
                f"distractor_fraction must be in [0, 1], got {self.distractor_fraction}"
            )
        if self.border_padding < 0:
            raise ValueError(f"border_padding must be >= 0, got {self.border_padding}")
        if self.image_size <= 4 * self.seed_distance:
            raise ValueError(
                f"image_size {self.image_size} leaves no room for the first target snake's start, "
                f"which must be 2 * seed_distance = {2 * self.seed_distance} from every border; "
                "lower seed_distance or raise image_size"
            )

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON values (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["paddle_margins"] = list(self.paddle_margins)
        return d


# LRA's sets: the settings its TFDS builder (long-range-arena, lra_benchmarks/data/pathfinder.py)
# lists for the 32 x 32 and 128 x 128 runs of the original generator. The 32 x 32 sets differ
# only in contour length: 6 (release folder curv_baseline), 9, 14 (the "hard" set LRA reports).
_PATHFINDER32 = {
    "image_size": 32,
    "paddle_length": 2,
    "paddle_thickness": 0.5,
    "paddle_margins": (1,),
    "seed_distance": 7,
    "marker_radius": 1.5,
    "distractor_length": 4,  # contour_length // 3 for the hard set
    "num_distractors": 5,  # 20 // distractor_length
    "continuity": 1.0,
    "snake_contrast": 2.0,
    "paddle_contrast": 0.75,
    "border_padding": 1,
    "antialias_scale": 2,
    "distractor_fraction": 0.1,
}
PRESETS: dict[str, PathfinderSettings] = {
    "pathfinder32": PathfinderSettings(contour_length=14, **_PATHFINDER32),
    "pathfinder32_easy": PathfinderSettings(contour_length=6, **_PATHFINDER32),
    "pathfinder32_medium": PathfinderSettings(contour_length=9, **_PATHFINDER32),
    "pathx128": PathfinderSettings(
        image_size=128,
        paddle_length=5,
        paddle_thickness=1.5,
        paddle_margins=(2, 3),
        seed_distance=20,
        marker_radius=3,
        contour_length=14,
        distractor_length=4,  # 14 / 3 in the original's Python 2
        num_distractors=8,  # 35 / 4
        continuity=1.8,
        snake_contrast=0.9,
        paddle_contrast=1.0,  # the generator's default: LRA set only the snake contrast
        border_padding=1,
        antialias_scale=2,
    ),
}

# Bump when the images a seed gives change: older shards then count as made with other settings.
GENERATOR_VERSION = 2
PADDLE_TRIES = 3  # draws of a snake's next paddle before it counts as stuck (the original's 2 + 1)
SEED_TRIES = 3  # start draws whose paddle leaves the image before a start fails (2 + 1)
DISTRACTOR_TRIES = 5  # attempts per distractor snake before it is left out (4 + 1)
TARGET_TRIES = 20_000  # attempts at the two target snakes before the settings count as impossible
FREE_LEVEL = 0.3  # a pixel is free to start a paddle on when the mask there is at most this
COLLISION_LEVEL = 1.8  # a paddle is refused where its mask plus the image's mask reaches this
FULL_FRACTION = 0.01  # no more distractors once fewer pixels than this fraction are free
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_SIZE = 5000
LAYOUTS = ("shards", "release")


class PathfinderGeometry(NamedTuple):
    """What `sample_geometry` placed. Pixels are (row, col) integer pairs."""

    anchors: np.ndarray  # int [P, 2]: the pixel each paddle is drawn from
    angles: np.ndarray  # float [P]: the direction each paddle is drawn in from its anchor
    snake_ids: np.ndarray  # int [P]: 0 and 1 are the target snakes, 2.. the distractors
    markers: np.ndarray  # int [2, 2]: origin marker, terminal marker
    label: int  # 1 if both markers sit on the same target snake
    margin: int  # the paddle margin drawn for this image


def _flip(angle: float) -> float:
    """The opposite direction, in (-pi, pi] like the original's."""
    return angle + math.pi if angle < 0 else angle - math.pi


def _lanczos_shrink(fine: np.ndarray, side: int) -> np.ndarray:
    """0/255 image shrunk to side x side by PIL's Lanczos (the original's imresize), in [0, 1]."""
    image = Image.fromarray(fine).resize((side, side), Image.LANCZOS)
    return np.asarray(image, np.float64) / 255.0


def _disc(radius: float) -> np.ndarray:
    """int [K, 2]: the offsets (dy, dx) with dy^2 + dx^2 <= radius^2."""
    r = int(math.floor(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = dy**2 + dx**2 <= radius**2
    return np.stack([dy[inside], dx[inside]], axis=1)


class _Paddle(NamedTuple):
    """The stencils of a paddle at one angle, centred on its anchor (arrays of side 2h + 1)."""

    ink: np.ndarray  # float [side, side], in [0, 1]
    mask: np.ndarray  # float [side, side], in [0, 1]
    start_check: np.ndarray  # int [K, 2]: offsets (from anchor + (1, 1)) where mask == 1
    end: tuple[float, float]  # far end of the drawn line from the anchor, in output pixels


class _Stencils:
    """What depends only on the settings and the margin (paddle and marker stencils, next-paddle
    candidates), built once per process; docs/pathfinder_generator.md explains the rules."""

    def __init__(self, settings: PathfinderSettings, margin: int) -> None:
        self.settings, self.margin = settings, margin
        size, length = settings.image_size, settings.paddle_length
        self.half = half = length + math.ceil(settings.paddle_thickness) + margin
        self.side = 2 * half + 1
        self.pad = pad = half + 2  # room around the image for stencils and start checks
        self.width = size + 2 * pad  # side of the padded mask and ink arrays
        self._paddles: dict[float, _Paddle] = {}
        self._weights: dict[float, np.ndarray] = {}
        self._first_starts: dict[int, np.ndarray] = {}

        # Next-paddle candidates: the pixels hit by points one pixel of arc apart on the circle
        # of radius L + m around the pivot (int() of pivot + offset; the pivot is a whole pixel,
        # so that is pivot + floor(offset), rounded first against sin(pi) = 1e-16 and the like).
        radius = length + margin
        arc = np.arange(0.0, 360.0, 360.0 / (2.0 * math.pi * radius)) * math.pi / 180.0
        offsets = np.floor(np.round(radius * np.stack([np.sin(arc), np.cos(arc)], 1), 9))
        candidates = np.unique(offsets.astype(np.int64), axis=0)
        self.candidate_rows, self.candidate_cols = candidates[:, 0], candidates[:, 1]
        self.candidate_angles = np.arctan2(candidates[:, 0], candidates[:, 1])
        self.step = length + 2 * margin  # from one pivot to the next
        self.reach = int(np.abs(candidates).max())  # pivots this far inside keep all candidates
        # Flat offsets into the padded mask of each candidate's disc of radius m.
        disc = _disc(margin)
        near = candidates[:, None, :] + disc[None, :, :]
        self.candidate_discs = near[..., 0] * self.width + near[..., 1]

        self.empty_mask = np.zeros((self.width, self.width))
        inner = self.empty_mask[pad : pad + size, pad : pad + size]
        b = settings.border_padding
        if b > 0:
            inner[:b], inner[-b:], inner[:, :b], inner[:, -b:] = 1.0, 1.0, 1.0, 1.0
        self._marker_disc = _disc(settings.marker_radius * settings.antialias_scale)

    def paddle(self, angle: float) -> _Paddle:
        """The stencils of a paddle drawn from its anchor in direction `angle` (cached)."""
        stencil = self._paddles.get(angle)
        if stencil is None:
            stencil = self._paddles[angle] = self._draw_paddle(angle)
        return stencil

    def _draw_paddle(self, angle: float) -> _Paddle:
        s, m, half = self.settings, self.margin, self.half
        aa = s.antialias_scale
        fine_side = 2 * half * aa + 1
        c = half * aa  # the anchor's fine pixel
        end_row = math.ceil(c + s.paddle_length * aa * math.sin(angle))
        end_col = math.ceil(c + s.paddle_length * aa * math.cos(angle))
        canvas = Image.new("L", (fine_side, fine_side), 0)
        width = round(s.paddle_thickness * aa)
        ImageDraw.Draw(canvas).line([(c, c), (end_col, end_row)], fill=255, width=width)
        line = np.asarray(canvas) > 0
        ink = _lanczos_shrink(np.asarray(canvas), self.side)
        # The mask: the line dilated by a disc of radius m * aa on the fine canvas, shrunk too.
        grown = np.zeros_like(line)
        rows, cols = np.nonzero(line)
        for dy, dx in _disc(m * aa):
            r, c2 = rows + dy, cols + dx
            keep = (r >= 0) & (r < fine_side) & (c2 >= 0) & (c2 < fine_side)
            grown[r[keep], c2[keep]] = True
        mask = _lanczos_shrink(grown.astype(np.uint8) * 255, self.side)
        # Start check: the original dilates the mask with the stencil's full pixels cut to a
        # (2(L + m) + 1)^2 window whose centre is one pixel up and left of the anchor.
        lo = half - (s.paddle_length + m + 1)
        hi = lo + 2 * (s.paddle_length + m) + 1
        full = np.argwhere(mask[lo:hi, lo:hi] >= 1.0) + lo - half
        scale = self.side / fine_side  # output pixels per fine pixel of the shrunk stencil
        end = ((end_row - c) * scale, (end_col - c) * scale)
        return _Paddle(ink, mask, full, end)

    def turn_weights(self, angle: float) -> np.ndarray:
        """cos(min(turn * continuity, pi / 2))^2 of each candidate after a paddle at `angle`."""
        weights = self._weights.get(angle)
        if weights is None:
            turn = np.abs(self.candidate_angles - angle)
            turn = np.minimum(turn, 2.0 * math.pi - turn)
            turn = np.minimum(turn * self.settings.continuity, 0.5 * math.pi)
            weights = self._weights[angle] = np.maximum(np.cos(turn), 0.0) ** 2
        return weights

    def first_starts(self, degrees: int) -> np.ndarray:
        """Free start pixels (flat) of the first target snake's paddle at `degrees`, with only
        the border band, widened to 2 * seed_distance, occupied (cached). Unlike the original,
        pixels outside the image count as occupied."""
        starts = self._first_starts.get(degrees)
        if starts is None:
            s, pad = self.settings, self.pad
            lo, hi = pad + 2 * s.seed_distance, pad + s.image_size - 2 * s.seed_distance
            blocked = np.ones_like(self.empty_mask, bool)
            blocked[lo:hi, lo:hi] = False
            starts = self._first_starts[degrees] = self.free_starts(
                blocked, self.paddle(math.radians(degrees))
            )
        return starts

    def free_starts(self, blocked: np.ndarray, paddle: _Paddle) -> np.ndarray:
        """Pixels (flat, row-major) where `paddle`'s start check meets no blocked pixel of the
        padded `blocked` array (outside the image nothing is blocked)."""
        size, pad = self.settings.image_size, self.pad
        free = np.ones((size, size), bool)
        for dy, dx in paddle.start_check + pad + 1:
            free &= ~blocked[dy : dy + size, dx : dx + size]
        return np.flatnonzero(free)

    def marker(self, row: int, col: int) -> np.ndarray:
        """float [H, W]: a disc of marker_radius * aa fine pixels around fine pixel (aa * row,
        aa * col), shrunk with Lanczos to the image size."""
        s = self.settings
        aa = s.antialias_scale
        fine = np.zeros((s.image_size * aa, s.image_size * aa), np.uint8)
        r = self._marker_disc[:, 0] + aa * row
        c = self._marker_disc[:, 1] + aa * col
        keep = (r >= 0) & (r < fine.shape[0]) & (c >= 0) & (c < fine.shape[1])
        fine[r[keep], c[keep]] = 255
        return _lanczos_shrink(fine, s.image_size)


@functools.cache
def _stencils(settings: PathfinderSettings, margin: int) -> _Stencils:
    return _Stencils(settings, margin)


class _Snake:
    """A growing snake: where its next pivot is computed from, and its far end."""

    def __init__(self, snake_id: int, pivot: tuple[int, int], angle: float, tip: tuple[int, int]):
        self.snake_id, self.pivot, self.angle = snake_id, pivot, angle
        self.start = self.tip = tip


class _Canvas:
    """The paddles of one image and its padded mask. A snake's newest paddle stays `pending` so
    that its successor is not tested against it; the target snakes, grown side by side, see each
    other's through `views` (docs/pathfinder_generator.md)."""

    def __init__(self, stencils: _Stencils, parallel: Sequence[int] = ()) -> None:
        self.st = stencils
        self.mask = stencils.empty_mask.copy()
        self.views = {k: self.mask.copy() for k in parallel}
        self.paddles: list[tuple[int, int, float, int]] = []  # row, col, angle, snake id
        self.pending: dict[int, tuple[int, int, np.ndarray]] = {}  # snake -> row, col, mask

    def _stamp(self, array: np.ndarray, row: int, col: int, stencil: np.ndarray) -> None:
        st = self.st
        r, c = row + st.pad - st.half, col + st.pad - st.half
        region = array[r : r + st.side, c : c + st.side]
        np.maximum(region, stencil, out=region)

    def finish(self, snake_id: int) -> None:
        """The snake's newest paddle joins the mask (only the views while there are views)."""
        row, col, stencil = self.pending.pop(snake_id)
        for array in self.views.values() or (self.mask,):
            self._stamp(array, row, col, stencil)

    def end_parallel(self) -> None:
        """After the parallel snakes are finished, their views all equal the mask."""
        self.mask = next(iter(self.views.values()))
        self.views = {}

    def _add(self, snake_id: int, row: int, col: int, angle: float, paddle: _Paddle) -> None:
        if snake_id in self.pending:
            self.finish(snake_id)
        self.paddles.append((row, col, angle, snake_id))
        self.pending[snake_id] = (row, col, paddle.mask)
        for other, view in self.views.items():
            if other != snake_id:
                self._stamp(view, row, col, paddle.mask)

    def save(self) -> tuple[np.ndarray, int, dict]:
        return self.mask.copy(), len(self.paddles), dict(self.pending)

    def restore(self, state: tuple[np.ndarray, int, dict]) -> None:
        self.mask, n, self.pending = state
        del self.paddles[n:]

    def place_start(self, snake_id: int, row: int, col: int, angle: float) -> _Snake | None:
        """A snake whose first paddle is drawn from (row, col) at `angle`, or None when its far
        end or its pivot falls outside the image."""
        st = self.st
        s = st.settings
        size, length = s.image_size, s.paddle_length
        head = (
            math.ceil(row + length * math.sin(angle)),
            math.ceil(col + length * math.cos(angle)),
        )
        back = _flip(angle)
        pivot = (
            math.ceil(head[0] + (length + st.margin) * math.sin(back)),
            math.ceil(head[1] + (length + st.margin) * math.cos(back)),
        )
        if not all(0 <= v < size for v in (*head, *pivot)):
            return None
        self._add(snake_id, row, col, angle, st.paddle(angle))
        return _Snake(snake_id, pivot, angle, (row, col))

    def start_snake(self, rng: np.random.Generator, snake_id: int) -> _Snake | None:
        """A distractor's first paddle on a free start pixel, or None (image full, no free
        pixel, or three starts whose paddle left the image)."""
        st = self.st
        size, pad = st.settings.image_size, st.pad
        inner = self.mask[pad : pad + size, pad : pad + size]
        for _ in range(SEED_TRIES):
            angle = math.radians(int(rng.integers(-180, 180)))
            if np.count_nonzero(inner <= FREE_LEVEL) < FULL_FRACTION * size * size:
                return None
            blocked = self.mask > FREE_LEVEL
            edge = blocked[pad : pad + size, pad : pad + size]
            edge[0], edge[-1], edge[:, 0], edge[:, -1] = (True,) * 4
            starts = st.free_starts(blocked, st.paddle(angle))
            if starts.size == 0:
                return None
            row, col = divmod(int(starts[rng.integers(starts.size)]), size)
            snake = self.place_start(snake_id, row, col, angle)
            if snake is not None:
                return snake
        return None

    def grow(self, rng: np.random.Generator, snake: _Snake) -> bool:
        """Add one paddle to `snake`; False when it is stuck."""
        st = self.st
        pr = math.ceil(snake.pivot[0] + st.step * math.sin(snake.angle))
        pc = math.ceil(snake.pivot[1] + st.step * math.cos(snake.angle))
        rows, cols, angles = st.candidate_rows + pr, st.candidate_cols + pc, st.candidate_angles
        weights, discs = st.turn_weights(snake.angle), st.candidate_discs
        lo, hi = st.reach, st.settings.image_size - st.reach
        if not (lo <= pr < hi and lo <= pc < hi):  # some candidates may leave the image
            size = st.settings.image_size
            inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
            if not inside.any():
                return False
            rows, cols, angles = rows[inside], cols[inside], angles[inside]
            weights, discs = weights[inside], discs[inside]
        mask = self.views.get(snake.snake_id, self.mask)
        near = mask.ravel()[(pr + st.pad) * st.width + (pc + st.pad) + discs]
        cdf = np.cumsum(weights * (1.0 - near.max(axis=1)))
        total = cdf[-1]
        if total < 1e-4:
            return False
        for _ in range(PADDLE_TRIES):
            j = min(int(np.searchsorted(cdf, rng.random() * total, side="right")), cdf.size - 1)
            row, col = int(rows[j]), int(cols[j])
            angle = _flip(float(angles[j]))
            paddle = st.paddle(angle)
            r, c = row + st.pad - st.half, col + st.pad - st.half
            if (mask[r : r + st.side, c : c + st.side] + paddle.mask).max() < COLLISION_LEVEL:
                self._add(snake.snake_id, row, col, angle, paddle)
                snake.pivot, snake.angle, snake.tip = (pr, pc), float(angles[j]), (row, col)
                return True
        return False


def _target_snakes(rng: np.random.Generator, canvas: _Canvas) -> list[_Snake] | None:
    """One attempt at the two target snakes; None when a start or a paddle could not be placed."""
    st = canvas.st
    s = st.settings
    degrees = int(rng.integers(-180, 180))
    starts = st.first_starts(degrees)
    for _ in range(SEED_TRIES):
        if starts.size == 0:
            return None
        row, col = divmod(int(starts[rng.integers(starts.size)]), s.image_size)
        first = canvas.place_start(0, row, col, math.radians(degrees))
        if first is not None:
            break
        degrees = int(rng.integers(-180, 180))
        starts = st.first_starts(degrees)
    else:
        return None
    for _ in range(SEED_TRIES):
        angle = math.radians(int(rng.integers(-180, 180)))
        bearing = math.radians(int(rng.integers(0, 360)))
        row = int(np.round(first.tip[0] + s.seed_distance * math.sin(bearing)))
        col = int(np.round(first.tip[1] + s.seed_distance * math.cos(bearing)))
        second = canvas.place_start(1, row, col, angle)
        if second is not None:
            break
    else:
        return None
    snakes = [first, second]
    for _ in range(s.contour_length - 1):
        for snake in snakes:
            if not canvas.grow(rng, snake):
                return None
    canvas.finish(0)
    canvas.finish(1)
    canvas.end_parallel()
    return snakes


def _distractor(rng: np.random.Generator, canvas: _Canvas, snake_id: int) -> None:
    """Add one distractor snake, or leave it out after DISTRACTOR_TRIES failed attempts."""
    length = canvas.st.settings.distractor_length
    for _ in range(DISTRACTOR_TRIES):
        state = canvas.save()
        snake = canvas.start_snake(rng, snake_id)
        if snake is not None and all(canvas.grow(rng, snake) for _ in range(length - 1)):
            canvas.finish(snake_id)
            return
        canvas.restore(state)


def sample_geometry(settings: PathfinderSettings, rng: np.random.Generator) -> PathfinderGeometry:
    """Place the snakes and markers of one image (see the module docstring)."""
    label = int(rng.integers(2))
    origin = int(rng.integers(2))
    margin = int(settings.paddle_margins[rng.integers(len(settings.paddle_margins))])
    stencils = _stencils(settings, margin)
    for _ in range(TARGET_TRIES):
        canvas = _Canvas(stencils, parallel=(0, 1))
        snakes = _target_snakes(rng, canvas)
        if snakes is not None:
            break
    else:
        raise RuntimeError(
            f"could not place two target snakes of {settings.contour_length} paddles in "
            f"{TARGET_TRIES} tries with {settings}; the snakes are too long or the margins too "
            "wide for the image: lower contour_length, paddle_length or paddle_margins"
        )
    for k in range(settings.num_distractors):
        if rng.random() < settings.distractor_fraction:
            _distractor(rng, canvas, 2 + k)
    terminal = origin if label == 1 else 1 - origin
    rows, cols, angles, ids = zip(*canvas.paddles, strict=True)
    return PathfinderGeometry(
        anchors=np.stack([rows, cols], axis=1).astype(np.int64),
        angles=np.array(angles),
        snake_ids=np.array(ids, np.int64),
        markers=np.array([snakes[origin].start, snakes[terminal].tip], np.int64),
        label=label,
        margin=margin,
    )


def render(geometry: PathfinderGeometry, settings: PathfinderSettings) -> np.ndarray:
    """Draw the paddles' and markers' stencils (pixel-wise maximum, each times its intensity) and
    scale so the brightest pixel is 255. Returns uint8 [H, W]."""
    st = _stencils(settings, geometry.margin)
    size, pad, half = settings.image_size, st.pad, st.half
    target = settings.snake_contrast * settings.paddle_contrast
    ink = np.zeros((st.width, st.width))
    for (row, col), angle, snake_id in zip(
        geometry.anchors, geometry.angles, geometry.snake_ids, strict=True
    ):
        intensity = target if snake_id < 2 else settings.snake_contrast
        r, c = row + pad - half, col + pad - half
        region = ink[r : r + st.side, c : c + st.side]
        np.maximum(region, st.paddle(float(angle)).ink * intensity, out=region)
    image = ink[pad : pad + size, pad : pad + size]
    for row, col in geometry.markers:
        image = np.maximum(image, st.marker(int(row), int(col)))
    return (np.clip(image * (255.0 / image.max()), 0.0, 255.0) + 0.5).astype(np.uint8)


def paddle_segments(
    geometry: PathfinderGeometry, settings: PathfinderSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Where each paddle's line is drawn, as complex points x + iy in output pixels (pixel (r, c)
    spans [c, c + 1) x [r, r + 1)): from the centre of its anchor pixel to its far end."""
    st = _stencils(settings, geometry.margin)
    starts = geometry.anchors[:, 1] + 0.5 + 1j * (geometry.anchors[:, 0] + 0.5)
    ends = np.array([complex(*reversed(st.paddle(float(a)).end)) for a in geometry.angles])
    return starts, starts + ends


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
    images, labels, _ = _generate_chunk((settings, seed, start, stop))
    return images, labels


def _generate_chunk(
    task: tuple[PathfinderSettings, int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, paddle margins: the release's metadata lists them) of start..stop-1."""
    settings, seed, start, stop = task
    n = stop - start
    images = np.empty((n, settings.image_size, settings.image_size), np.uint8)
    labels = np.empty(n, np.uint8)
    margins = np.empty(n, np.int64)
    for k in range(n):
        geometry = sample_geometry(settings, image_rng(seed, start + k))
        images[k] = render(geometry, settings)
        labels[k], margins[k] = geometry.label, geometry.margin
    return images, labels, margins


def _shard_paths(out_dir: Path, k: int) -> tuple[Path, Path]:
    return out_dir / f"images-{k:05d}.npy", out_dir / f"labels-{k:05d}.npy"


def _shards(
    out_dir: Path, num_images: int, shard_size: int, size: int, layout: str
) -> tuple[list[tuple[int, int]], list[int]]:
    """The (start, stop) of every shard, and the shards not yet complete."""
    bounds = [(i, min(i + shard_size, num_images)) for i in range(0, num_images, shard_size)]
    todo = [
        k
        for k, (a, b) in enumerate(bounds)
        if not _shard_complete(out_dir, k, b - a, (size, size), layout)
    ]
    return bounds, todo


def _release_paths(out_dir: Path, k: int) -> tuple[Path, Path]:
    """The image folder and the metadata file of folder k of the release layout."""
    return out_dir / "imgs" / str(k), out_dir / "metadata" / f"{k}.npy"


def _release_labels(out_dir: Path, k: int) -> np.ndarray | None:
    """The labels of folder k of the release layout, or None if its metadata is missing."""
    try:
        lines = _release_paths(out_dir, k)[1].read_text(encoding="utf-8").splitlines()
        return np.array([int(line.split()[3]) for line in lines], np.uint8)
    except (OSError, IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _write_release_folder(
    out_dir: Path,
    k: int,
    images: np.ndarray,
    labels: np.ndarray,
    margins: np.ndarray,
    settings: PathfinderSettings,
) -> None:
    folder, metadata = _release_paths(out_dir, k)
    folder.mkdir(parents=True, exist_ok=True)
    metadata.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"sample_{i}.png")
    # Last, so that it marks a complete folder; the original's columns: folder, file, index,
    # label, continuity, contour length, distractor length, paddle length and thickness, margin,
    # number of paddle contrasts.
    s = settings
    lines = (
        f"imgs/{k} sample_{i}.png {i} {int(label)} {s.continuity} {s.contour_length} "
        f"{s.distractor_length} {s.paddle_length} {s.paddle_thickness} {int(margin)} 1\n"
        for i, (label, margin) in enumerate(zip(labels, margins, strict=True))
    )
    atomic_write_text(metadata, "".join(lines))


def _shard_complete(
    out_dir: Path, k: int, n: int, shape: tuple[int, int], layout: str = "shards"
) -> bool:
    """Shard k's files (release layout: its metadata) exist and hold n images."""
    if layout == "release":
        labels = _release_labels(out_dir, k)
        return labels is not None and labels.shape == (n,)
    try:  # a missing file is an OSError
        images, labels = (np.load(path, mmap_mode="r") for path in _shard_paths(out_dir, k))
    except (OSError, ValueError):
        return False
    shapes_ok = images.shape == (n, *shape) and labels.shape == (n,)
    return shapes_ok and images.dtype == labels.dtype == np.uint8


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
    layout: str = "shards",
) -> Path:
    """Write images 0..num_images-1 of the data set with `seed` into `out_dir` as shards
    `images-<k>.npy` (uint8 [n, H, W]) and `labels-<k>.npy` (uint8 [n]), or with
    `layout="release"` as `imgs/<k>/sample_<i>.png` and `metadata/<k>.npy`, with `workers`
    processes (default: all cores). Complete shards are kept, so a rerun resumes; a folder made
    with other settings, seed, size, shard size or layout is an error."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if num_images < 1 or shard_size < 1:
        raise ValueError(
            f"need num_images >= 1 and shard_size >= 1, got {num_images}, {shard_size}"
        )
    workers = resolve_workers(workers)
    out_dir = ensure_writable_dir(out_dir, "Choose another output folder (--out).")
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "settings": settings.to_dict(),
        "seed": seed,
        "num_images": num_images,
        "shard_size": shard_size,
        "layout": layout,
    }
    if (out_dir / MANIFEST_NAME).is_file():
        existing = _read_manifest(out_dir)
        if existing != json.loads(json.dumps(manifest)):
            raise ValueError(
                f"the folder {out_dir} holds Pathfinder shards made with other settings "
                f"({existing}, asked for {manifest}); delete {out_dir} or choose another folder"
            )
    elif any(any(out_dir.glob(g)) for g in ("images-*.npy", "labels-*.npy", "metadata/*.npy")):
        raise ValueError(
            f"the folder {out_dir} holds shard files but no {MANIFEST_NAME}, so their settings are "
            f"unknown; delete {out_dir} or choose another folder"
        )
    else:
        atomic_write_json(out_dir / MANIFEST_NAME, manifest)

    # Temporary files left by a killed writer (one process per folder at a time, so none is live).
    for stale in [*out_dir.glob(".*-*.npy.*.tmp"), *out_dir.glob("metadata/.*.npy.*.tmp")]:
        stale.unlink(missing_ok=True)
    bounds, todo = _shards(out_dir, num_images, shard_size, settings.image_size, layout)
    done = num_images - sum(bounds[k][1] - bounds[k][0] for k in todo)
    # Chunks of about 1 MB of pixels: small enough for a smooth progress bar and little memory.
    chunk = max(8, min(256, (1 << 20) // (settings.image_size**2)))
    tasks = [
        (settings, seed, start, min(start + chunk, bounds[k][1]))
        for k in todo
        for start in range(*bounds[k], chunk)
    ]
    pieces = []  # the chunks of the shard being filled (results come in task order)
    with tqdm(
        total=num_images, initial=done, desc="Pathfinder images", unit="img", disable=not progress
    ) as bar:
        with ordered_map(workers, len(tasks)) as parallel_map:
            results = parallel_map(_generate_chunk, tasks)
            for (_, _, start, stop), chunk_arrays in zip(tasks, results, strict=True):
                pieces.append(chunk_arrays)
                k = start // shard_size
                if stop == bounds[k][1]:
                    images, labels, margins = (np.concatenate(a) for a in zip(*pieces, strict=True))
                    pieces = []
                    if layout == "release":
                        _write_release_folder(out_dir, k, images, labels, margins, settings)
                    else:  # labels last: their file marks a complete shard
                        paths = _shard_paths(out_dir, k)
                        for path, array in zip(paths, (images, labels), strict=True):
                            with atomic_open(path, binary=True) as f:
                                np.save(f, array)
                bar.update(stop - start)
    return out_dir


def iter_shards(out_dir: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of each shard in order, images memory-mapped (or read from the release
    layout's PNGs); FileNotFoundError if the folder is incomplete."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    size = manifest["settings"]["image_size"]
    layout = manifest.get("layout", "shards")
    bounds, missing = _shards(out_dir, manifest["num_images"], manifest["shard_size"], size, layout)
    if missing:
        raise FileNotFoundError(
            f"{out_dir} is incomplete: {len(missing)} of {len(bounds)} shards are missing (first: "
            f"{_shard_paths(out_dir, missing[0])[0].name if layout == 'shards' else missing[0]}); "
            "rerun the same generation command (it resumes)"
        )
    for k in range(len(bounds)):
        if layout == "release":
            folder, labels = _release_paths(out_dir, k)[0], _release_labels(out_dir, k)
            images = [
                np.asarray(Image.open(folder / f"sample_{i}.png")) for i in range(len(labels))
            ]
            yield np.stack(images), labels
        else:
            images_path, labels_path = _shard_paths(out_dir, k)
            yield np.load(images_path, mmap_mode="r"), np.load(labels_path)


def load_dataset(
    out_dir: str | os.PathLike, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 [N, H, W]) and labels (uint8 [N]) of a finished folder, the images
    copied into `out` (allocated if None; an `np.lib.format.open_memmap` keeps them out of RAM)."""
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


def _count_pieces(bright: np.ndarray) -> np.ndarray:
    """int [N]: 8-connected components of each boolean image of [N, H, W]: every pixel takes
    the smallest index in its 3 x 3 neighbourhood until nothing changes; a component is counted
    at the pixel that keeps its own index."""
    n, h, w = bright.shape
    big = np.int64(h * w)
    own = np.where(bright, np.arange(h * w).reshape(1, h, w), big)
    labels = own.copy()
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        smallest = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(smallest, padded[:, dy : dy + h, dx : dx + w], out=smallest)
        smallest = np.where(bright, smallest, big)
        if np.array_equal(smallest, labels):
            return ((labels == own) & bright).sum(axis=(1, 2))
        labels = smallest


STATISTICS = {
    "fraction of pixels > 0": "gt0",
    "fraction of pixels >= 64": "ge64",
    "bright pieces (8-connected, >= 64)": "pieces",
    "median of pixels >= 8": "median8",
    "pixels at 255": "at255",
}


def image_statistics(images: np.ndarray) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation over uint8 images [N, H, W] of the five per-image statistics
    that we compare with the original generator's (docs/pathfinder_generator.md)."""
    images = np.asarray(images)
    flat = images.reshape(len(images), -1)
    medians = [np.median(row[row >= 8]) if (row >= 8).any() else 0.0 for row in flat]
    per_image = {
        "gt0": (flat > 0).mean(axis=1),
        "ge64": (flat >= 64).mean(axis=1),
        "pieces": _count_pieces(images >= 64),
        "median8": np.array(medians),
        "at255": (flat == 255).sum(axis=1),
    }
    return {k: (float(np.mean(v)), float(np.std(v))) for k, v in per_image.items()}


def save_sample_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    path: str | os.PathLike,
    columns: int = 8,
    title: str = "",
) -> None:
    """A PNG grid of images, each upscaled to at least 128 pixels and captioned with its label."""
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mra_lra.data.pathfinder_generator",
        description="Generate Pathfinder / Path-X images (resumable), as uint8 .npy shards or in "
        "the LRA release's layout.",
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
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="shards",
        help="shards: our .npy shards; release: the LRA release's imgs/<k>/sample_<i>.png and "
        "metadata/<k>.npy (plain text), --shard-size images per folder",
    )
    parser.add_argument(
        "--stats", action="store_true", help="print the set's per-image statistics (mean, sd)"
    )
    args = parser.parse_args(argv)
    options = {"workers": args.workers, "shard_size": args.shard_size, "layout": args.layout}
    try:
        out = generate_dataset(args.out, args.num, PRESETS[args.preset], args.seed, **options)
    except (ValueError, SourceError) as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        parser.exit(
            130,
            f"\ninterrupted: the complete shards in {args.out} are kept; run the same "
            "command again to finish\n",
        )
    print(f"wrote {args.num} {args.preset} images to {out} ({args.layout} layout)")
    if args.stats:
        images, labels = load_dataset(out)
        print(f"label 1: {labels.mean():.3f} of {len(labels)} images")
        statistics = image_statistics(images)
        for name, key in STATISTICS.items():
            print(f"{name}: {statistics[key][0]:.3f} (sd {statistics[key][1]:.3f})")
    if args.grid:
        first = next(iter_shards(out))
        count = min(args.grid_count, len(first[0]))
        title = f"{args.preset}, seed {args.seed}, images 0-{count - 1}"
        save_sample_grid(first[0][:count], first[1][:count], args.grid, args.grid_columns, title)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
