"""LRA results report from run folders: one row per run, and the paper's table (attention x task,
mean ± std over seeds) that pools only runs whose settings agree apart from the seed.

    python -m mra_lra.bench.report runs/reproduce/listops --out report.md --plot acc_vs_speed.png
    python -m mra_lra.bench.report runs --exclude '*/multirun/*' --csv runs.csv --latex table.tex

README.md describes the grouping; what is left out is named under Notes.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import os
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

import yaml

from mra_lra.bench.plotting import pyplot
from mra_lra.errors import UserError, reported
from mra_lra.utils import atomic_open, atomic_write_text, flatten_config

# Task names as train.py writes them (cfg.task.name) -> the paper's column titles, in its order.
TASKS = {
    "listops": "ListOps",
    "text": "Text",
    "retrieval": "Retrieval",
    "image": "Image",
    "pathfinder": "Pathfinder",
    "pathx": "Path-X",
}
TASK_ALIASES = {"path_x": "pathx", "path-x": "pathx"}
FIRST_ATTNS = ("softmax", "mra", "mra_s")  # then every other attention A-Z

# LRA paper, Table 1: (their model name, accuracies in PUBLISHED_TASKS order); all failed Path-X.
PUBLISHED_TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
PUBLISHED = {
    "softmax": ("Transformer", (36.37, 64.27, 57.46, 42.44, 71.40)),
    "bigbird": ("BigBird", (36.05, 64.02, 59.29, 40.83, 74.87)),
    "performer": ("Performer", (18.01, 65.40, 53.82, 42.77, 77.05)),
    "linformer": ("Linformer", (35.70, 53.94, 52.27, 38.56, 76.34)),
    "reformer": ("Reformer", (37.27, 56.10, 53.40, 38.07, 68.50)),
    "longformer": ("Longformer", (35.63, 62.85, 56.89, 42.22, 69.71)),
    "local": ("Local Attention", (15.82, 52.98, 53.39, 41.46, 66.63)),
    "sparse_trans": ("Sparse Trans.", (17.07, 63.58, 59.59, 44.24, 71.71)),
    "sinkhorn": ("Sinkhorn Trans.", (33.67, 61.20, 53.83, 41.23, 67.45)),
    "synthesizer": ("Synthesizer", (36.99, 61.68, 54.67, 41.61, 69.45)),
    "linear": ("Linear Trans.", (16.13, 65.90, 53.09, 42.34, 75.30)),
}

ACCURACY_TITLES = {
    "test_acc": "Test accuracy (%) at the best-validation checkpoint",
    "test_acc_last": "Test accuracy (%) at the last step",
    "val_acc_best": "Best validation accuracy (%)",
}
# Why train.py writes null for these.
NULL_CAUSES = {
    "test_acc": " (test=false, or no validation ran so there was no best checkpoint)",
    "test_acc_last": " (the run had test=false)",
    "val_acc_best": " (no validation ran)",
}
THROUGHPUT = "train_tokens_per_second"
MEMORY = "peak_memory_mb"

# config.yaml keys that do not change what a run measures (a pattern also matches keys below it).
IGNORED_CONFIG_KEYS = (
    "seed",
    "paths",
    "trainer.default_root_dir",
    "callbacks.*.dirpath",
    "data.data_dir",
    "data.num_workers",  # EpochShuffleSampler orders batches; workers draw no random numbers
    "logger",  # wandb's run name even holds the seed
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "optimized_metric",
    "test",  # a run without test accuracy is listed on its own anyway
    "ckpt_path",  # resuming from last.ckpt is exact (tests/test_train.py)
    "model.attn",  # a copy of `attn`, which is compared itself
)
# Compared instead when a run of the cell has no config.yaml.
FALLBACK_FIELDS = ("attn_options", "max_length", "precision")
# Compared always: throughput and memory depend on where the run ran.
OUTCOME_FIELDS = ("steps", "device", "world_size", "data_generated")
DEFAULTS = {"world_size": 1}  # results.json from before world_size was recorded: one device
# Which differing settings name a row first.
SETTING_ORDER = ("results.", "data.max_length", "attn.", "optimizer.", "scheduler.")
MAX_SHOWN = 3  # settings a row names at most (unless more are needed to tell rows apart)

DUPLICATE = "‡"
GENERATED = "§"
ABSENT = "<absent>"


@dataclass
class Run:
    """One results.json and the config.yaml next to it (None when absent or unreadable)."""

    path: Path  # the run folder
    results: dict
    config: dict | None = None
    config_problem: str | None = None  # why config is None

    def __post_init__(self) -> None:
        self.task, self.attn, self.seed = (self.results[k] for k in ("task", "attn", "seed"))

    @property
    def family(self) -> str | None:
        """The recipe family (e.g. lra_jax), or None for the task configs' own (the MRA paper's)."""
        family = self.results.get("recipe")
        if family is None and self.config:
            family = (self.config.get("recipe") or {}).get("family")
        return family if isinstance(family, str) else None


@dataclass
class Skipped:
    path: Path
    reason: str


@dataclass
class Collection:
    runs: list[Run]
    skipped: list[Skipped]


@dataclass
class Stat:
    mean: float
    std: float | None  # None for a single run
    n: int


@dataclass
class Group:
    """Runs of one task and attention whose settings agree apart from the seed: one table row."""

    row: str  # attention (family) [the first settings that tell it from the cell's other groups]
    cell: str  # attention (family)
    task: str
    runs: list[Run]
    settings: str = ""  # every setting that tells it apart, "key=value, ..."
    differing_keys: list[str] = field(default_factory=list)  # of its cell, in SETTING_ORDER

    @property
    def duplicate_seeds(self) -> dict[int, list[Path]]:
        by_seed: dict[int, list[Path]] = {}
        for run in self.runs:
            by_seed.setdefault(run.seed, []).append(run.path)
        return {seed: paths for seed, paths in by_seed.items() if len(paths) > 1}

    @property
    def generated(self) -> object:
        """The generator settings of its (generated) set, or None for the release."""
        return self.runs[0].results.get("data_generated")

    @property
    def marks(self) -> str:
        return (DUPLICATE if self.duplicate_seeds else "") + (GENERATED if self.generated else "")


@dataclass
class Summary:
    runs: list[Run]
    tasks: list[str]  # present ones, in the paper's order
    rows: list[str]  # in order
    groups: dict[tuple[str, str], Group]  # (row, task) -> group
    metrics: tuple[str, ...]  # accuracy tables, in order
    tables: dict[str, dict[tuple[str, str], Stat]]  # field -> (row, task) -> Stat
    left_out: dict[str, list[Skipped]]  # field -> runs without a value for it
    skipped: list[Skipped]


# --- finding and reading runs --------------------------------------------------------------


def collect_runs(
    paths: Iterable[str | Path],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    with_debug: bool = False,
) -> Collection:
    """Every run folder at or below `paths`, read and checked; the rest become `Skipped`."""
    paths = [Path(p) for p in paths]
    folders: dict[Path, Path] = {}  # resolved -> as reached from the given path (for messages)
    for root in paths:
        if not root.exists():
            raise UserError(f"{root} does not exist: pass run or multirun folders (under runs/)")
        if root.is_file():
            if root.name != "results.json":
                raise UserError(
                    f"{root} is a file: pass run folders, multirun folders or results.json"
                )
            root = root.parent
        for name in ("results.json", "config.yaml", "train.log"):
            for file in root.rglob(name):
                parts = file.parent.relative_to(root).parts
                if file.is_file() and not any(p.startswith(".") for p in parts):
                    folders.setdefault(file.parent.resolve(), file.parent)
    # Inside a run folder, a folder without results.json (wandb's files/config.yaml) is no run.
    found = [
        folder
        for resolved, folder in sorted(folders.items(), key=lambda item: str(item[1]))
        if (folder / "results.json").is_file() or not set(resolved.parents) & folders.keys()
    ]
    if not found:
        raise UserError(
            f"no run folder under {', '.join(map(str, paths))}: a run writes config.yaml when it "
            "starts and results.json when it ends (python train.py task=<task> attn=<attn>)"
        )
    runs, skipped = [], []
    for folder in found:
        where = folder.as_posix()
        if include and not any(fnmatch.fnmatch(where, p) for p in include):
            item = Skipped(folder, f"not matched by --include {' '.join(include)}")
        elif hit := next((p for p in exclude if fnmatch.fnmatch(where, p)), None):
            item = Skipped(folder, f"excluded by --exclude {hit}")
        elif not with_debug and (debug := _debug_choice(folder)):
            item = Skipped(folder, f"a debug run (debug={debug}; --with-debug reports it)")
        else:
            item = _read_run(folder)
        (runs if isinstance(item, Run) else skipped).append(item)
    return Collection(runs, skipped)


def _debug_choice(folder: Path) -> str | None:
    """The run's debug=<name> override, from .hydra/overrides.yaml (the only place to pick it)."""
    try:
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    for override in overrides if isinstance(overrides, list) else []:
        key, _, value = str(override).partition("=")
        if key.lstrip("+~") == "debug" and value not in ("", "null"):
            return value
    return None


