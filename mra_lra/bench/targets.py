"""The speed targets, judged from benchmark tables. GPU (issue 3), read off the tables
`make gpu-check` writes:

    python -m mra_lra.bench.targets bench_out [--out bench_out/targets.md]

CPU (issue 21; `cpu_report`): five runs of the torch path's measurement, each attention in a
process of its own, and their spread (a few minutes on a 2-core machine; measure it idle):

    python -m mra_lra.bench.targets --cpu cpu_out [--runs 5] [--out cpu_out/cpu_targets.md]

GPU targets: MRA-2 on Triton (bf16, fwd+bwd, best tile) at least 4x faster than SDPA-flash at
n=4096 and 12x at 16384 (attention.csv, graph.csv, batch16.csv); faster than FlexAttention on the
same blocks (flex.csv, flex128.csv); the published profile under 7.05 ms per instance
(published.csv); 65,536 tokens on one GPU (attention.csv).

A target without a measured row says "not measured" rather than passing; MRA-2 failing there
(out of memory, an error, skipped after one) is "missed", with the row's status. The verdicts come
from the CSVs alone; nothing here is typed in but the targets themselves.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from mra_lra.bench.attention import read_csv, speedups
from mra_lra.bench.cli import check_at_least
from mra_lra.bench.report import markdown_table

# n -> times faster than SDPA-flash (bf16, fwd+bwd)
FLASH_TARGETS = {4096: 4.0, 16384: 12.0}
PUBLISHED_MS = 7.05  # MRA-2, ms per instance at n=4096 (the published paper's profile)
SPEED_TABLES = {
    "attention.csv": "B=1, eager",
    "graph.csv": "B=1, CUDA graph",
    "batch16.csv": "batch 16, eager",
}


def _load(folder: Path, name: str) -> list[dict]:
    path = folder / name
    return read_csv(path) if path.exists() and path.stat().st_size else []


def _verdict(ok: bool | None) -> str:
    return {True: "met", False: "missed", None: "not measured"}[ok]


def _where(rows: list[dict], equal: dict) -> list[dict]:
    """The rows whose columns have the values in `equal`."""
    return [r for r in rows if all(r[k] == v for k, v in equal.items())]


def _best(rows: list[dict], key: tuple[str, ...], score: str, lowest: bool = False) -> dict:
    """{row's values of `key`: the row of the highest (or lowest) `score` among them}."""
    best: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: r[score], reverse=not lowest):
        best.setdefault(tuple(r[c] for c in key), r)
    return best


def _speed_rows(folder: Path, name: str) -> list[dict]:
    """The rows of one speed table that the flash targets are about: bfloat16, fwd+bwd."""
    return _where(
        _load(folder, name), {"dtype": "bfloat16", "pass": "fwd+bwd", "scope": "attention"}
    )


def flash_rows(folder: Path) -> list[dict]:
    """One row per (table, attention, n, batch): the best Triton tile's speed-up over flash."""
    out = []
    for name, setting in SPEED_TABLES.items():
        triton = [
            s
            for s in speedups(_speed_rows(folder, name), "sdpa_flash")
            if s["attn"] in ("mra", "mra_s") and s["impl"].startswith("triton")
        ]
        for (attn, n, _), s in sorted(_best(triton, ("attn", "n", "batch"), "speedup").items()):
            target = FLASH_TARGETS.get(n) if attn == "mra" else None
            met = None if target is None else s["speedup"] >= target
            out.append(dict(s, table=name, setting=setting, target=target, met=met))
    return out


def failed_flash_rows(folder: Path, n: int) -> list[dict]:
    """MRA-2's bfloat16 fwd+bwd rows at n that did not run (any table): a speed target there is
    missed, not unmeasured."""
    return [
        dict(r, setting=setting, table=name)
        for name, setting in SPEED_TABLES.items()
        for r in _speed_rows(folder, name)
        if r["attn"] == "mra" and r["n"] == n and r["status"] != "ok"
    ]


def flex_rows(folder: Path) -> list[dict]:
    """MRA-2 on Triton (best tile) against flex_mra (best mask tile) on the same shapes."""

    def timed(rows: list[dict], attn: str, prefix: str) -> dict[tuple, dict]:
        equal = {"attn": attn, "status": "ok", "dtype": "bfloat16", "pass": "fwd+bwd"}
        rows = [r for r in _where(rows, equal) if r["impl"].startswith(prefix) and r["ms"]]
        return _best(rows, ("batch", "heads", "n", "d"), "ms", lowest=True)

    mra = timed(_load(folder, "attention.csv"), "mra", "triton")
    flex = timed(_load(folder, "flex.csv") + _load(folder, "flex128.csv"), "flex_mra", "")
    out = []
    for k in sorted(set(mra) & set(flex), key=lambda k: k[2]):
        ratio = flex[k]["ms"] / mra[k]["ms"]
        out.append(
            dict(n=k[2], batch=k[0], mra_ms=mra[k]["ms"], mra_impl=mra[k]["impl"])
            | dict(flex_ms=flex[k]["ms"], ratio=ratio, met=ratio > 1.0)
        )
    return out


