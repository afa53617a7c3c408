"""LRA Pathfinder (32 x 32) and Path-X (128 x 128): the release's PNGs, or our generator's images.

Release layout (`lra_release.gz` is a gzip tar), read from `source=`, `<data_dir>/lra_release/` or
`<data_dir>/lra_release.gz` (streamed, never extracted):

    lra_release/lra_release/pathfinder<R>/<difficulty>/
        imgs/<k>/sample_<i>.png      8-bit grayscale R x R images
        metadata/<k>.npy             plain text: `imgs/<k> sample_<i>.png <i> <label> ...`

Images follow the metadata files in numeric order, split 80/10/10 by a permutation seeded with
`data.split_seed`; empty or unreadable images (the release has one:
`pathfinder32/curv_baseline/imgs/0/sample_172.png`) and lines whose image is missing are skipped
with a warning. Without the release, `num_train + num_val + num_test` images are generated
(mra_lra/data/pathfinder_generator.py) into resumable shards under
`<data_dir>/generated/<preset>/<settings key>/` and split in that order; numbers on them are not
comparable with the release's. Tokens are pixel values 0-255 in raster order (see pixels.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from mra_lra.data import pathfinder_generator
from mra_lra.data.cache import cache_key, file_fingerprint
from mra_lra.data.pixels import PixelDataModule, pixel_arrays
from mra_lra.data.sources import SourceTree, locate_source

log = logging.getLogger(__name__)

# Bump when the reading, decoding or splitting changes, so that cached arrays are rebuilt.
FORMAT_VERSION = 1
DIFFICULTIES = ("curv_baseline", "curv_contour_length_9", "curv_contour_length_14")
RELEASE_CANDIDATES = ("lra_release", "lra_release.gz", "lra_release.tar.gz")
URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
RELEASE_SIZE = 200_000  # images per resolution and difficulty
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1}  # test: the rest
# Generator preset for each (resolution, difficulty) we can make without the release.
GENERATOR_PRESETS = {
    (32, "curv_baseline"): "pathfinder32_easy",
    (32, "curv_contour_length_9"): "pathfinder32_medium",
    (32, "curv_contour_length_14"): "pathfinder32",
    (128, "curv_contour_length_14"): "pathx128",
}
_EXAMPLES = 3  # skipped files named in a warning


def task_name(resolution: int) -> str:
    """The task config of a resolution (`pathx` for 128, else `pathfinder`)."""
    return "pathx" if resolution == 128 else "pathfinder"


def how_to_get(data_dir: Path, resolution: int, difficulty: str) -> str:
    return (
        f"Get lra_release.gz (about 8 GB) from {URL} and put it at {data_dir / 'lra_release.gz'} "
        f"(or extract it there, giving {data_dir}/lra_release/.../pathfinder{resolution}/"
        f"{difficulty}/), or point source= at the archive or folder where you keep it: "
        f"`python -m mra_lra.data.prepare task={task_name(resolution)} source=/path/to/"
        "lra_release.gz`."
    )


def parse_metadata(text: str, name: str) -> list[tuple[str, int]]:
    """(image path below the difficulty folder, label) of each line of a metadata file; `name`
    is the file shown in errors. A malformed line raises ValueError naming the file and line."""
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 4 or not fields[1].endswith(".png"):
            raise ValueError(
                f"{name}:{line_no}: expected `imgs/<k> sample_<i>.png <i> <label> ...`, "
                f"found {line.strip()!r}"
            )
        if fields[3] not in ("0", "1"):
            raise ValueError(f"{name}:{line_no}: the label (4th field) {fields[3]!r} is not 0 or 1")
        records.append((f"{fields[0].strip('/')}/{fields[1]}", int(fields[3])))
    return records


def metadata_number(rel: str) -> int:
    """k of `metadata/<k>.npy`; the release names them by number, and they are read in that
    order (0, 1, 2, ..., 10, not as strings)."""
    stem = rel[len("metadata/") : -len(".npy")]
    if not stem.isdigit():
        raise ValueError(f"{rel}: metadata files are named <number>.npy; rename or remove it")
    return int(stem)


def decode_png(blob: bytes, side: int) -> np.ndarray | str:
    """uint8 [side * side] of an 8-bit grayscale PNG, or why it cannot be used."""
    if not blob:
        return "empty file"
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            if img.size != (side, side):
                return f"{img.size[0]} x {img.size[1]} pixels, expected {side} x {side}"
            if img.mode != "L":
                img = img.convert("L")
            return np.asarray(img, dtype=np.uint8).reshape(-1)
    except (OSError, SyntaxError, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"


def split_indices(num: int, seed: int) -> dict[str, np.ndarray]:
    """The 80/10/10 split of `num` images (in metadata order) by a permutation seeded `seed`."""
    order = np.random.default_rng(seed).permutation(num)
    num_train = round(SPLIT_FRACTIONS["train"] * num)
    num_val = round(SPLIT_FRACTIONS["val"] * num)
    return {
        "train": order[:num_train],
        "val": order[num_train : num_train + num_val],
        "test": order[num_train + num_val :],
    }


def _warn_skipped(what: str, reason: str, skipped: list[str]) -> None:
    if skipped:
        examples = ", ".join(skipped[:_EXAMPLES]) + (", ..." if len(skipped) > _EXAMPLES else "")
        log.warning("%s: skipped %d images %s: %s", what, len(skipped), reason, examples)


class PathfinderDataModule(PixelDataModule):
    """Pathfinder (`resolution` 32) or Path-X (128) of one `difficulty`, from the release or
    generated (see the module docstring). `split_seed` splits the release 80/10/10; `num_*`,
    `gen_seed` and `gen_workers` (None: all cores) apply to generated sets only."""

    num_classes = 2

    def __init__(
        self,
        *args: Any,
        resolution: int,
        difficulty: str,
        split_seed: int,
        num_train: int,
        num_val: int,
        num_test: int,
        gen_seed: int,
        gen_workers: int | None,
        **kwargs: Any,
    ) -> None:
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"data.difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        if resolution < 1:
            raise ValueError(f"data.resolution must be a positive image side, got {resolution}")
        super().__init__(*args, side=resolution, **kwargs)
        if min(num_train, num_val, num_test) < 0 or num_train + num_val + num_test < 1:
            raise ValueError(
                "data.num_train, data.num_val, data.num_test must be >= 0 and not all 0, got "
                f"{num_train}, {num_val}, {num_test}"
            )
        self.task = task_name(resolution)
        self.resolution = resolution
        self.difficulty = difficulty
        self.split_seed = split_seed
        self.num_train = num_train
        self.num_val = num_val
        self.num_test = num_test
        self.gen_seed = gen_seed
        self.gen_workers = gen_workers
        self.anchor = f"pathfinder{resolution}/{difficulty}"
        self._tree: SourceTree | None = None
        self._located = False
        # Images left out by the last build: {"unreadable": n, "missing": n}.
        self.skipped: dict[str, int] = {}

    # -- where the images come from -------------------------------------------------------
    @property
    def tree(self) -> SourceTree | None:
        """The release files, or None when the set is generated."""
        if not self._located:
            hint = how_to_get(self.data_dir, self.resolution, self.difficulty)
            if self.source is not None:
                self._tree = locate_source(self.data_dir, self.source, self.anchor, (), hint)
            else:
                try:
                    self._tree = locate_source(
                        self.data_dir, None, self.anchor, RELEASE_CANDIDATES, hint
                    )
                except FileNotFoundError as err:
                    if self.preset is None:
                        raise FileNotFoundError(
                            f"{err} Our generator has no preset for {self.anchor} (only for "
                            f"{', '.join(f'pathfinder{r}/{d}' for r, d in GENERATOR_PRESETS)})."
                        ) from err
                    self._tree = None
            self._located = True
        return self._tree

    @property
    def generated(self) -> dict[str, Any] | None:
        """The generator settings when the images are generated (no release), else None."""
        return None if self.tree is not None else self._generator_request()

    @property
    def preset(self) -> str | None:
        return GENERATOR_PRESETS.get((self.resolution, self.difficulty))

    def _generator_request(self) -> dict[str, Any]:
        settings = pathfinder_generator.PRESETS[self.preset]
        return {
            "preset": self.preset,
            "generator_version": pathfinder_generator.GENERATOR_VERSION,
            "settings": settings.to_dict(),
            "num_images": self.num_train + self.num_val + self.num_test,
            "seed": self.gen_seed,
        }

    @property
    def generated_dir(self) -> Path:
        """Where generated shards of these settings live (resumable)."""
        return self.data_dir / "generated" / self.preset / cache_key(self._generator_request())

    def ensure_sources(self) -> None:
        if self.tree is not None:
            return
        self._check_generated_sizes(
            {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        )
        request = self._generator_request()
        log.warning(
            "%s: no release files for %s under %s (%s); generating %d images with our "
            "reimplementation of the generator (preset %s, seed %d) into %s. Accuracies on it "
            "are not comparable with numbers on the LRA release.",
            self.task,
            self.anchor,
            self.data_dir,
            ", ".join(RELEASE_CANDIDATES),
            request["num_images"],
            self.preset,
            self.gen_seed,
            self.generated_dir,
        )
        pathfinder_generator.generate_dataset(
            self.generated_dir,
            request["num_images"],
            pathfinder_generator.PRESETS[self.preset],
            self.gen_seed,
            workers=self.gen_workers,
            progress=sys.stderr.isatty(),
        )

    def _fingerprint(self) -> dict[str, Any]:
        tree = self.tree
        if tree is None:
            return {"generated": self._generator_request()}
        if tree.is_archive:
            return {"archive": file_fingerprint(tree.path)}
        # Stat-ing 200k PNGs at every start would be slow: the metadata files, and the image
        # folders' entries (whose modification times change when files are added or removed).
        entries = []
        for sub in ("metadata", "imgs"):
            folder = tree.root / sub
            if folder.is_dir():
                with os.scandir(folder) as scan:
                    for entry in scan:
                        stat = entry.stat()
                        size = stat.st_size if entry.is_file() else 0
                        entries.append([f"{sub}/{entry.name}", size, stat.st_mtime_ns])
        entries.sort()
        blob = json.dumps(entries).encode()
        return {"folder": {"entries": len(entries), "sha256": hashlib.sha256(blob).hexdigest()}}

    # -- arrays -----------------------------------------------------------------------------
    def cache_options(self) -> dict[str, Any]:
        options = {
            "task": self.task,
            "format_version": FORMAT_VERSION,
            "resolution": self.resolution,
            "difficulty": self.difficulty,
            "max_length": self.max_length,
            "source": self._fingerprint(),
        }
        if self.tree is None:
            options["split"] = [self.num_train, self.num_val, self.num_test]
        else:
            options["split_seed"] = self.split_seed
        return options

    def build_arrays(self) -> dict[str, np.ndarray]:
        splits = self._release_splits() if self.tree is not None else self._generated_splits()
        arrays = {}
        for split, (images, labels) in splits.items():
            for name, array in pixel_arrays(images, labels, self.max_length, split).items():
                arrays[f"{split}_{name}"] = array
        return arrays

    def _generated_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        images, labels = pathfinder_generator.load_dataset(self.generated_dir)
        images = images.reshape(len(images), -1)
        bounds = np.cumsum([0, self.num_train, self.num_val, self.num_test])
        return {
            split: (images[bounds[i] : bounds[i + 1]], labels[bounds[i] : bounds[i + 1]])
            for i, split in enumerate(("train", "val", "test"))
        }

    def _read_release(self) -> tuple[list[tuple[str, int]], dict[str, bytes]]:
        """(image path, label) in metadata order, and the PNG bytes by path, in one pass."""
        tree = self.tree
        metadata: dict[int, list[tuple[str, int]]] = {}
        blobs: dict[str, bytes] = {}

        def wanted(rel: str) -> bool:
            return (rel.startswith("metadata/") and rel.endswith(".npy")) or (
                rel.startswith("imgs/") and rel.endswith(".png")
            )

        where = f"{tree.path}: {self.anchor}" if tree.is_archive else str(tree.root)
        with tqdm(desc=f"{self.task}: reading {self.anchor}", unit=" files", disable=None) as bar:
            for rel, blob in tree.iter_files(wanted):
                if rel.startswith("metadata/"):
                    text = blob.decode("utf-8", errors="replace")
                    metadata[metadata_number(rel)] = parse_metadata(text, f"{where}/{rel}")
                else:
                    # PNGs are stored compressed: a third of the decoded size or less.
                    blobs[rel] = blob
                bar.update()
        if not metadata:
            raise FileNotFoundError(
                f"{where} has no metadata/<k>.npy files. "
                f"{how_to_get(self.data_dir, self.resolution, self.difficulty)}"
            )
        records = [record for k in sorted(metadata) for record in metadata[k]]
        return records, blobs

    def _release_splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        records, blobs = self._read_release()
        if len(records) != RELEASE_SIZE:
            log.warning(
                "%s: the metadata lists %d images, the release %d (a subsample?)",
                self.task,
                len(records),
                RELEASE_SIZE,
            )
        side = self.resolution
        unreadable, missing = [], []
        splits = {}
        with tqdm(total=len(records), desc=f"{self.task}: decoding", disable=None) as bar:
            for split, rows in split_indices(len(records), self.split_seed).items():
                images = np.empty((len(rows), side * side), dtype=np.uint8)
                labels = np.empty(len(rows), dtype=np.uint8)
                kept = 0
                for row in rows:
                    path, label = records[row]
                    blob = blobs.get(path)
                    if blob is None:
                        missing.append(path)
                    else:
                        pixels = decode_png(blob, side)
                        if isinstance(pixels, str):
                            unreadable.append(f"{path} ({pixels})")
                        else:
                            images[kept], labels[kept] = pixels, label
                            kept += 1
                    bar.update()
                splits[split] = (images[:kept], labels[:kept])
        _warn_skipped(self.task, "that are empty or unreadable", unreadable)
        _warn_skipped(self.task, "listed in the metadata but missing from the source", missing)
        self.skipped = {"unreadable": len(unreadable), "missing": len(missing)}
        return splits