def _first_error(folder: Path) -> str | None:
    """The first ERROR (or CRITICAL) record of train.log, with its exception's last line."""
    try:
        lines = (folder / "train.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        if "][ERROR] - " in line or "][CRITICAL] - " in line:
            # A traceback follows the record, up to the next record ("[<time>][<logger>]...").
            tail = takewhile(lambda more: not more.startswith("["), lines[i + 1 :])
            last = [more.strip() for more in tail if more.strip()][-1:]
            return ": ".join([line.split("] - ", 1)[1], *last])
    return None


def _read_run(folder: Path) -> Run | Skipped:
    file = folder / "results.json"
    if not file.is_file():
        error = _first_error(folder)
        why = f"train.log: {error}" if error else "failed, stopped or still running"
        return Skipped(folder, f"no results.json ({why})")
    try:
        results = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return Skipped(folder, f"unreadable results.json ({error}); rerun this run or delete it")
    if not isinstance(results, dict):
        return Skipped(folder, "results.json is not a JSON object")
    for key, kind in (("task", str), ("attn", str), ("seed", int)):
        value = results.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return Skipped(folder, f"results.json has no {kind.__name__} `{key}` (got {value!r})")
    task = TASK_ALIASES.get(results["task"], results["task"])
    if task not in TASKS:
        known = ", ".join(TASKS)
        why = f"unknown task {results['task']!r} (known: {known}); add it to TASKS in {__name__}"
        return Skipped(folder, why)
    results = {**results, "task": task}
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except FileNotFoundError:
        return Run(folder, results, None, "no config.yaml")
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        return Run(folder, results, None, f"an unreadable config.yaml ({type(error).__name__})")
    if not isinstance(config, dict):
        return Run(folder, results, None, "a config.yaml that is not a mapping")
    return Run(folder, results, config)