def published_row(folder: Path) -> dict | None:
    equal = {"attn": "mra", "scope": "layer", "pass": "fwd+bwd", "dtype": "float32", "n": 4096}
    for r in _where(_load(folder, "published.csv"), equal | {"status": "ok"}):
        if r["ms_per_instance"]:
            ms = float(r["ms_per_instance"])
            return {"impl": r["impl"], "batch": r["batch"], "ms": ms, "met": ms < PUBLISHED_MS}
    return None


LONG_N = 65536


def long_rows(folder: Path) -> list[dict]:
    """MRA-2 on Triton at 65,536 tokens, forward + backward: one row per dtype and tile."""
    columns = ("dtype", "impl", "ms", "peak_mib", "status")
    return [
        {c: r[c] for c in columns} | {"met": r["status"] == "ok"}
        for r in _where(
            _load(folder, "attention.csv"), {"attn": "mra", "n": LONG_N, "pass": "fwd+bwd"}
        )
        # a row skipped after an earlier failure may have no impl: it is a miss all the same
        if r["impl"].startswith("triton") or r["status"] != "ok"
    ]


def _table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """A Markdown section: title, then the table (one "not measured" row when rows is empty)."""
    rows = rows or [["-"] * (len(header) - 1) + ["not measured"]]
    return ["", f"## {title}", "", *markdown_table(header, rows)]


def report(folder: Path) -> str:
    flash = [
        [r["setting"], r["attn"], r["n"], r["batch"], r["impl"], f"{r['speedup']:.2f}"]
        + ([f">= {r['target']:g}x", _verdict(r["met"])] if r["target"] else ["-", "-"])
        for r in flash_rows(folder)
    ]
    for n, target in FLASH_TARGETS.items():
        if any(r[1] == "mra" and r[2] == n for r in flash):
            continue
        failed = [
            [r["setting"], "mra", n, r["batch"], r["impl"] or "-", "-", f">= {target:g}x"]
            + [f"missed ({r['status']})"]
            for r in failed_flash_rows(folder, n)
        ]
        flash += failed or [["-", "mra", n, "-", "-", "-", f">= {target:g}x", "not measured"]]
    flex = [
        [r["n"], r["batch"], f"{r['mra_ms']:.3g} ({r['mra_impl']})", f"{r['flex_ms']:.3g}"]
        + [f"{r['ratio']:.2f}", _verdict(r["met"])]
        for r in flex_rows(folder)
    ]
    pub = published_row(folder)
    published = [["-", "-", "-", f"< {PUBLISHED_MS}", "not measured"]]
    if pub:
        published = [[pub["impl"], pub["batch"], f"{pub['ms']:.3g}", f"< {PUBLISHED_MS}"]]
        published[0].append(_verdict(pub["met"]))
    long = [
        [r["dtype"], r["impl"], f"{r['ms']:.3g}" if r["ms"] else "-", r["peak_mib"] or "-"]
        + [r["status"], _verdict(r["met"])]
        for r in long_rows(folder)
    ]
    lines = [f"# Speed targets (issue 3), from the tables in {folder}"]
    lines += _table(
        "MRA on Triton against SDPA-flash (bfloat16, forward + backward)",
        ["setting", "attention", "n", "batch", "best tile", "x flash", "target", "verdict"],
        flash,
    )
    lines += _table(
        "MRA-2 on Triton against FlexAttention on the same blocks (bfloat16, fwd+bwd)",
        ["n", "batch", "MRA-2 ms (tile)", "flex_mra ms (best mask tile)", "flex / MRA-2"]
        + ["verdict"],
        flex,
    )
    lines += _table(
        "The published profiling setup (float32, n=4096, layer forward + backward)",
        ["impl", "batch", "ms per instance", "target", "verdict"],
        published,
    )
    lines += _table(
        f"MRA-2 on Triton at {LONG_N:,} tokens (forward + backward)",
        ["dtype", "tile", "ms", "peak MiB", "status", "verdict"],
        long,
    )
    return "\n".join(lines) + "\n"


# n -> (median, slowest run) times faster than SDPA: MRA-2's torch path, float32, fwd+bwd.
CPU_TARGETS = {4096: (4.0, 3.0), 16384: (12.0, 10.0)}
CPU_PEAK_RATIO = 2.0  # MRA-2's peak memory at most this times SDPA's, at the longest length
# The measurement: B=2, H=2, d=32, float32, forward+backward, block_per_row 8 (conf/attn/mra.yaml),
# full mode, first-block prior, median of --repeats; SDPA is attn=softmax (torch's SDPA).
CPU_ATTNS = {"softmax": [], "mra": ["--set", "mra.initial_prior_first_n_blocks=1"]}
CPU_SHAPE = ["--d", "32", "--heads", "2", "--batch", "2", "--dtype", "float32"]


