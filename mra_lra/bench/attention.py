"""Attention benchmark: median time and peak memory of forward and forward+backward.

    python -m mra_lra.bench.attention --attn mra,mra_s,softmax --n 1024,4096,16384 --d 32 \\
        --heads 2 --batch 2 --dtype float32,bfloat16 --device cuda --out bench_out
    python -m mra_lra.bench.attention --profile-published --device cuda --out bench_out
    python -m mra_lra.bench.attention --plot-from bench_out/a.csv bench_out/b.csv --out bench_out

Options, inputs and how time and memory are measured: docs/benchmarks.md, "What is measured".
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import functools
import inspect
import itertools
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mra_lra.attention import build, get, names
from mra_lra.attention.mra import resolve_backend
from mra_lra.bench.cli import (
    add_timing,
    check_at_least,
    check_csv_files,
    check_device,
    check_names,
    comma_list,
)
from mra_lra.bench.plotting import length_panel, pyplot, save
from mra_lra.utils import CONF_DIR

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PASSES = ("fwd", "fwd+bwd")
PLOT_COLUMNS = "attn impl scope device dtype batch heads n d pass ms status".split()
FIELDS = (
    "attn impl scope device dtype batch heads n d pass ms ms_per_instance peak_mib status".split()
)
MRA_NAMES = ("mra", "mra_s")
M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)

Step = Callable[[], None]


class SDPAFlash(nn.Module):
    """Exact attention on SDPA's flash backend only (it takes no mask; benchmarks pass none)."""

    def forward(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)


class EncoderLayer(nn.Module):
    """A pre-LN Transformer block around `attention`: the unit the published profiling timed."""

    def __init__(self, attention: nn.Module, heads: int, head_dim: int, ffn_mult: int = 4):
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim, self.attention = heads, head_dim, attention
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, n, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = self.attention(q, k, v, None).transpose(1, 2).reshape(B, n, width)
        x = x + self.proj(y)
        return x + self.ffn(self.norm2(x))


class Recorder:
    """Appends each row to the CSV as it finishes, so that a run cut short keeps what it
    measured, and prints it as `line(row)`."""

    def __init__(self, path: Path, fields: list[str], line: Callable[[dict], str]):
        self.path, self.fields, self.line, self.rows = path, fields, line, []
        with path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writeheader()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}
            )
        print(self.line(row), flush=True)

    def add_failed(self, base: dict, passes, status: str) -> None:
        for pass_name in passes:
            self.add(dict(base, status=status, **{"pass": pass_name}))


def row_text(row: dict) -> str:
    ms = f"{row['ms']:.3f} ms" if "ms" in row else ""
    mem = f"{row['peak_mib']:.1f} MiB" if row.get("peak_mib") is not None else ""
    return (
        f"{row['attn']:>11} {row['impl']:>15} {row['scope']:>9} {row['dtype']:>8} "
        f"B={row['batch']:<4} n={row['n']:<6} {row['pass']:>7} {ms:>13} {mem:>13}  {row['status']}"
    )


def parse_overrides(items: list[str]) -> dict[str, dict]:
    """`key=value` (every attention taking `key`) or `name.key=value` -> {name or "*": {key: v}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value or name.key=value, got {item!r}")
        name, _, key = key.rpartition(".")
        out.setdefault(name or "*", {})[key] = yaml.safe_load(value)
    return out


def config_options(name: str, overrides: dict[str, dict], backend: str) -> dict:
    """Options from conf/attn/<name>.yaml without Hydra interpolations, plus overrides."""
    path = CONF_DIR / "attn" / f"{name}.yaml"
    options = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    options.pop("name", None)
    options = {k: v for k, v in options.items() if not (isinstance(v, str) and "${" in v)}
    accepted = set(inspect.signature(get(name).__init__).parameters)
    if "backend" in accepted:
        options["backend"] = backend
    options.update({k: v for k, v in overrides.get("*", {}).items() if k in accepted})
    options.update(overrides.get(name, {}))
    return options


def build_attention(
    name: str,
    *,
    heads: int,
    n: int,
    d: int,
    device: torch.device,
    args: argparse.Namespace,
    extra: dict | None = None,
) -> tuple[nn.Module, str]:
    """The module and a label of how it runs (torch, triton, sdpa-flash, flex); `extra` options
    go on top of the config's and --set's."""
    if name == "sdpa_flash":
        return SDPAFlash(), "sdpa-flash"
    if name not in names():
        raise LookupError(f"{name!r} is not registered (registered: {', '.join(names())})")
    options = {**config_options(name, args.overrides, args.backend), **(extra or {})}
    context = {"head_dim": d, "num_heads": heads, "max_length": n}
    module = build(name, context=context, **options).to(device).eval()
    if "backend" in options:
        return module, resolve_backend(options["backend"], device)
    if name == "flex_mra":  # the BlockMask tile decides its speed: runs with others differ
        return module, f"flex(m{module.mask_block_size})"
    return module, "torch"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE).group(1))


def peak_mib(step: Step, device: torch.device) -> float:
    """Memory one step needs beyond what is allocated before it (docs/benchmarks.md)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return math.nan
    # glibc keeps freed heap blocks, where a new step would reuse them unseen.
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 2**10)
    libc.malloc_trim(0)
    try:
        rss = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        step()
        return (_status_kib("VmHWM") - rss) / 1024
    except (OSError, AttributeError):
        return math.nan
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's largest dynamic threshold