# --- grouping and statistics ---------------------------------------------------------------


def summarise(
    collection: Collection, metrics: Sequence[str] = ("test_acc", "test_acc_last")
) -> Summary:
    """Split each (attention, task) cell into groups of equal settings and compute every cell."""
    unknown = [m for m in metrics if m not in ACCURACY_TITLES]
    if unknown:
        raise UserError(f"unknown metric {unknown}: choose from {', '.join(ACCURACY_TITLES)}")
    if not collection.runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in collection.skipped)
        raise UserError(f"no usable runs: {reasons}")
    by_cell: dict[tuple[str, str], list[Run]] = {}
    for run in collection.runs:
        name = f"{run.attn} ({run.family})" if run.family else run.attn
        by_cell.setdefault((name, run.task), []).append(run)
    groups = {(g.row, g.task): g for cell, runs in by_cell.items() for g in _split(*cell, runs)}

    tables: dict[str, dict[tuple[str, str], Stat]] = {}
    left_out: dict[str, list[Skipped]] = {}
    for name in (*metrics, THROUGHPUT, MEMORY):
        tables[name], left_out[name] = {}, []
        for cell, group in groups.items():
            values = []
            for run in group.runs:
                value, problem = _value(run.results, name)
                if problem:
                    left_out[name].append(Skipped(run.path, problem))
                else:
                    values.append(value)
            if values:
                std = statistics.stdev(values) if len(values) > 1 else None
                tables[name][cell] = Stat(statistics.fmean(values), std, len(values))

    def order(group: Group) -> tuple:
        run = group.runs[0]
        first = FIRST_ATTNS.index(run.attn) if run.attn in FIRST_ATTNS else len(FIRST_ATTNS)
        return run.family or "", first, run.attn, group.row

    return Summary(
        runs=sorted(collection.runs, key=lambda r: str(r.path)),
        tasks=[t for t in TASKS if any(run.task == t for run in collection.runs)],
        rows=list(dict.fromkeys(g.row for g in sorted(groups.values(), key=order))),
        groups=groups,
        metrics=tuple(metrics),
        tables=tables,
        left_out=left_out,
        skipped=list(collection.skipped),
    )


