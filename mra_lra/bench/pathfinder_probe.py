"""Is a generated Pathfinder set learnable? A small CNN on it, held-out accuracy against steps.

    python -m mra_lra.bench.pathfinder_probe --preset pathfinder32_easy

The images are generated in this process (no folder needed) and augmented with flips and turns
by 90 degrees, which keep the label. Chance is 0.5; docs/pathfinder_generator.md gives the
results and run times on the easy and hard presets.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from mra_lra.bench.cli import check_at_least
from mra_lra.data.pathfinder_generator import PRESETS, generate_images


def probe_model(width: int = 16) -> nn.Module:
    """Six 3x3 convolutions with batch norm, max-pooled after every second, then a linear layer
    on the global average."""
    layers: list[nn.Module] = []
    channels = [1, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    for i in range(6):
        layers += [
            nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[i + 1]),
            nn.ReLU(inplace=True),
        ]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 2)]
    return nn.Sequential(*layers)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image turned by a random multiple of 90 degrees and maybe mirrored."""
    turns = int(torch.randint(4, (1,), generator=generator))
    images = torch.rot90(images, turns, dims=(2, 3))
    if bool(torch.randint(2, (1,), generator=generator)):
        images = torch.flip(images, dims=(3,))
    return images


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    hits = sum(
        int((model(images[i : i + 500]).argmax(1) == labels[i : i + 500]).sum())
        for i in range(0, len(images), 500)
    )
    model.train()
    return hits / len(images)


def run_probe(
    preset: str,
    num_train: int,
    num_test: int,
    steps: int,
    batch_size: int,
    eval_every: int,
    seed: int,
    lr: float = 3e-3,
) -> list[tuple[int, float, float]]:
    """(step, training loss over the last `eval_every` steps, held-out accuracy) rows."""
    settings = PRESETS[preset]
    start = time.perf_counter()
    images, labels = generate_images(settings, seed, 0, num_train + num_test)
    print(f"generated {len(images)} {preset} images in {time.perf_counter() - start:.0f} s")
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    train_x, train_y, test_x, test_y = x[:num_train], y[:num_train], x[num_train:], y[num_train:]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = probe_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    rows, losses = [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.randint(num_train, (batch_size,), generator=generator)
        logits = model(_augment(train_x[batch], generator))
        loss = nn.functional.cross_entropy(logits, train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            rows.append((step, float(np.mean(losses)), accuracy(model, test_x, test_y)))
            losses = []
            print(
                f"step {step:6d}  train loss {rows[-1][1]:.3f}  held-out acc {rows[-1][2]:.3f}"
                f"  ({time.perf_counter() - start:.0f} s)"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mra_lra.bench.pathfinder_probe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="pathfinder32_easy")
    p.add_argument("--num-train", type=int, default=30_000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    check_at_least(
        p, args, 1, "num_train", "num_test", "steps", "batch_size", "eval_every", "threads"
    )
    torch.set_num_threads(args.threads)
    sizes = args.num_train, args.num_test, args.steps, args.batch_size, args.eval_every
    rows = run_probe(args.preset, *sizes, args.seed)
    best = max(acc for _, _, acc in rows)
    print(
        f"{args.preset}: held-out accuracy {rows[-1][2]:.3f} at step {rows[-1][0]} "
        f"(best {best:.3f}, chance 0.5)"
    )


if __name__ == "__main__":
    main()