def median_ms(step: Step, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(step: Step, device: torch.device, args: argparse.Namespace) -> tuple[float, float]:
    """(median milliseconds, peak MiB). Fewer repeats when they would take over max_seconds."""
    last = 0.0
    for _ in range(args.warmup):
        start = time.perf_counter()
        step()
        sync(device)
        last = time.perf_counter() - start
    repeats = max(1, min(args.repeats, int(args.max_seconds / max(last, 1e-9))))
    return median_ms(step, device, repeats), peak_mib(step, device)


def pass_steps(run: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> dict[str, Step]:
    """`fwd` without gradients and `fwd+bwd` to the gradients of `inputs` (the first shaped as
    the output)."""
    grad = torch.randn_like(inputs[0])

    def forward() -> None:
        with torch.no_grad():
            run()

    def forward_backward() -> None:  # allow_unused: reformer and soft ignore k
        torch.autograd.grad(run(), inputs, grad, allow_unused=True)

    return {"fwd": forward, "fwd+bwd": forward_backward}


def attention_steps(module: nn.Module, q, k, v) -> dict[str, Step]:
    return pass_steps(lambda: module(q, k, v, None), [q, k, v])


def layer_steps(layer: nn.Module, x: torch.Tensor) -> dict[str, Step]:
    return pass_steps(lambda: layer(x), [x, *layer.parameters()])


def graphed(step: Step) -> Step:
    """`step` captured once in a CUDA graph, returned as its replay: the kernels' own time
    without Python or launch cost (shapes are static, MRA reads nothing back to the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream: compilation, autotuning
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _lazy(wrap: Callable[[Step], Step], step: Step) -> Step:
    """wrap(step), built on the first call, so that a capture failure is the row's failure."""
    built = functools.cache(lambda: wrap(step))
    return lambda: built()()


def is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return (
        isinstance(error, torch.cuda.OutOfMemoryError | MemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def describe(error: BaseException) -> str:
    if is_oom(error):
        return "oom"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"error: {type(error).__name__}: {first_line[:160]}"


def measure_rows(steps: dict[str, Step], base: dict, device, args, rec: Recorder) -> list[str]:
    """One row per pass; a failure fails the passes after it the same way. Returns statuses."""
    status, statuses = None, []
    for pass_name in args.passes if base["scope"] == "attention" else PASSES:
        row = dict(base, **{"pass": pass_name})
        if status is None:
            try:
                ms, peak = measure(steps[pass_name], device, args)
                # A replayed graph allocates nothing (its pool is private): no peak to report.
                if base["impl"].endswith("+graph"):
                    peak = None
                row.update(ms=ms, ms_per_instance=ms / base["batch"], peak_mib=peak)
            except Exception as e:  # every failure becomes a row
                status = describe(e)
        statuses.append(status or "ok")
        rec.add(dict(row, status=statuses[-1]))
    return statuses


def run_grid(args: argparse.Namespace, rec: Recorder) -> None:
    device = torch.device(args.device)
    on_triton = resolve_backend(args.backend, device) == "triton"
    for dtype_name, name in itertools.product(args.dtype, args.attn):
        tiles = [None]
        if name in MRA_NAMES and on_triton:
            tiles = list(itertools.product(args.query_rows, args.blocks_per_step))
        common = dict(attn=name, scope="attention", device=device.type, dtype=dtype_name)
        for tile in tiles:
            # Longer lengths are skipped after out of memory, and after the same failure of every
            # pass at two lengths in a row (a compile failure repeats, each try costing seconds).
            skipped: str | None = None  # the status of every longer length, once set
            impl = ""
            last_error: tuple[int, str] | None = None  # (n, status) when every pass failed
            for n in args.n:
                base = dict(common, impl=impl, batch=args.batch, heads=args.heads, n=n, d=args.d)
                if skipped:
                    rec.add_failed(base, args.passes, skipped)
                    continue
                statuses = run_length(args, device, base, tile, rec)
                impl = base["impl"]
                free(device)
                error = statuses[0] if "ok" not in statuses else None
                if "oom" in statuses:
                    skipped = f"skipped (out of memory at n={n})"
                elif error is not None and last_error is not None and last_error[1] == error:
                    skipped = f"skipped (the same failure at n={last_error[0]} and n={n})"
                last_error = None if error is None else (n, error)


def run_length(args, device: torch.device, base: dict, tile, rec: Recorder) -> list[str]:
    """Rows of one attention at one length; returns their statuses. `tile`: (query rows,
    blocks per step) of the MRA Triton kernels, or None."""
    n, name = base["n"], base["attn"]
    try:
        extra = {"query_rows": tile[0], "blocks_per_step": tile[1]} if tile else None
        module, impl = build_attention(
            name, heads=args.heads, n=n, d=args.d, device=device, args=args, extra=extra
        )
        if impl == "triton" and tile:
            impl += f"(q{32 * tile[0]},k{32 * tile[1]})"
        base["impl"] = impl
        shape = (args.batch, args.heads, n, args.d)
        dtype = DTYPES[base["dtype"]]
        q, k, v = (
            torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv"
        )
    except Exception as e:  # every failure becomes a row
        rec.add_failed(base, args.passes, describe(e))
        return [describe(e)]
    steps = attention_steps(module, q, k, v)
    if args.cuda_graph:
        base["impl"] += "+graph"
        steps = {name: _lazy(graphed, step) for name, step in steps.items()}
    return measure_rows(steps, base, device, args, rec)


def largest_fitting_batch(make_step: Callable[[int], Step], device, max_batch: int) -> int:
    """The largest power of two up to max_batch whose forward+backward step runs (0: none)."""
    fits, batch = 0, 1
    while batch <= max_batch:
        try:
            make_step(batch)()
            sync(device)
        except Exception as e:
            if not is_oom(e):
                raise
            break
        finally:
            free(device)
        fits, batch = batch, 2 * batch
    return fits


def profile_published(args: argparse.Namespace, rec: Recorder) -> None:
    device, heads, d, n = torch.device(args.device), 12, 64, args.profile_n
    args.overrides = {**args.overrides, "*": {"block_per_row": 8, **args.overrides.get("*", {})}}
    for name in args.attn:
        base = dict(attn=name, impl="", device=device.type, dtype="float32", heads=heads, n=n, d=d)
        try:
            steps = profile_one(name, base, device, heads, d, n, args)
        except Exception as e:  # every failure becomes a row
            rec.add_failed(dict(base, scope="layer", batch=""), PASSES, describe(e))
            continue
        for scope, scope_steps in steps.items():
            measure_rows(scope_steps, dict(base, scope=scope), device, args, rec)
        steps = None
        free(device)


def profile_one(name, base, device, heads, d, n, args) -> dict[str, dict[str, Step]]:
    """Search the batch; fill base's impl and batch; steps for the layer and the attention."""
    attention, base["impl"] = build_attention(name, heads=heads, n=n, d=d, device=device, args=args)
    layer = EncoderLayer(attention, heads, d).to(device)

    def make_step(batch: int) -> Step:
        x = torch.randn(batch, n, heads * d, device=device, requires_grad=True)
        return layer_steps(layer, x)["fwd+bwd"]

    fits = largest_fitting_batch(make_step, device, args.max_batch)
    if fits == 0:
        raise MemoryError("out of memory at batch 1")
    base["batch"] = max(1, fits // 2)
    print(f"{name}: largest batch that fits {fits} (cap {args.max_batch}), using {base['batch']}")
    x = torch.randn(base["batch"], n, heads * d, device=device, requires_grad=True)
    qkv = [
        torch.randn(base["batch"], heads, n, d, device=device, requires_grad=True) for _ in "qkv"
    ]
    return {"layer": layer_steps(layer, x), "attention": attention_steps(attention, *qkv)}


def speedups(rows: list[dict], baseline: str) -> list[dict]:
    """How many times faster than `baseline` each row is, where `baseline` has a row of the same
    dtype, batch, heads, length, head dim, pass and scope."""
    key = ("dtype", "batch", "heads", "n", "d", "pass", "scope")
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms")]
    base = {tuple(r[k] for k in key): r["ms"] for r in ok if r["attn"] == baseline}
    out = []
    for r in ok:
        reference = base.get(tuple(r[k] for k in key))
        if r["attn"] != baseline and reference:
            out.append(
                {**{k: r[k] for k in ("attn", "impl", *key)}, "speedup": reference / r["ms"]}
            )
    return out


def print_speedups(rows: list[dict], baseline: str) -> None:
    table = speedups(rows, baseline)
    if table:
        print(f"\nspeed-up over {baseline} (its time / this time):")
    for r in table:
        print(
            f"{r['attn']:>11} {r['impl']:>18} {r['dtype']:>8} B={r['batch']:<4} n={r['n']:<6} "
            f"{r['pass']:>7} {r['speedup']:8.3g}x"
        )


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["n"] = int(row["n"])
        if row["ms"]:
            row["ms"] = float(row["ms"])
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Time against length, log-log: one panel per (dtype, pass), one line per attention."""
    plt = pyplot("plot")
    ok = [r for r in rows if r.get("status") == "ok" and r.get("scope") == "attention"]
    if plt is None or not ok:
        return
    dtypes = sorted({r["dtype"] for r in ok})
    labels = sorted({(r["attn"], r["impl"]) for r in ok})
    fig, axes = plt.subplots(
        len(dtypes), len(PASSES), figsize=(5.5 * len(PASSES), 4 * len(dtypes)), squeeze=False
    )
    for (i, dtype), (j, pass_name) in itertools.product(enumerate(dtypes), enumerate(PASSES)):
        lines = {
            f"{attn} [{impl}]": [
                (r["n"], r["ms"])
                for r in ok
                if (r["attn"], r["impl"], r["dtype"], r["pass"]) == (attn, impl, dtype, pass_name)
            ]
            for attn, impl in labels
        }
        length_panel(axes[i][j], lines, "ms", f"{dtype}, {pass_name}")
    first = ok[0]
    title = (
        f"attention time vs length ({first['device']}, B={first['batch']}, "
        f"H={first['heads']}, d={first['d']})"
    )
    save(fig, path, title)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mra_lra.bench.attention",
        description="Time and peak memory of attentions against sequence length.",
    )
    p.add_argument("--attn", type=comma_list(), default=["mra", "mra_s", "softmax"])
    p.add_argument("--n", type=comma_list(int), default=[1024, 4096, 16384])
    p.add_argument("--d", type=int, default=32, help="head dim")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", type=comma_list(), default=["float32"], help=", ".join(DTYPES))
    p.add_argument("--passes", type=comma_list(), default=list(PASSES), help="fwd,fwd+bwd")
    add_timing(p)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    for option, tile in (("--query-rows", "query rows"), ("--blocks-per-step", "keys per step")):
        what = f"MRA Triton tiles to compare: {tile} in 32s, 1, 2 or 4 (docs/benchmarks.md)"
        p.add_argument(option, type=comma_list(int), default=[1], help=what)
    p.add_argument("--set", action="append", default=[], metavar="[NAME.]KEY=VALUE")
    p.add_argument("--cuda-graph", action="store_true", help="replay steps from a CUDA graph")
    p.add_argument("--name", default=None, help="file stem (default attention / published)")
    p.add_argument("--profile-published", action="store_true")
    p.add_argument("--profile-n", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=None, help="default 1024 (CUDA), 4 (CPU)")
    p.add_argument("--plot-from", type=Path, nargs="+", default=None, metavar="CSV")
    args = p.parse_args(argv)
    if args.plot_from:
        check_csv_files(p, "--plot-from", args.plot_from, PLOT_COLUMNS)
    else:
        check_device(p, args.device)
    check_names(p, "--attn", args.attn, [*names(), "sdpa_flash"])
    check_names(p, "--dtype", args.dtype, DTYPES)
    check_names(p, "--passes", args.passes, PASSES)
    check_at_least(p, args, 1, "n", "d", "heads", "batch", "repeats", "profile_n", "max_batch")
    check_at_least(p, args, 0, "warmup")
    if not {*args.query_rows, *args.blocks_per_step} <= {1, 2, 4}:
        p.error("--query-rows and --blocks-per-step take 1, 2 or 4")
    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error("--cuda-graph needs --device cuda")
    if args.max_batch is None:
        args.max_batch = 1024 if args.device.startswith("cuda") else 4
    if args.name is None:
        args.name = "published" if args.profile_published else "attention"
    args.overrides = parse_overrides(args.set)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_from:
        rows = [row for path in args.plot_from for row in read_csv(path)]
        plot(rows, args.out / f"{args.name}.png")
        return
    torch.manual_seed(0)
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""
    print(f"device {args.device}{gpu}, torch {torch.__version__}", flush=True)
    rec = Recorder(args.out / f"{args.name}.csv", FIELDS, row_text)
    if args.profile_published:
        profile_published(args, rec)
    else:
        run_grid(args, rec)
        plot(rec.rows, args.out / f"{args.name}.png")
        print_speedups(rec.rows, "sdpa_flash" if "sdpa_flash" in args.attn else "softmax")
    print(f"wrote {rec.path}")


if __name__ == "__main__":
    main()