def _split(name: str, task: str, runs: list[Run]) -> list[Group]:
    """The groups of equal settings among one cell's runs, each named by what tells it apart."""
    on_results = any(run.config is None for run in runs)
    buckets: dict[tuple, list[Run]] = {}
    settings: dict[tuple, dict[str, str]] = {}
    for run in runs:
        flat = _settings(run, on_results)
        key = tuple(sorted(flat.items()))
        buckets.setdefault(key, []).append(run)
        settings[key] = flat
    keys = sorted(set().union(*settings.values()), key=_setting_order)
    differing = [k for k in keys if len({s.get(k, ABSENT) for s in settings.values()}) > 1]
    # A row names the settings where its group departs from the value most of the cell's runs
    # share (every group names a setting without such a majority).
    labels = {b: [] for b in buckets}
    for key in differing:
        counts = Counter()
        for bucket, members in buckets.items():
            counts[settings[bucket].get(key, ABSENT)] += len(members)
        (top, n), (_, second) = counts.most_common(2)
        for bucket in buckets:
            value = settings[bucket].get(key, ABSENT)
            if value != top or n == second:
                labels[bucket].append(f"{key.removeprefix('results.')}={value}")
    short = {b: v[:MAX_SHOWN] + ["…"] * (len(v) > MAX_SHOWN) for b, v in labels.items()}
    if len({tuple(v) for v in short.values()}) < len(buckets):
        short = labels
    return [
        Group(
            row=f"{name} [{', '.join(short[bucket])}]" if short[bucket] else name,
            cell=name,
            task=task,
            runs=sorted(members, key=lambda r: (r.seed, str(r.path))),
            settings=", ".join(labels[bucket]),
            differing_keys=differing,
        )
        for bucket, members in buckets.items()
    ]


def _setting_order(key: str) -> tuple[int, str]:
    first = [i for i, prefix in enumerate(SETTING_ORDER) if key.startswith(prefix)]
    return (first[0] if first else len(SETTING_ORDER)), key


def _settings(run: Run, on_results: bool) -> dict[str, str]:
    """Flat {key: value as JSON} of what must be equal across the seeds of one group."""
    if on_results:
        flat = flatten_config({"results": {k: run.results.get(k) for k in FALLBACK_FIELDS}})
    else:
        flat = flatten_config(run.config)
    for name in OUTCOME_FIELDS:
        flat[f"results.{name}"] = json.dumps(
            run.results.get(name, DEFAULTS.get(name)), sort_keys=True
        )
    return {k: v for k, v in flat.items() if not _ignored(k)}


