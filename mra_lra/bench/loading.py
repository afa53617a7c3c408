"""How fast the training dataloader serves pixel-task batches from the array cache.

    python -m mra_lra.bench.loading --workers 0 2 --batch-size 256 --max-length 1024

Random 32 x 32 images (Pathfinder's shape; contents do not change the speed) go through the same
`LRADataModule` code every task uses; prints sequences per second of `train_dataloader()` per
worker count, after a few warm-up batches. The first run writes the cache (160 MB) to --data-dir.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np

from mra_lra.data.pixels import PixelDataModule, pixel_arrays


class RandomPixels(PixelDataModule):
    """Random `side` x `side` images in the cache layout of the pixel tasks."""

    task = "bench_loading"
    num_classes = 2

    def __init__(self, *args: Any, num_images: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_images = num_images

    def ensure_sources(self) -> None:
        pass

    def cache_options(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "side": self.side, "max_length": self.max_length}

    def build_arrays(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        arrays = {}
        for split, n in (("train", self.num_images), ("val", 1), ("test", 1)):
            images = rng.integers(0, 256, (n, self.side * self.side), dtype=np.uint8)
            labels = rng.integers(0, 2, n, dtype=np.uint8)
            for name, array in pixel_arrays(images, labels, self.max_length, split).items():
                arrays[f"{split}_{name}"] = array
        return arrays


def measure(dm: RandomPixels, num_batches: int, warmup: int) -> float:
    """Sequences per second over `num_batches` batches after `warmup` ones."""
    loader = dm.train_dataloader()
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    count = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        try:
            batch = next(batches)
        except StopIteration:
            loader.sampler.set_epoch(loader.sampler.epoch + 1)
            batches = iter(loader)
            batch = next(batches)
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--num-images", type=int, default=160_000)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--patch-order", type=int, nargs=2, default=None)
    parser.add_argument("--pixel-zero-is-pad", action="store_true")
    parser.add_argument("--data-dir", default=None, help="cache folder (default: temporary)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            dm = RandomPixels(
                args.data_dir or tmp,
                args.batch_size,
                args.max_length,
                workers,
                num_images=args.num_images,
                side=args.side,
                pixel_zero_is_pad=args.pixel_zero_is_pad,
                patch_order=args.patch_order,
            )
            dm.prepare_data()
            dm.setup("fit")
            rate = measure(dm, args.batches, args.warmup)
            print(
                f"num_workers={workers} batch_size={args.batch_size} "
                f"max_length={args.max_length} patch_order={args.patch_order} "
                f"pixel_zero_is_pad={args.pixel_zero_is_pad}: {rate:,.0f} sequences/s"
            )


if __name__ == "__main__":
    main()
