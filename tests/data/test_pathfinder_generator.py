"""The Pathfinder / Path-X generator against the spec's numbers and hand-computed geometry.

References are independent of the generator: the preset values typed in below, brute-force
distances between drawn paddles (dense points along both), bounds worked out by hand from the
integer grid, and a flood fill for counting blobs. The statistics against the original
generator's are in test_pathfinder_statistics.py.
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
    paddle_segments,
    render,
    sample_geometry,
)
from mra_lra.data.sources import SourceError

# spec/lra.md, "Pathfinder generator", and the settings LRA's TFDS builder lists for the original
# generator: the 32 x 32 hard set and Path-X (snake contrast 0.9, the paddle contrast left at the
# generator's default 1).
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
    "antialias_scale": 2,
    # not the original's: our calibration to its images' statistics (docs/pathfinder_generator.md)
    "distractor_fraction": 0.1,
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
    "snake_contrast": 0.9,
    "paddle_contrast": 1.0,
    "border_padding": 1,
    "antialias_scale": 2,
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


def _segment_points(a: complex, b: complex, n: int = 41) -> np.ndarray:
    return a + (b - a) * np.linspace(0.0, 1.0, n)


def _brute_distance(a: complex, b: complex, c: complex, d: complex) -> float:
    """Distance between segments ab and cd from 41 points along each (overestimates by at most
    half a point spacing, 3 / 80 px for the longest paddles)."""
    p, q = _segment_points(a, b), _segment_points(c, d)
    return float(np.abs(p[:, None] - q[None, :]).min())


def _snakes(geometry) -> dict[int, list[tuple[int, int]]]:
    """Anchor pixels (row, col) of each snake's paddles, in placement order."""
    snakes: dict[int, list[tuple[int, int]]] = {}
    for (row, col), sid in zip(geometry.anchors, geometry.snake_ids, strict=True):
        snakes.setdefault(int(sid), []).append((int(row), int(col)))
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
    # the original places paddles on the pixel grid: lengths are whole pixels
    with pytest.raises(ValueError, match="paddle_length"):
        PathfinderSettings(**{**SPEC_32, "paddle_length": 2.5})
    with pytest.raises(ValueError, match="antialias_scale"):
        PathfinderSettings(**{**SPEC_32, "paddle_thickness": 0.25})  # 0.5 fine pixels
    with pytest.raises(ValueError, match="distractor_fraction"):
        PathfinderSettings(**{**SPEC_32, "distractor_fraction": 1.5})


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
    """Anchors are pixels of the image; each target snake has contour_length paddles and each
    distractor distractor_length. A drawn paddle is L long up to the grid: its fine end is
    ceil'd (under one fine pixel off per axis, under sqrt(2) in all) and the stencil shrinks
    by (2h + 1) / (2h aa + 1) instead of 1 / aa (h = L + ceil(t) + m). Along a snake, the far
    ends of consecutive paddles are L + 2m apart give or take the grid: at most L + 2m +
    2 sqrt(2) (two rounded points and a ceil'd pivot), at least sqrt(m^2 + (L + m -
    sqrt(2))^2) - sqrt(2) (turns of at most 90 degrees at continuity >= 1). The first target
    snake starts at least 2 * seed_distance - 1 from every border (the original checks the
    pixels one down and right of a start), the second seed_distance from it, rounded to a
    pixel."""
    for samples, settings in ((hard32[:40], PRESETS["pathfinder32"]), (pathx, PRESETS["pathx128"])):
        size, L, aa = settings.image_size, settings.paddle_length, settings.antialias_scale
        for geometry, _ in samples:
            m = geometry.margin
            assert m in settings.paddle_margins
            assert geometry.anchors.min() >= 0 and geometry.anchors.max() < size
            h = L + math.ceil(settings.paddle_thickness) + m
            shrink = (2 * h + 1) / (2 * h * aa + 1)
            starts, ends = paddle_segments(geometry, settings)
            lengths = np.abs(ends - starts)
            assert lengths.min() >= (L * aa - math.sqrt(2)) * shrink - 1e-9
            assert lengths.max() <= (L * aa + math.sqrt(2)) * shrink + 1e-9
            snakes = _snakes(geometry)
            assert len(snakes[0]) == len(snakes[1]) == settings.contour_length
            assert len(snakes) - 2 <= settings.num_distractors
            lo = math.sqrt(m**2 + (L + m - math.sqrt(2)) ** 2) - math.sqrt(2)
            hi = L + 2 * m + 2 * math.sqrt(2)
            for sid, anchors in snakes.items():
                if sid >= 2:
                    assert len(anchors) == settings.distractor_length
                for a, b in zip(anchors[1:], anchors[2:], strict=False):
                    assert lo - 1e-9 <= math.dist(a, b) <= hi + 1e-9, (sid, a, b)
            start0, start1 = snakes[0][0], snakes[1][0]
            sd = settings.seed_distance
            assert min(start0) >= 2 * sd - 1 and max(start0) < size - 2 * sd
            assert abs(math.dist(start0, start1) - sd) <= math.sqrt(0.5) + 1e-9