def _ignored(key: str) -> bool:
    return any(
        fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, f"{p}.*")
        for p in IGNORED_CONFIG_KEYS
    )


def _value(results: dict, name: str) -> tuple[float, str | None]:
    """(value, None), or (nan, why it cannot be used). Accuracies come back in percent."""
    value = results.get(name)
    if value is None:
        if name not in results:
            return math.nan, f"results.json has no {name}"
        return math.nan, f"{name} is null" + NULL_CAUSES.get(name, "")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return math.nan, f"{name} is not a finite number ({value!r})"
    if name in ACCURACY_TITLES:
        if not 0 <= value <= 1:
            return math.nan, f"{name} = {value!r} is not a fraction in [0, 1]"
        return 100 * value, None
    if value < 0:
        return math.nan, f"{name} = {value!r} is negative"
    return float(value), None


# --- output --------------------------------------------------------------------------------


def format_markdown(summary: Summary) -> str:
    """Accuracy tables in the paper's layout, throughput, memory, every run, then notes."""
    devices = Counter(_device(run) for run in summary.runs)
    lines = [
        "# LRA results",
        "",
        f"{_count(len(summary.runs), 'run')} in {_count(len(summary.groups), 'group')}, "
        f"{len(summary.skipped)} skipped. Cells: mean ± sample std (n runs) over the seeds of "
        "runs whose settings agree; [...] names what tells a row from the others of its "
        "attention and task. Devices: "
        + ", ".join(f"{d} ({_count(n, 'run')})" for d, n in sorted(devices.items()))
        + ".",
    ]
    for metric in summary.metrics:
        lines += ["", f"## {ACCURACY_TITLES[metric]}", "", *_table(summary, metric, ".2f", True)]
    lines += _published(summary)
    kinds = sorted({str(r.results.get("peak_memory_kind") or "kind unknown") for r in summary.runs})
    for name, title in (
        (THROUGHPUT, "Training throughput (tokens/s)"),
        (MEMORY, f"Peak memory (MiB, {', '.join(kinds)})"),
    ):
        lines += ["", f"## {title}", "", *_table(summary, name, ",.0f", False)]
    lines += ["", "## Runs", "", *_runs_table(summary)]
    notes = _notes(summary)
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _device(run: Run) -> str:
    world_size = run.results.get("world_size", DEFAULTS["world_size"])
    return str(run.results.get("device", "unknown")) + (
        f" ×{world_size}" if world_size != 1 else ""
    )


def _cell(stat: Stat, spec: str) -> str:
    spread = "" if stat.std is None else f" ± {stat.std:{spec}}"
    return f"{stat.mean:{spec}}{spread} ({stat.n})"


def _averages(summary: Summary, stats: dict[tuple[str, str], Stat]) -> tuple[list[str], dict]:
    """The tasks some row has in this table, and the Avg of each row that has them all."""
    present = [t for t in summary.tasks if any(cell[1] == t for cell in stats)]
    averages = {
        row: statistics.fmean(stats[row, t].mean for t in present)
        for row in summary.rows
        if present and all((row, t) in stats for t in present)
    }
    return present, averages


def _table(summary: Summary, name: str, spec: str, average: bool) -> list[str]:
    stats = summary.tables[name]
    present, averages = _averages(summary, stats)
    rows = []
    for row in summary.rows:
        cells = [row]
        for task in summary.tasks:
            stat, group = stats.get((row, task)), summary.groups.get((row, task))
            marks = f" {group.marks}" if group and group.marks else ""
            cells.append((_cell(stat, spec) if stat else "—") + marks)
        if average:
            missing = [TASKS[t] for t in present if (row, t) not in stats]
            partial = f" (no {', '.join(missing)})" if len(missing) < len(present) else ""
            cells.append(f"{averages[row]:.2f}" if row in averages else "—" + partial)
        rows.append(cells)
    header = ["attention", *(TASKS[t] for t in summary.tasks)] + (["Avg"] if average else [])
    return markdown_table(header, rows, pad=True)


