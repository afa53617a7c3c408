"""Argument helpers the benchmark tools share: a bad option becomes argparse's one-line usage
error (exit 2) before anything runs. Standard library and torch only, for bare GPU images."""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def comma_list(kind: Callable[[str], T] = str) -> Callable[[str], list[T]]:
    """An argparse `type` for comma lists: "1,2," -> [1, 2] with kind=int."""
    return lambda text: [kind(item) for item in text.split(",") if item]


def check_device(p: argparse.ArgumentParser, text: str) -> torch.device:
    """`--device` as a torch.device that this torch build can use."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        p.error(f"--device: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
        p.error(
            f"--device {text}: torch {torch.__version__} ({build}) sees no CUDA device; "
            "run on a GPU machine or pass --device cpu"
        )
    return device


def add_timing(p: argparse.ArgumentParser) -> None:
    """--device, --repeats, --warmup, --max-seconds and --out of the timing benchmarks."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per row, for the repeats")
    p.add_argument("--out", type=Path, default=Path("bench_out"))


def check_at_least(p: argparse.ArgumentParser, args: argparse.Namespace, low: int, *dests: str):
    """Each named option (an int or a list of ints) is at least `low`."""
    bad = []
    for dest in dests:
        value = getattr(args, dest)
        values = value if isinstance(value, list) else [value]
        if value is not None and (not values or min(values) < low):
            bad.append(f"--{dest.replace('_', '-')} {','.join(map(str, values))}")
    if bad:
        p.error(f"{', '.join(bad)}: must be at least {low}")


def check_names(
    p: argparse.ArgumentParser, option: str, given: Sequence[str], known: Iterable[str]
) -> None:
    """Every entry of a comma list names something known (and the list is not empty)."""
    known = sorted(known)
    unknown = [name for name in given if name not in known]
    if unknown or not given:
        what = f"unknown {', '.join(unknown)}" if unknown else "needs at least one name"
        p.error(f"{option}: {what}; choose from {', '.join(known)}")


def check_csv_files(
    p: argparse.ArgumentParser, option: str, paths: Sequence[Path], columns: Iterable[str]
) -> None:
    """Every path is an existing CSV file whose header holds `columns`."""
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        p.error(f"{option}: no such file {', '.join(missing)}")
    for path in paths:
        with path.open(newline="", errors="replace") as f:
            header = next(csv.reader(f), [])
        lacking = [c for c in columns if c not in header]
        if lacking:
            p.error(
                f"{option}: {path} lacks the column(s) {', '.join(lacking)}; "
                f"pass a CSV written by {p.prog}"
            )
