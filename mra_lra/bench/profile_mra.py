"""Where one MRA-2 forward+backward spends its time: a torch.profiler table and trace.

    python -m mra_lra.bench.profile_mra --n 4096 --batch 1 --heads 8 --d 64 --dtype bfloat16 \
        --out bench_out

At small sizes MRA-2 is launch-bound on the GPU (docs/benchmarks.md). This says by how much: the
wall time of a step, the kernels it launches and their summed device time, the ops with the most
host time, and per pass the torch ops that do work and the Triton launches (`count_launches`,
which also runs on CPU under TRITON_INTERPRET=1). Writes `profile_mra.txt` (the tables) and
`profile_mra.json` (a Chrome trace) to --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from mra_lra.attention import build
from mra_lra.bench.attention import DTYPES, sync
from mra_lra.bench.cli import check_at_least, check_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mra_lra.bench.profile_mra", description=__doc__)
    p.add_argument("--attn", default="mra", choices=["mra", "mra_s"])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--block-per-row", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    p.add_argument("--rows", type=int, default=25, help="rows of each table")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    args = p.parse_args(argv)
    check_device(p, args.device)
    check_at_least(p, args, 1, "n", "batch", "heads", "d", "block_per_row", "steps", "rows")
    return args


VIEW_OPS = frozenset(
    "view _unsafe_view reshape unsqueeze squeeze transpose t permute expand slice select alias "
    "detach as_strided _reshape_alias".split()
)
ALLOC_OPS = frozenset("empty empty_like new_empty empty_strided".split())


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that do work (no views, no bare allocations) while not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in VIEW_OPS and name not in ALLOC_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """Stands in for a Triton kernel: counts its launches; the interpreter's own torch calls
    inside a launch are not the step's ops."""

    def __init__(self, kernel, name: str, counter: _OpCounter, launches: collections.Counter):
        self.kernel, self.name, self.counter, self.launches = kernel, name, counter, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches[self.name] += 1
            self.counter.paused = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.counter.paused = False

        return launch


def count_launches(attention, q, k, v, grad) -> dict[str, dict[str, collections.Counter]]:
    """{"fwd" | "bwd": {"torch": ops by name, "triton": launches by kernel}} for one step after
    one warm-up step (which fills the per-shape caches)."""
    attention(q, k, v, None)
    result = {}
    counter, launches = _OpCounter(), collections.Counter()
    counting = contextlib.nullcontext()
    with contextlib.suppress(ImportError):  # no triton: no kernels to count
        from mra_lra.attention.mra import launch

        kernels = {
            n: _CountedKernel(getattr(launch, n), n, counter, launches) for n in launch.LAUNCHED
        }
        counting = mock.patch.multiple(launch, **kernels)
    with counting:
        with counter:
            out = attention(q, k, v, None)
        result["fwd"] = {"torch": counter.ops.copy(), "triton": launches.copy()}
        counter.ops.clear()
        launches.clear()
        with counter:
            torch.autograd.grad(out, (q, k, v), grad)
        result["bwd"] = {"torch": counter.ops.copy(), "triton": launches.copy()}
    return result


def describe_launches(counts: dict[str, dict[str, collections.Counter]]) -> list[str]:
    lines = []
    for pass_name, label in (("fwd", "forward"), ("bwd", "backward")):
        ops, kernels = counts[pass_name]["torch"], counts[pass_name]["triton"]
        lines.append(
            f"{label}: {sum(ops.values())} torch ops doing work (views, bare allocations aside), "
            f"{sum(kernels.values())} Triton launches"
        )
        detail = ", ".join(f"{name} x{n}" for name, n in ops.most_common())
        lines.append(f"  torch: {detail or '-'}")
        if kernels:
            lines.append("  triton: " + ", ".join(f"{n} x{c}" for n, c in kernels.items()))
    return lines


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device = torch.device(args.device)
    attention = build(args.attn, block_per_row=args.block_per_row, backend=args.backend)
    shape = (args.batch, args.heads, args.n, args.d)
    q, k, v = (
        torch.randn(shape, device=device, dtype=DTYPES[args.dtype], requires_grad=True)
        for _ in "qkv"
    )
    grad = torch.randn_like(q)

    def step() -> None:
        out = attention(q, k, v, None)
        torch.autograd.grad(out, (q, k, v), grad)

    for _ in range(3):  # compilation, autotuning, allocator
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    wall_ms = 1e3 * (time.perf_counter() - start) / args.steps

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    events = prof.key_averages()
    lines = [
        f"{args.attn} fwd+bwd, B={args.batch} H={args.heads} n={args.n} d={args.d} "
        f"{args.dtype} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
        f"torch {torch.__version__}",
        f"wall time per step (unprofiled): {wall_ms:.3f} ms",
        *describe_launches(count_launches(attention, q, k, v, grad)),
    ]
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_us = sum(e.device_time for e in kernels) / args.steps
        lines += [
            f"device kernels per step: {len(kernels) / args.steps:.0f}, their summed time: "
            f"{device_us / 1e3:.3f} ms ({100 * device_us / 1e3 / wall_ms:.0f}% of the wall time)",
            "",
            events.table(sort_by="self_cuda_time_total", row_limit=args.rows),
        ]
    lines += ["", events.table(sort_by="self_cpu_time_total", row_limit=args.rows)]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_mra.txt").write_text(text + "\n")
    prof.export_chrome_trace(str(args.out / "profile_mra.json"))
    print(text)
    return text


if __name__ == "__main__":
    main()