RUN_NUMBERS = {"test_acc": ".2f", "test_acc_last": ".2f", THROUGHPUT: ",.0f", MEMORY: ",.0f"}


def _runs_table(summary: Summary) -> list[str]:
    """One row per run, its path under the runs' common folder."""
    root = Path(os.path.commonpath([r.path.resolve() for r in summary.runs]))
    row_of = {id(run): g.row for g in summary.groups.values() for run in g.runs}
    rows = []
    for run in summary.runs:
        path = run.path.resolve()
        numbers = []
        for name, spec in RUN_NUMBERS.items():
            value, problem = _value(run.results, name)
            numbers.append("—" if problem else f"{value:{spec}}")
        rows.append(
            [
                str(path.relative_to(root)) if path != root else path.name,
                TASKS[run.task],
                row_of[id(run)],
                str(run.seed),
                str(run.results.get("max_length", "—")),
                str(run.results.get("steps", "—")),
                *numbers,
            ]
        )
    header = ["run", "task", "attention", "seed", "length", "steps", "test acc (%)",
              "last-step acc (%)", "tokens/s", "memory (MiB)"]  # fmt: skip
    return [f"Paths under `{root}`.", "", *markdown_table(header, rows, pad=True)]


def markdown_table(header: list[str], rows: list[list], pad: bool = False) -> list[str]:
    """A Markdown table's lines; pad aligns the columns for reading as plain text."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) if pad else 1 for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _published(summary: Summary) -> list[str]:
    """The LRA paper's accuracies for the attentions and tasks of this report, if any."""
    attns = [a for a in dict.fromkeys(g.runs[0].attn for g in _ordered(summary)) if a in PUBLISHED]
    tasks = [t for t in summary.tasks if t in PUBLISHED_TASKS]
    if not attns or not tasks:
        return []
    rows = [
        [f"{attn} ({PUBLISHED[attn][0]})"]
        + [f"{PUBLISHED[attn][1][PUBLISHED_TASKS.index(t)]:.2f}" for t in tasks]
        + [f"{statistics.fmean(PUBLISHED[attn][1]):.2f}"]
        for attn in attns
    ]
    generated = any(g.generated for g in summary.groups.values())
    marked = f" Cells marked {GENERATED} above are on generated data, not the release."
    return [
        "",
        "## Published test accuracy (%): LRA paper (Tay et al. 2021), Table 1",
        "",
        "Their models, recipes (the original LRA code) and data (the LRA release), for comparison;",
        "Avg is theirs, over their five tasks." + (marked if generated else ""),
        "",
        *markdown_table(["attention", *(TASKS[t] for t in tasks), "Avg (5 tasks)"], rows, pad=True),
    ]


def _ordered(summary: Summary) -> list[Group]:
    return [
        summary.groups[row, task]
        for row in summary.rows
        for task in summary.tasks
        if (row, task) in summary.groups
    ]


