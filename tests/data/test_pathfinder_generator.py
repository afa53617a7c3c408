"""The Pathfinder / Path-X generator against the spec's numbers and hand-computed geometry.

References are independent of the generator: the spec's preset values typed in below, a
brute-force distance between paddles (dense points along both), stroke areas worked out by hand
(a stroke of width t and length L inks L * t square pixels), and a flood fill for counting blobs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mra_lra.data import pathfinder_generator as pg
from mra_lra.data.pathfinder_generator import (
    MANIFEST_NAME,
    PRESETS,
    PathfinderSettings,
    generate_dataset,
    generate_image,
    generate_images,
    image_rng,
    iter_shards,
    load_dataset,
    main,
    render,
    sample_geometry,
)
from mra_lra.data.sources import SourceError

# spec/lra.md, "Pathfinder generator": LRA's 32 x 32 hard set and Path-X.
SPEC_32 = {
    "image_size": 32,
    "paddle_length": 2,
    "paddle_thickness": 0.5,
    "paddle_margins": (1,),
    "seed_distance": 7,
    "marker_radius": 1.5,
    "contour_length": 14,
    "distractor_length": 4,
    "num_distractors": 5,
    "continuity": 1.0,
    "snake_contrast": 2,
    "paddle_contrast": 0.75,
    "border_padding": 1,
    "supersampling": 2,
}
SPEC_PATHX = {
    "image_size": 128,
    "paddle_length": 5,
    "paddle_thickness": 1.5,
    "paddle_margins": (2, 3),
    "seed_distance": 20,
    "marker_radius": 3,
    "contour_length": 14,
    "distractor_length": 4,
    "num_distractors": 8,
    "continuity": 1.8,
    "paddle_contrast": 0.9,
    "supersampling": 2,
}

NUM_32 = 160  # hard 32 x 32 images checked one by one (about 2 s)
NUM_PATHX = 4


def _samples(settings: PathfinderSettings, n: int, seed: int = 0):
    out = []
    for i in range(n):
        geometry = sample_geometry(settings, image_rng(seed, i))
        out.append((geometry, render(geometry, settings)))
    return out


@pytest.fixture(scope="module")
def hard32():
    return _samples(PRESETS["pathfinder32"], NUM_32)


@pytest.fixture(scope="module")
def pathx():
    return _samples(PRESETS["pathx128"], NUM_PATHX)


def _segment_points(a: complex, b: complex, n: int = 101) -> np.ndarray:
    return a + (b - a) * np.linspace(0.0, 1.0, n)


def _brute_distance(a: complex, b: complex, c: complex, d: complex) -> float:
    """Distance between segments ab and cd from 101 points along each (error < 1% of a length)."""
    p, q = _segment_points(a, b), _segment_points(c, d)
    return float(np.abs(p[:, None] - q[None, :]).min())


def _snakes(geometry) -> dict[int, list[tuple[complex, complex]]]:
    snakes: dict[int, list[tuple[complex, complex]]] = {}
    for tail, head, sid in zip(geometry.tails, geometry.heads, geometry.snake_ids, strict=True):
        snakes.setdefault(int(sid), []).append((complex(tail), complex(head)))
    return snakes


def _blobs(mask: np.ndarray) -> int:
    """Number of 8-connected components of a boolean image (flood fill)."""
    seen = np.zeros_like(mask)
    count = 0
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        count += 1
        stack = [(r0, c0)]
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
    return count


# --- settings ----------------------------------------------------------------------------------


def test_presets_match_the_spec():
    hard = PRESETS["pathfinder32"]
    for field, value in SPEC_32.items():
        assert getattr(hard, field) == value, field
    # The easy and medium sets differ from the hard one only in contour length (6 and 9).
    for name, length in (("pathfinder32_easy", 6), ("pathfinder32_medium", 9)):
        assert PRESETS[name] == PathfinderSettings(**{**SPEC_32, "contour_length": length})
    pathx = PRESETS["pathx128"]
    for field, value in SPEC_PATHX.items():
        assert getattr(pathx, field) == value, field


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="seed_distance"):
        PathfinderSettings(**{**SPEC_32, "image_size": 28})  # 28 <= 4 * 7: no room to start
    with pytest.raises(ValueError, match="paddle_thickness"):
        PathfinderSettings(**{**SPEC_32, "paddle_thickness": 0})
    with pytest.raises(ValueError, match="paddle_margins"):
        PathfinderSettings(**{**SPEC_32, "paddle_margins": ()})


# --- single images -----------------------------------------------------------------------------


def test_dtype_shape_and_brightest_pixel(hard32, pathx):
    for samples, size in ((hard32, 32), (pathx, 128)):
        for _, image in samples:
            assert image.dtype == np.uint8 and image.shape == (size, size)
            assert image.max() == 255


def test_same_seed_same_image_other_seed_other_image():
    settings = PRESETS["pathfinder32"]
    a, label_a = generate_image(settings, image_rng(5, 17))
    b, label_b = generate_image(settings, image_rng(5, 17))
    assert np.array_equal(a, b) and label_a == label_b
    c, _ = generate_image(settings, image_rng(6, 17))
    d, _ = generate_image(settings, image_rng(5, 18))
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_labels_are_balanced(hard32):
    labels = np.array([g.label for g, _ in hard32])
    assert set(labels.tolist()) <= {0, 1}
    # Binomial(160, 1/2): mean 80, sd sqrt(160) / 2 = 6.3; 4 sd either way fails 1 run in 16,000.
    assert abs(int(labels.sum()) - NUM_32 / 2) <= 4 * math.sqrt(NUM_32) / 2


def test_snakes_are_dashed_curves_of_the_spec_geometry(hard32, pathx):
    """Paddles have the spec's length and stay inside the padding; each target snake has
    contour_length paddles and each distractor distractor_length; within a snake the gap from one
    paddle's head to the next one's tail is 2m cos(turn / 2), between 2m cos(90 deg / 2) and 2m
    (a turn is at most 90 degrees at continuity >= 1); the first target snake starts at least
    2 * seed_distance from every border and the second exactly seed_distance from it."""
    for samples, settings in ((hard32[:40], PRESETS["pathfinder32"]), (pathx, PRESETS["pathx128"])):
        size, pad, m = settings.image_size, settings.border_padding, None
        for geometry, _ in samples:
            m = geometry.margin
            assert m in settings.paddle_margins
            assert np.allclose(np.abs(geometry.heads - geometry.tails), settings.paddle_length)
            for points in (geometry.tails, geometry.heads):
                assert points.real.min() >= pad - 1e-9 and points.real.max() <= size - pad + 1e-9
                assert points.imag.min() >= pad - 1e-9 and points.imag.max() <= size - pad + 1e-9
            snakes = _snakes(geometry)
            assert len(snakes[0]) == len(snakes[1]) == settings.contour_length
            assert len(snakes) - 2 <= settings.num_distractors
            for sid, paddles in snakes.items():
                if sid >= 2:
                    assert len(paddles) == settings.distractor_length
                for (_, head), (tail, _) in zip(paddles, paddles[1:], strict=False):
                    assert 2 * m * math.cos(math.pi / 4) - 1e-9 <= abs(tail - head) <= 2 * m + 1e-9
            start0, start1 = snakes[0][0][0], snakes[1][0][0]
            sd = settings.seed_distance
            assert min(start0.real, start0.imag) >= 2 * sd
            assert max(start0.real, start0.imag) <= size - 2 * sd
            assert abs(start1 - start0) == pytest.approx(sd)


def test_paddles_keep_two_margins_apart(hard32, pathx):
    """Paddles of different snakes, and paddles of one snake that are not neighbours, are at
    least 2m apart (brute-force distance): the two target snakes never touch, so a label-0 image
    has no path between its markers."""
    for samples in (hard32[:12], pathx[:2]):
        for geometry, _ in samples:
            tails, heads, ids = geometry.tails, geometry.heads, geometry.snake_ids
            # position of each paddle along its snake (paddles are listed in placement order)
            order = [int((ids[:i] == ids[i]).sum()) for i in range(len(ids))]
            for i in range(len(tails)):
                for j in range(i + 1, len(tails)):
                    if ids[i] == ids[j] and abs(order[i] - order[j]) == 1:
                        continue  # neighbours on one snake: the dash gap, tested above
                    distance = _brute_distance(tails[i], heads[i], tails[j], heads[j])
                    # brute force overestimates by at most half a point spacing (L / 200)
                    assert distance >= 2 * geometry.margin - 1e-9, (i, j, distance)


def test_two_markers_at_the_ends_of_the_target_snakes(hard32):
    """Exactly two markers: one at the start of a target snake, one at the end of the same snake
    (label 1) or of the other one (label 0). Each is drawn: the pixel holding its centre lies
    fully inside the disc (its corners are at most sqrt(2) < 1.5 from the centre), so it has
    the marker's intensity 1, and the brightest pixel has at most the paddle intensity
    2 * 0.75 = 1.5: at least 255 / 1.5 = 170."""
    for geometry, image in hard32:
        assert geometry.markers.shape == (2,)
        snakes = _snakes(geometry)
        starts = {sid: snakes[sid][0][0] for sid in (0, 1)}
        ends = {sid: snakes[sid][-1][1] for sid in (0, 1)}
        origin = [sid for sid, p in starts.items() if abs(p - geometry.markers[0]) < 1e-9]
        terminal = [sid for sid, p in ends.items() if abs(p - geometry.markers[1]) < 1e-9]
        assert len(origin) == 1 and len(terminal) == 1
        assert geometry.label == int(origin[0] == terminal[0])
        for marker in geometry.markers:
            assert image[int(marker.imag), int(marker.real)] >= 170


def test_pathx_has_exactly_two_marker_blobs(pathx):
    """Path-X paddles have intensity 0.9 and markers 1, so only marker pixels reach 255 * 0.9 <
    231: those form exactly two blobs where the markers are apart (more than 2 radii + 2)."""
    checked = 0
    for geometry, image in pathx:
        apart = abs(geometry.markers[0] - geometry.markers[1]) > 2 * 3 + 2
        if apart:
            assert _blobs(image >= 231) == 2
            checked += 1
    assert checked >= 1


def test_ink_matches_the_stroke_areas(hard32):
    """Total ink, sum(image) / 255, against the strokes' areas: a paddle inks about L * t square
    pixels at intensity c = 2 * 0.75 (plus round ends of area pi t^2 / 4), a marker pi r^2 at
    intensity 1, and the image is divided by its brightest pixel, between 1 (a marker) and c.
    Markers may hide paddle ends, and antialiasing moves a few percent of ink: 10% slack."""
    s = PRESETS["pathfinder32"]
    c = s.snake_contrast * s.paddle_contrast
    t, L, r = s.paddle_thickness, s.paddle_length, s.marker_radius
    for geometry, image in hard32:
        paddles = len(geometry.tails)
        paddle_ink = paddles * c * (L * t + math.pi * t * t / 4)
        marker_ink = 2 * math.pi * r * r
        ink = image.sum() / 255
        assert 0.9 * paddle_ink / max(c, 1.0) <= ink <= 1.1 * (paddle_ink + marker_ink)
    # Fraction of pixels at a quarter of full brightness or more, averaged: ~48 paddles each
    # lighting 2-4 pixels and two markers of ~9 pixels give (96..192 + 18) / 1024 = 0.11..0.21.
    fraction = np.mean([(image >= 64).mean() for _, image in hard32])
    assert 0.11 <= fraction <= 0.21


def test_no_ink_away_from_the_strokes(hard32):
    """Every lit pixel lies within half a thickness plus one pixel diagonal (antialiasing on the
    2x canvas) of a paddle, or within the marker radius plus a diagonal of a marker."""
    s = PRESETS["pathfinder32"]
    ys, xs = np.mgrid[0 : s.image_size, 0 : s.image_size] + 0.5
    centres = (xs + 1j * ys).ravel()
    for geometry, image in hard32[:20]:
        lit = centres[image.ravel() > 0]
        near = np.zeros(lit.size, bool)
        for marker in geometry.markers:
            near |= np.abs(lit - marker) <= s.marker_radius + math.sqrt(2)
        for tail, head in zip(geometry.tails, geometry.heads, strict=True):
            points = _segment_points(tail, head, 41)
            near |= np.abs(lit[:, None] - points[None, :]).min(axis=1) <= (
                s.paddle_thickness / 2 + math.sqrt(2)
            )
        assert near.all()


# --- data sets on disk -------------------------------------------------------------------------

SMALL = PRESETS["pathfinder32_easy"]  # the fastest preset, for the folder mechanics


def test_dataset_is_the_same_for_any_workers_and_shards(tmp_path, hard32):
    one = generate_dataset(tmp_path / "one", 30, SMALL, 3, workers=1, shard_size=7, progress=False)
    two = generate_dataset(tmp_path / "two", 30, SMALL, 3, workers=2, shard_size=11, progress=False)
    images_one, labels_one = load_dataset(one)
    images_two, labels_two = load_dataset(two)
    assert images_one.shape == (30, 32, 32) and labels_one.dtype == np.uint8
    assert np.array_equal(images_one, images_two) and np.array_equal(labels_one, labels_two)
    # image i is image i of the seed, however it was made
    direct, direct_labels = generate_images(SMALL, 3, 10, 13)
    assert np.array_equal(images_one[10:13], direct)
    assert np.array_equal(labels_one[10:13], direct_labels)
    # shards: ceil(30 / 7) = 5 in the first folder, the last one of 2 images
    shards = list(iter_shards(one))
    assert [len(labels) for _, labels in shards] == [7, 7, 7, 7, 2]
    other_seed, _ = generate_images(SMALL, 4, 0, 30)
    assert not np.array_equal(other_seed, images_one)


def test_interrupted_run_resumes_to_the_same_arrays(tmp_path, monkeypatch):
    reference = generate_dataset(tmp_path / "ref", 24, SMALL, 1, workers=1, shard_size=5)
    calls = {"n": 0}
    real_chunk = pg._generate_chunk

    def dies_on_the_fourth_chunk(task):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_chunk(task)

    # Chunks are 256 images for 32 x 32, so each 5-image shard is one chunk.
    monkeypatch.setattr(pg, "_generate_chunk", dies_on_the_fourth_chunk)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(out, 24, SMALL, 1, workers=1, shard_size=5, progress=False)
    names = sorted(p.name for p in out.iterdir())
    shards = [f"{kind}-{k:05d}.npy" for kind in ("images", "labels") for k in range(3)]
    assert names == sorted([MANIFEST_NAME, *shards])
    with pytest.raises(FileNotFoundError, match="rerun"):
        load_dataset(out)
    monkeypatch.setattr(pg, "_generate_chunk", real_chunk)
    # A temporary file left by a killed writer is never taken for a shard.
    (out / ".images-00003.npy.abc.tmp").write_bytes(b"half")
    calls["n"] = 0
    generate_dataset(out, 24, SMALL, 1, workers=1, shard_size=5, progress=False)
    assert not list(out.glob("*.tmp"))  # and it is cleaned up
    got, want = load_dataset(out), load_dataset(reference)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_folder_made_with_other_settings_is_an_error(tmp_path):
    out = generate_dataset(tmp_path / "pf", 6, SMALL, 0, workers=1, shard_size=4, progress=False)
    for kwargs in ({"seed": 1}, {"settings": PRESETS["pathfinder32_medium"]}, {"num_images": 8}):
        args = {"num_images": 6, "settings": SMALL, "seed": 0, **kwargs}
        with pytest.raises(ValueError, match=f"delete {out}"):
            generate_dataset(out, workers=1, shard_size=4, progress=False, **args)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["seed"] == 0 and manifest["settings"]["contour_length"] == 6
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    np.save(stranger / "images-00000.npy", np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="no manifest.json"):
        generate_dataset(stranger, 6, SMALL, 0, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_dataset(tmp_path / "nothing")


def test_load_into_a_memory_mapped_file(tmp_path):
    out = generate_dataset(tmp_path / "pf", 9, SMALL, 2, workers=1, shard_size=4, progress=False)
    target = np.lib.format.open_memmap(tmp_path / "all.npy", "w+", np.uint8, (9, 32, 32))
    images, labels = load_dataset(out, out=target)
    assert images is target
    assert np.array_equal(np.load(tmp_path / "all.npy"), generate_images(SMALL, 2, 0, 9)[0])
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(out, out=np.empty((9, 32, 32), np.float32))


def test_cli_writes_shards_and_a_grid(tmp_path, capsys):
    from PIL import Image

    grid = tmp_path / "grid.png"
    argv = ["--preset", "pathfinder32_easy", "--num", "8", "--out", str(tmp_path / "pf")]
    main([*argv, "--workers", "1", "--grid", str(grid), "--grid-columns", "4"])
    assert "wrote 8 pathfinder32_easy images" in capsys.readouterr().out
    assert load_dataset(tmp_path / "pf")[0].shape == (8, 32, 32)
    with Image.open(grid) as png:
        # 4 columns of 128-pixel cells (32 x 4) with 4-pixel gaps, 2 rows
        assert png.size[0] == 4 * (128 + 4) + 4 and png.size[1] > 2 * 128


@pytest.mark.parametrize("content", ['{"seed": 0, "num', "[]"])
def test_damaged_manifest_is_named_and_kept(tmp_path, content: str) -> None:
    out = generate_dataset(tmp_path / "pf", 4, SMALL, 0, workers=1, progress=False)
    (out / MANIFEST_NAME).write_text(content)
    message = f"{out / MANIFEST_NAME} .*settings of the shards in {out} are unknown; delete {out}"
    with pytest.raises(SourceError, match=message):
        generate_dataset(out, 4, SMALL, 0, workers=1, progress=False)
    with pytest.raises(SourceError, match=message):
        load_dataset(out)
    with pytest.raises(SystemExit):  # the command line prints it, without a traceback
        main(["--out", str(out), "--num", "4", "--workers", "1"])
    assert (out / MANIFEST_NAME).read_text() == content