def cpu_command(attn: str, run: int, folder: Path, ns=tuple(CPU_TARGETS), repeats=5) -> list[str]:
    """One run of one attention: bench.attention in a process of its own."""
    return [
        *(sys.executable, "-m", "mra_lra.bench.attention", "--device", "cpu", "--attn", attn),
        *("--n", ",".join(map(str, ns)), *CPU_SHAPE, "--passes", "fwd+bwd"),
        *("--repeats", str(repeats), "--warmup", "1", "--out", str(folder)),
        *("--name", f"cpu_run{run}_{attn}", *CPU_ATTNS[attn]),
    ]


def cpu_runs(folder: Path) -> dict[int, dict[tuple[str, int], dict]]:
    """{run: {(attn, n): row}} from the cpu_run<k>_<attn>.csv files in folder."""
    runs: dict[int, dict] = {}
    for path in sorted(folder.glob("cpu_run*_*.csv")):
        run = int(path.stem.removeprefix("cpu_run").split("_", 1)[0])
        for r in read_csv(path):
            runs.setdefault(run, {})[r["attn"], r["n"]] = r
    return runs


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3g} (min {min(values):.3g}, max {max(values):.3g})"


def cpu_report(folder: Path) -> str:
    """Per run: SDPA and MRA-2 ms and their ratio at each length, peak MiB at the longest; then
    the median, slowest and spread over the runs, judged against CPU_TARGETS."""
    runs = cpu_runs(folder)
    ns = sorted({n for rows in runs.values() for _, n in rows}) or list(CPU_TARGETS)
    ratios: dict[int, list[float]] = {n: [] for n in ns}
    peaks: list[float] = []
    table = []
    for run, rows in sorted(runs.items()):
        cells = [run]
        for n in ns:
            sdpa, mra = rows.get(("softmax", n)), rows.get(("mra", n))
            if not (sdpa and mra and sdpa["status"] == mra["status"] == "ok"):
                cells += ["-", "-", "not measured"]
                continue
            ratios[n].append(sdpa["ms"] / mra["ms"])
            cells += [f"{sdpa['ms']:.1f}", f"{mra['ms']:.1f}", f"{ratios[n][-1]:.2f}"]
        sdpa, mra = rows.get(("softmax", ns[-1])), rows.get(("mra", ns[-1]))
        if sdpa and mra and sdpa["peak_mib"] and mra["peak_mib"]:
            a, b = float(sdpa["peak_mib"]), float(mra["peak_mib"])
            peaks.append(b / a)
            cells.append(f"{a:.1f} / {b:.1f} ({b / a:.2f}x)")
        table.append(cells + ["-"] * (2 + 3 * len(ns) - len(cells)))
    judged = []
    for n, (median_target, slowest_target) in CPU_TARGETS.items():
        got = ratios.get(n) or []
        median_met = statistics.median(got) >= median_target if got else None
        judged.append([f"median x SDPA at {n} >= {median_target:g}", _spread(got)])
        judged[-1].append(_verdict(median_met))
        slowest = f"{min(got):.3g}" if got else "-"
        judged.append([f"slowest run x SDPA at {n} >= {slowest_target:g}", slowest])
        judged[-1].append(_verdict(min(got) >= slowest_target if got else None))
    peak_met = max(peaks) <= CPU_PEAK_RATIO if peaks else None
    judged.append([f"peak memory <= {CPU_PEAK_RATIO:g}x SDPA's", _spread(peaks)])
    judged[-1].append(_verdict(peak_met))
    header = ["run"] + [f"{x} {n}" for n in ns for x in ("SDPA ms", "MRA-2 ms", "x SDPA at")]
    header.append(f"peak MiB at {ns[-1]}: SDPA / MRA-2")
    lines = [f"# CPU targets (issue 21), from the cpu_run CSVs in {folder}"]
    lines += _table("Every run (float32, forward + backward)", header, table)
    lines += _table("Over the runs", ["target", "measured", "verdict"], judged)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m mra_lra.bench.targets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", type=Path, help="where make gpu-check wrote its CSVs ($OUT)")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    p.add_argument("--cpu", action="store_true", help="run the CPU measurement into folder")
    p.add_argument("--runs", type=int, default=5, help="with --cpu: runs of every attention")
    p.add_argument("--repeats", type=int, default=5, help="with --cpu: timed steps per row")
    args = p.parse_args(argv)
    if args.cpu:
        check_at_least(p, args, 1, "runs", "repeats")
        args.folder.mkdir(parents=True, exist_ok=True)
        for old in args.folder.glob("cpu_run*_*.csv"):
            old.unlink()
        for run in range(1, args.runs + 1):
            for attn in CPU_ATTNS:
                subprocess.run(
                    cpu_command(attn, run, args.folder, repeats=args.repeats), check=True
                )
        text = cpu_report(args.folder)
    elif not args.folder.is_dir():
        raise SystemExit(f"{args.folder} is not a folder: pass the $OUT of make gpu-check")
    else:
        text = report(args.folder)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