def _notes(summary: Summary) -> list[str]:
    notes = []
    generated: dict[str, list[str]] = {}
    cells_named = set()
    for group in _ordered(summary):
        where = f"{group.row} / {TASKS[group.task]}"
        for seed, paths in group.duplicate_seeds.items():
            listed = ", ".join(f"`{p}`" for p in paths)
            notes.append(
                f"- {DUPLICATE} {where}: seed {seed} appears {len(paths)} times (all counted): "
                f"{listed}."
            )
        if group.generated:
            generated.setdefault(json.dumps(group.generated, sort_keys=True), []).append(where)
        if group.row.endswith("…]") and (group.cell, group.task) not in cells_named:
            cells_named.add((group.cell, group.task))
            keys = ", ".join(f"`{k.removeprefix('results.')}`" for k in group.differing_keys)
            notes.append(
                f"- {group.cell} / {TASKS[group.task]}: its groups differ in {keys} (the CSV's "
                "settings column has the values)."
            )
        missing = [r for r in group.runs if r.config is None]
        if missing:
            why = ", ".join(f"`{r.path}` has {r.config_problem}" for r in missing)
            fields = ", ".join(FALLBACK_FIELDS + OUTCOME_FIELDS)
            notes.append(
                f"- {where}: settings compared on results.json fields ({fields}) only, as {why}."
            )
    for setting, where in generated.items():
        notes.append(
            f"- {GENERATED} {'; '.join(where)}: trained and tested on a set our reimplementation "
            "of the task's generator made (no LRA release was found), not comparable with "
            f"numbers on the release; generator settings `{setting}`."
        )
    left = [
        (f"Left out of the {name} table", item)
        for name, items in summary.left_out.items()
        for item in items
    ]
    left += [("Skipped", item) for item in summary.skipped]
    by_reason: dict[tuple[str, str], list[Path]] = {}
    for what, item in left:
        by_reason.setdefault((what, item.reason), []).append(item.path)
    for (what, reason), paths in by_reason.items():
        notes.append(f"- {what}, as {reason}: {', '.join(f'`{p}`' for p in paths)}.")
    return notes


def format_csv(summary: Summary) -> str:
    """One row per run: its table row, the settings that tell it apart, results.json's numbers."""
    fields = ["run", "task", "attention", "settings", "seed", "max_length", "steps", "device"]
    fields += ["test_acc", "test_acc_last", "val_acc_best", THROUGHPUT, MEMORY, "data_generated"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, lineterminator="\n")
    writer.writeheader()
    for group in _ordered(summary):
        for run in group.runs:
            values = {k: run.results.get(k) for k in fields}
            generated = json.dumps(run.results.get("data_generated"), sort_keys=True)
            values.update(run=run.path, task=run.task, attention=group.row, settings=group.settings)
            values.update(device=_device(run), data_generated=generated)
            writer.writerow({k: "" if v is None else v for k, v in values.items()})
    return out.getvalue()