def test_snakes_keep_apart(hard32, pathx):
    """Paddles of different snakes are at least 2m - 1.5 px apart (brute-force distance between
    the drawn lines): a paddle's mask covers its line widened by m, and the rule "mask plus mask
    below 1.8" refuses two lines whose widened bands overlap by more than the Lanczos edges, so
    the two target snakes never touch and a label-0 image has no path between its markers."""
    for samples, settings in (
        (hard32[:20], PRESETS["pathfinder32"]),
        (pathx[:2], PRESETS["pathx128"]),
    ):
        for geometry, _ in samples:
            starts, ends = paddle_segments(geometry, settings)
            ids = geometry.snake_ids
            for i in range(len(ids)):
                for j in range(i + 1, len(ids)):
                    if ids[i] != ids[j]:
                        distance = _brute_distance(starts[i], ends[i], starts[j], ends[j])
                        assert distance >= 2 * geometry.margin - 1.5, (i, j, distance)


def test_two_markers_at_the_ends_of_the_target_snakes(hard32):
    """Exactly two markers: at the start pixel of a target snake, and at the far end of the last
    paddle of the same snake (label 1) or of the other one (label 0). Each is drawn: its own
    pixel lies inside the disc of 3 fine pixels (its value is about 1), and paddles reach at
    most intensity 2 (stencil <= 1 times the snake contrast), so it is at least 255 / 2."""
    for geometry, image in hard32:
        assert geometry.markers.shape == (2, 2)
        snakes = _snakes(geometry)
        markers = [tuple(int(v) for v in marker) for marker in geometry.markers]
        origin = [sid for sid in (0, 1) if snakes[sid][0] == markers[0]]
        terminal = [sid for sid in (0, 1) if snakes[sid][-1] == markers[1]]
        assert len(origin) == 1 and len(terminal) == 1
        assert geometry.label == int(origin[0] == terminal[0])
        for row, col in markers:
            assert image[row, col] >= 120


def test_pathx_has_exactly_two_marker_blobs(pathx):
    """Path-X paddles have intensity 0.9 (stencils <= 1) and markers 1, so only marker pixels
    reach 255 * 0.9 rounded up, 231: those form exactly two blobs where the markers are apart
    (more than 2 radii + 2)."""
    checked = 0
    for geometry, image in pathx:
        apart = math.dist(*geometry.markers.tolist()) > 2 * 3 + 2
        if apart:
            assert _blobs(image >= 231) == 2
            checked += 1
    assert checked >= 1


def test_no_ink_away_from_the_strokes(hard32):
    """Every lit pixel lies within the Lanczos filter's reach of a drawn paddle or marker: the
    filter spans 3 lobes of (2h aa + 1) / (2h + 1) fine pixels, under 3 output pixels, so every
    lit pixel's centre is within 3 + 1 px (the line's width and the fine-pixel rounding) of a
    paddle's line, or within marker_radius + 3 + 1 of a marker's pixel."""
    s = PRESETS["pathfinder32"]
    ys, xs = np.mgrid[0 : s.image_size, 0 : s.image_size] + 0.5
    centres = (xs + 1j * ys).ravel()
    for geometry, image in hard32[:20]:
        lit = centres[image.ravel() > 0]
        near = np.zeros(lit.size, bool)
        for row, col in geometry.markers:
            near |= np.abs(lit - (col + 0.5 + 1j * (row + 0.5))) <= s.marker_radius + 4
        starts, ends = paddle_segments(geometry, s)
        for a, b in zip(starts, ends, strict=True):
            points = _segment_points(a, b)
            near |= np.abs(lit[:, None] - points[None, :]).min(axis=1) <= 4
        assert near.all()
        # and the background is black: a faint halo, not a fog
        assert (image > 0).mean() < 0.6


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


def test_release_layout_resumes_folder_by_folder(tmp_path):
    """A release folder k counts once its metadata file (written last) is there: a rerun after
    a kill rewrites only the folders without one, and a shard-layout folder is not mistaken
    for it."""
    out = generate_dataset(
        tmp_path / "pf", 10, SMALL, 0, workers=1, shard_size=4, progress=False, layout="release"
    )
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["0.npy", "1.npy", "2.npy"]
    kept = out / "imgs" / "0" / "sample_0.png"
    before = kept.stat().st_mtime_ns
    (out / "metadata" / "1.npy").unlink()  # folder 1 was cut short
    (out / "imgs" / "1" / "sample_3.png").unlink()
    with pytest.raises(FileNotFoundError, match="rerun"):
        load_dataset(out)
    generate_dataset(out, 10, SMALL, 0, workers=1, shard_size=4, progress=False, layout="release")
    assert kept.stat().st_mtime_ns == before
    images, labels = load_dataset(out)
    want_images, want_labels = generate_images(SMALL, 0, 0, 10)
    assert np.array_equal(images, want_images) and np.array_equal(labels, want_labels)
    with pytest.raises(ValueError, match=f"delete {out}"):
        generate_dataset(out, 10, SMALL, 0, workers=1, shard_size=4, progress=False)