def format_latex(summary: Summary, metric: str = "test_acc") -> str:
    """The `metric` table as a booktabs tabular, each column's best mean in bold."""
    stats = summary.tables[metric]
    present, averages = _averages(summary, stats)
    best = {t: max(s.mean for (_, task), s in stats.items() if task == t) for t in present}
    best["Avg"] = max(averages.values(), default=math.nan)

    def cell(mean: float, std: float | None, column: str, marks: str = "") -> str:
        text = f"{mean:.2f}" + (f" $\\pm$ {std:.2f}" if std is not None else "")
        if math.isclose(mean, best[column]):
            text = f"\\textbf{{{text}}}"
        latex = marks.replace(DUPLICATE, "\\ddagger").replace(GENERATED, "\\S")
        return text + (f"$^{{{latex}}}$" if latex else "")

    lines = [
        f"% {ACCURACY_TITLES[metric]}; mean $\\pm$ sample std over seeds "
        "(python -m mra_lra.bench.report)",
        "\\begin{tabular}{l" + "c" * (len(present) + 1) + "}",
        "\\toprule",
        " & ".join(["Attention", *(TASKS[t] for t in present), "Avg"]) + " \\\\",
        "\\midrule",
    ]
    for row in summary.rows:
        cells = [row.replace("_", "\\_").replace("&", "\\&").replace("%", "\\%")]
        for task in present:
            stat = stats.get((row, task))
            cells.append(
                cell(stat.mean, stat.std, task, summary.groups[row, task].marks) if stat else "--"
            )
        cells.append(cell(averages[row], None, "Avg") if row in averages else "--")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def plot(summary: Summary, path: str | Path, metric: str = "test_acc") -> None:
    """Accuracy against training throughput: a point per row and task (marker = task) as a PNG."""
    plt = pyplot("plot")
    if plt is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    acc, speed = summary.tables[metric], summary.tables[THROUGHPUT]
    cells = [cell for cell in acc if cell in speed]
    if not cells:
        raise UserError(f"nothing to plot: no cell has both {metric} and {THROUGHPUT}")
    markers = dict(zip(summary.tasks, "osD^vP", strict=False))
    colors = plt.get_cmap("tab10" if len(summary.rows) <= 10 else "tab20")
    color = {row: colors(i % 20) for i, row in enumerate(summary.rows)}
    fig, ax = plt.subplots(figsize=(7, 5))
    for row, task in cells:
        x, y = speed[row, task].mean, acc[row, task]
        ax.errorbar(
            x, y.mean, yerr=y.std or 0, fmt=markers[task], color=color[row], capsize=3, ms=7
        )
        ax.annotate(row, (x, y.mean), xytext=(5, 4), textcoords="offset points", fontsize=8)
    xs = [speed[cell].mean for cell in cells]
    # Speeds across tasks and attentions span decades; within one decade a log axis has no ticks.
    ax.set(
        xscale="log" if max(xs) > 10 * min(xs) else "linear",
        xlabel="training throughput (tokens/s, mean over seeds)",
        ylabel=ACCURACY_TITLES[metric],
        title="LRA: accuracy vs training speed",
    )
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
    ax.grid(True, which="both", alpha=0.3)
    used = {t for _, t in cells}
    handles = [
        Line2D([], [], marker=markers[t], color="grey", linestyle="", label=TASKS[t])
        for t in summary.tasks
        if t in used
    ]
    ax.legend(handles=handles, fontsize=8, title="task")
    fig.tight_layout()
    with atomic_open(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mra_lra.bench.report",
        description="LRA results: every run, and attention x task (mean ± std over the seeds of "
        "equal settings) from run folders.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run folders or folders above them")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="report only run folders whose path matches (repeatable)")  # fmt: skip
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out run folders whose path matches (repeatable)")  # fmt: skip
    p.add_argument("--with-debug", action="store_true", help="also report debug=... runs")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--plot", type=Path, default=None, help="accuracy vs tokens/s PNG")
    p.add_argument("--csv", type=Path, default=None, help="one row per run")
    p.add_argument("--latex", type=Path, default=None, help="the --metric table as a tabular")
    p.add_argument(
        "--metric",
        default="test_acc",
        choices=list(ACCURACY_TITLES),
        help="accuracy for the plot and --latex (val_acc_best also adds its table)",
    )
    return p.parse_args(argv)


_RUN_FILES = ("results.json", "config.yaml", "train.log", "metrics.csv")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics = tuple(dict.fromkeys(("test_acc", "test_acc_last", args.metric)))
    outputs = [p for p in (args.out, args.plot, args.csv, args.latex) if p is not None]
    with reported():
        for path in outputs:
            if path.name in _RUN_FILES or path.suffix == ".ckpt" or path.is_dir():
                raise UserError(
                    f"{path} is a run's file or a folder; write the report to a new file, e.g. "
                    f"{path.parent / 'report.md'}"
                )
        collection = collect_runs(args.paths, args.include, args.exclude, args.with_debug)
        summary = summarise(collection, metrics)
        text = format_markdown(summary)
        print(text, end="", flush=True)
        for path in outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
        for path, make in (
            (args.out, lambda: text),
            (args.csv, lambda: format_csv(summary)),
            (args.latex, lambda: format_latex(summary, args.metric)),
        ):
            if path:
                atomic_write_text(path, make())
        if args.plot:
            plot(summary, args.plot, args.metric)
        for path in outputs:
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
