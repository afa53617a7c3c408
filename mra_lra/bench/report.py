"""LRA results report: the paper's table (attention x task, mean ± std over seeds) from run folders.

    python -m mra_lra.bench.report runs/reproduce/listops --out report.md --plot acc_vs_speed.png
    python -m mra_lra.bench.report runs/2026-11-27/*_listops_mra runs/multirun/2026-11-28
    python -m mra_lra.bench.report runs/reproduce --csv cells.csv --latex table.tex

Every `results.json` below the given paths (run folders, Hydra multirun folders with their
numbered subfolders, or any folder above them) is one run; runs are grouped by (attention, task)
(the original LRA recipes, experiment=lra_jax/..., are rows of their own: "mra (lra_jax)") and each
cell is `mean ± std (n)` in percent over the group's seeds (sample std, ddof=1; a single
run shows no std). Tables: test accuracy at the best-validation checkpoint (`test_acc`), at the
last step (`test_acc_last`), then training throughput and peak memory per cell. Avg is the mean of
a row's task means, as in the LRA paper, and is left out (marked) for a row that lacks a task
another row has, so averages over different task sets are never set side by side. `--csv` writes
every cell in long form, `--latex` the `--metric` table as a booktabs tabular (best in bold).

Nothing is dropped silently. A cell is marked † when its runs differ in anything but the seed:
config.yaml (the resolved Hydra config train.py writes next to results.json) is compared key by
key, minus IGNORED_CONFIG_KEYS; without config.yaml, the results.json fields in FALLBACK_FIELDS
are compared instead. A cell is marked ‡ when a seed appears twice in it, and § when its runs
trained on a set our generators made (results.json's `data_generated`: ListOps or Pathfinder
without the release), whose accuracies are not LRA numbers. Runs whose results.json
is unreadable or lacks a known task, an attention or a seed are listed as skipped; runs without a
value for one table are listed under that table's name. The notes at the end say which and why.

Imports the standard library, pyyaml and our atomic writers (and matplotlib for --plot).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
# Rows: the exact baseline, then the paper's two MRA variants, then every other attention A-Z.
FIRST_ATTNS = ("softmax", "mra", "mra_s")

# The LRA paper's Table 1 (the LRA repository's leaderboard; spec/lra.md lists all but Linear
# Trans.) for the attentions we also run: (their model name, accuracies in PUBLISHED_TASKS order).
# Path-X: every model failed.
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

# config.yaml keys that do not change what a run measures, so runs differing only in them are
# still seeds of one setting. A pattern matches a key and everything below it (`*`: any part).
IGNORED_CONFIG_KEYS = (
    "seed",  # what a group is meant to vary
    "paths",  # output_dir, log_dir: where the run was written
    "trainer.default_root_dir",
    "callbacks.*.dirpath",
    "data.data_dir",  # where the data was read from, not what it is
    # Batches do not depend on the worker count: the order comes from EpochShuffleSampler and no
    # datamodule draws random numbers in its workers.
    "data.num_workers",
    "logger",  # which loggers ran (wandb's run name even holds the seed)
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "optimized_metric",  # what a sweeper maximises
    "test",  # whether testing ran: a run without test accuracy is listed on its own anyway
    # A resumed run is the same run: resuming from last.ckpt is exact (tests/test_train.py).
    "ckpt_path",
    "model.attn",  # conf/model/lra.yaml copies `attn`, which is compared itself
)
# Compared when a run has no config.yaml: the settings results.json records itself.
FALLBACK_FIELDS = ("attn_options", "max_length", "precision")
# Compared always: what the run did (steps), where (throughput and memory depend on it;
# throughput is of all ranks together) and on which data (a generated set or the release).
OUTCOME_FIELDS = ("steps", "device", "world_size", "data_generated")
# results.json written before train.py recorded world_size came from one-device runs; before it
# recorded data_generated, only generated ListOps sets existed and were not marked.
DEFAULTS = {"world_size": 1}

MIXED = "†"
DUPLICATE = "‡"
GENERATED = "§"
ABSENT = "<absent>"


class ReportError(ValueError):
    """Bad input to the report: the message names the problem and what fixes it."""


@dataclass
class Run:
    """One results.json and the config.yaml next to it (None when absent or unreadable)."""

    path: Path  # the run folder
    results: dict
    config: dict | None = None
    config_problem: str | None = None  # why config is None, when a config.yaml was expected

    @property
    def task(self) -> str:
        return self.results["task"]

    @property
    def attn(self) -> str:
        return self.results["attn"]

    @property
    def family(self) -> str | None:
        """The experiment family that set the recipe (`recipe.family`, e.g. lra_jax), or None for
        the task configs' own recipe (the MRA paper's, experiment=lra/...)."""
        family = self.results.get("recipe")
        if family is None and self.config:
            family = (self.config.get("recipe") or {}).get("family")
        return family if isinstance(family, str) else None

    @property
    def row(self) -> str:
        """The table row: the attention, and the recipe family when it is not the default."""
        return f"{self.attn} ({self.family})" if self.family else self.attn

    @property
    def seed(self) -> int:
        return self.results["seed"]


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
    """The runs of one (attention, task) cell and what is wrong with them as a set of seeds."""

    attn: str
    task: str
    runs: list[Run]
    # key -> {value as written: seeds that have it}, for every compared key that differs.
    differing: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    duplicate_seeds: dict[int, list[Path]] = field(default_factory=dict)
    # Runs without a usable config.yaml (their settings were compared on results.json fields).
    without_config: list[Run] = field(default_factory=list)
    # Runs on a set our generators made (results.json's data_generated), not the LRA release.
    generated: list[Run] = field(default_factory=list)


@dataclass
class Summary:
    tasks: list[str]  # present ones, in the paper's order
    attns: list[str]  # rows (attention, with its recipe family if not the default), in order
    groups: dict[tuple[str, str], Group]  # (attn, task) -> group
    metrics: tuple[str, ...]  # accuracy tables, in order
    # field -> (attn, task) -> Stat, for the accuracy metrics, THROUGHPUT and MEMORY.
    tables: dict[str, dict[tuple[str, str], Stat]]
    # field -> runs left out of that table, with the reason.
    left_out: dict[str, list[Skipped]]
    skipped: list[Skipped]
    memory_kinds: list[str]
    devices: dict[str, int]  # device -> run count


def collect_runs(paths: Iterable[str | Path]) -> Collection:
    """Every results.json at or below `paths`, read and checked; bad ones become `Skipped`."""
    paths = [Path(p) for p in paths]
    found: dict[Path, Path] = {}  # resolved -> as reached from the given path (for messages)
    for root in paths:
        if not root.exists():
            raise ReportError(
                f"{root} does not exist: pass run folders or multirun folders "
                "(train.py writes them under runs/ unless hydra.run.dir / hydra.sweep.dir say "
                "otherwise)"
            )
        if root.is_file() and root.name != "results.json":
            raise ReportError(
                f"{root} is a file: pass run folders, multirun folders or results.json"
            )
        files = [root] if root.is_file() else sorted(root.rglob("results.json"))
        for file in files:
            found.setdefault(file.resolve(), file)
    if not found:
        raise ReportError(
            f"no results.json under {', '.join(map(str, paths))}: a run writes it when training "
            "and testing finish (python train.py task=<task> attn=<attn> seed=<s>)"
        )
    runs, skipped = [], []
    for file in sorted(found.values()):
        run = _read_run(file)
        (runs if isinstance(run, Run) else skipped).append(run)
    return Collection(runs, skipped)


def _read_run(file: Path) -> Run | Skipped:
    folder = file.parent
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
        return Skipped(
            folder,
            f"unknown task {results['task']!r} (known: {', '.join(TASKS)}); "
            f"add it to TASKS in {__name__}",
        )
    results = {**results, "task": task}
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        return Run(folder, results, None, "no config.yaml")
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        return Run(folder, results, None, f"unreadable config.yaml ({type(error).__name__})")
    if not isinstance(config, dict):
        return Run(folder, results, None, "config.yaml is not a mapping")
    return Run(folder, results, config)


def summarise(
    collection: Collection, metrics: Sequence[str] = ("test_acc", "test_acc_last")
) -> Summary:
    """Group runs by (attention, task), compare their settings, and compute every cell."""
    unknown = [m for m in metrics if m not in ACCURACY_TITLES]
    if unknown:
        raise ReportError(f"unknown metric {unknown}: choose from {', '.join(ACCURACY_TITLES)}")
    if not collection.runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in collection.skipped)
        raise ReportError(f"no usable runs: {reasons}")
    by_cell: dict[tuple[str, str], list[Run]] = {}
    for run in collection.runs:
        by_cell.setdefault((run.row, run.task), []).append(run)
    groups = {cell: _group(*cell, runs) for cell, runs in by_cell.items()}

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
                tables[name][cell] = _stat(values)

    # Rows: the default recipe first, then each family; within one, FIRST_ATTNS, then A-Z.
    rows = {
        (
            run.family or "",
            FIRST_ATTNS.index(run.attn) if run.attn in FIRST_ATTNS else len(FIRST_ATTNS),
            run.attn,
            run.row,
        )
        for run in collection.runs
    }
    devices: dict[str, int] = {}
    for run in collection.runs:
        device = str(run.results.get("device", "unknown"))
        world_size = run.results.get("world_size", DEFAULTS["world_size"])
        if world_size != 1:
            device += f" ×{world_size}"
        devices[device] = devices.get(device, 0) + 1
    return Summary(
        tasks=[t for t in TASKS if any(run.task == t for run in collection.runs)],
        attns=[row for *_, row in sorted(rows)],
        groups=groups,
        metrics=tuple(metrics),
        tables=tables,
        left_out=left_out,
        skipped=list(collection.skipped),
        memory_kinds=sorted(
            {str(r.results.get("peak_memory_kind") or "kind unknown") for r in collection.runs}
        ),
        devices=devices,
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


def _stat(values: list[float]) -> Stat:
    std = statistics.stdev(values) if len(values) > 1 else None
    return Stat(statistics.fmean(values), std, len(values))


def _group(attn: str, task: str, runs: list[Run]) -> Group:
    group = Group(attn, task, sorted(runs, key=lambda r: (r.seed, str(r.path))))
    group.without_config = [r for r in group.runs if r.config is None]
    group.generated = [r for r in group.runs if r.results.get("data_generated")]
    settings = [_settings(r, use_config=not group.without_config) for r in group.runs]
    for key in sorted(set().union(*settings)):
        seeds_by_value: dict[str, list[int]] = {}
        for run, setting in zip(group.runs, settings, strict=True):
            seeds_by_value.setdefault(setting.get(key, ABSENT), []).append(run.seed)
        if len(seeds_by_value) > 1:
            group.differing[key] = seeds_by_value
    paths_by_seed: dict[int, list[Path]] = {}
    for run in group.runs:
        paths_by_seed.setdefault(run.seed, []).append(run.path)
    group.duplicate_seeds = {s: p for s, p in paths_by_seed.items() if len(p) > 1}
    return group


def _settings(run: Run, use_config: bool) -> dict[str, str]:
    """Flat {key: value as JSON} of what should be equal across the seeds of one cell."""
    flat: dict[str, str] = {}
    if use_config:
        flatten_config(run.config, "", flat)
    else:
        for name in FALLBACK_FIELDS:
            flatten_config({f"results.{name}": run.results.get(name)}, "", flat)
    for name in OUTCOME_FIELDS:
        value = run.results.get(name, DEFAULTS.get(name))
        flat[f"results.{name}"] = json.dumps(value, sort_keys=True)
    return {k: v for k, v in flat.items() if not _ignored(k)}


def _ignored(key: str) -> bool:
    parts = key.split(".")
    for pattern in IGNORED_CONFIG_KEYS:
        depth = pattern.count(".") + 1
        if len(parts) >= depth and fnmatch.fnmatchcase(".".join(parts[:depth]), pattern):
            return True
    return False


def format_markdown(summary: Summary) -> str:
    """The report: accuracy tables in the paper's layout, throughput and memory, then notes."""
    runs = sum(len(g.runs) for g in summary.groups.values())
    devices = ", ".join(f"{d} ({_runs(n)})" for d, n in sorted(summary.devices.items()))
    lines = [
        "# LRA results",
        "",
        f"{_runs(runs)}, {len(summary.skipped)} skipped. Cells: mean ± sample std (n runs) over "
        "seeds. Devices: " + devices + ".",
    ]
    for metric in summary.metrics:
        lines += ["", f"## {ACCURACY_TITLES[metric]}", ""]
        lines += _table(summary, metric, lambda s: _cell(s, ".2f"), average=True)
    lines += _published(summary)
    memory = ", ".join(summary.memory_kinds)
    for name, title, spec in (
        (THROUGHPUT, "Training throughput (tokens/s)", ",.0f"),
        (MEMORY, f"Peak memory (MiB, {memory})", ",.0f"),
    ):
        lines += ["", f"## {title}", ""]
        lines += _table(summary, name, lambda s, spec=spec: _cell(s, spec), average=False)
    notes = _notes(summary)
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def format_csv(summary: Summary) -> str:
    """Every cell of every table in long form, one row per (attention, task, metric): for
    plotting or a spreadsheet. `mixed`, `duplicate_seeds` and `generated_runs` (how many of the
    cell's runs trained on a generated set) are the †, ‡ and § of the markdown."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["attention", "task", "metric", "mean", "std", "n", "mixed", "duplicate_seeds",
         "generated_runs"]
    )  # fmt: skip
    for name, stats in summary.tables.items():
        for attn in summary.attns:
            for task in summary.tasks:
                stat = stats.get((attn, task))
                if stat is None:
                    continue
                group = summary.groups[attn, task]
                std = "" if stat.std is None else f"{stat.std:.6g}"
                writer.writerow(
                    [attn, task, name, f"{stat.mean:.6g}", std, stat.n,
                     int(bool(group.differing)), int(bool(group.duplicate_seeds)),
                     len(group.generated)]
                )  # fmt: skip
    return out.getvalue()


def format_latex(summary: Summary, metric: str = "test_acc") -> str:
    """The `metric` table as a LaTeX tabular (booktabs): mean ± std in percent, the best mean of
    each column in bold, †, ‡ and § as in the markdown (whose notes say why), Avg as there ("--"
    where a row lacks a task)."""
    stats = summary.tables[metric]
    present = _present_tasks(summary, stats)
    averages = {
        attn: _average(stats, attn, present)
        for attn in summary.attns
        if present and all((attn, t) in stats for t in present)
    }
    best = {t: max(stats[a, t].mean for a in summary.attns if (a, t) in stats) for t in present}
    best_avg = max(averages.values(), default=None)

    def cell(mean: float, std: float | None, top: float | None) -> str:
        text = f"{mean:.2f}" + (f" $\\pm$ {std:.2f}" if std is not None else "")
        return f"\\textbf{{{text}}}" if top is not None and math.isclose(mean, top) else text

    def escape(text: str) -> str:
        return text.replace("_", "\\_").replace("&", "\\&").replace("%", "\\%")

    lines = [
        f"% {ACCURACY_TITLES[metric]}; mean $\\pm$ sample std over seeds "
        "(python -m mra_lra.bench.report)",
        "\\begin{tabular}{l" + "c" * (len(present) + 1) + "}",
        "\\toprule",
        " & ".join(["Attention", *(TASKS[t] for t in present), "Avg"]) + " \\\\",
        "\\midrule",
    ]
    for attn in summary.attns:
        cells = [escape(attn)]
        for task in present:
            stat = stats.get((attn, task))
            group = summary.groups.get((attn, task))
            marks = "".join(
                mark for mark, on in (("\\dagger", group and group.differing),
                                      ("\\ddagger", group and group.duplicate_seeds),
                                      ("\\S", group and group.generated)) if on
            )  # fmt: skip
            text = cell(stat.mean, stat.std, best[task]) if stat else "--"
            cells.append(text + (f"$^{{{marks}}}$" if stat and marks else ""))
        cells.append(cell(averages[attn], None, best_avg) if attn in averages else "--")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _cell(stat: Stat, spec: str) -> str:
    if stat.std is None:
        return f"{stat.mean:{spec}} ({stat.n})"
    return f"{stat.mean:{spec}} ± {stat.std:{spec}} ({stat.n})"


def _marks(group: Group | None) -> str:
    if group is None:
        return ""
    return (
        (MIXED if group.differing else "")
        + (DUPLICATE if group.duplicate_seeds else "")
        + (GENERATED if group.generated else "")
    )


def _table(summary: Summary, name: str, fmt: Callable[[Stat], str], average: bool) -> list[str]:
    stats = summary.tables[name]
    header = ["attention", *(TASKS[t] for t in summary.tasks)] + (["Avg"] if average else [])
    present = _present_tasks(summary, stats)
    rows = []
    for attn in summary.attns:
        row = [attn]
        for task in summary.tasks:
            stat = stats.get((attn, task))
            marks = _marks(summary.groups.get((attn, task)))
            row.append((fmt(stat) if stat else "—") + (f" {marks}" if marks else ""))
        if average:
            missing = [TASKS[t] for t in present if (attn, t) not in stats]
            if len(missing) == len(present):
                row.append("—")
            elif missing:
                row.append(f"— (no {', '.join(missing)})")
            else:
                row.append(f"{_average(stats, attn, present):.2f}")
        rows.append(row)
    return _markdown_table(header, rows)


def _present_tasks(summary: Summary, stats: dict[tuple[str, str], Stat]) -> list[str]:
    """The tasks some row has in this table: a row missing one of them gets no average."""
    return [t for t in summary.tasks if any(cell[1] == t for cell in stats)]


def _average(stats: dict[tuple[str, str], Stat], attn: str, tasks: list[str]) -> float:
    """A row's Avg, as in the LRA paper: the mean of its task means."""
    return statistics.fmean(stats[attn, t].mean for t in tasks)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in rows
    ]


def _published(summary: Summary) -> list[str]:
    """The LRA paper's accuracies for the attentions and tasks of this report, if any."""
    # Each row's attention as its runs name it (a row may add its recipe family to the name).
    in_rows = (
        summary.groups[row, t].runs[0].attn
        for row in summary.attns
        for t in summary.tasks
        if (row, t) in summary.groups
    )
    attns = [a for a in dict.fromkeys(in_rows) if a in PUBLISHED]
    tasks = [t for t in summary.tasks if t in PUBLISHED_TASKS]
    if not attns or not tasks:
        return []
    rows = [
        [f"{attn} ({PUBLISHED[attn][0]})"]
        + [f"{PUBLISHED[attn][1][PUBLISHED_TASKS.index(t)]:.2f}" for t in tasks]
        + [f"{statistics.fmean(PUBLISHED[attn][1]):.2f}"]
        for attn in attns
    ]
    return [
        "",
        "## Published test accuracy (%): LRA paper (Tay et al. 2021), Table 1",
        "",
        "Their models, recipes (the original LRA code) and data (the LRA release), for comparison;",
        "Avg is theirs, over their five tasks."
        + (
            f" Cells marked {GENERATED} above are on generated data, not the release."
            if any(g.generated for g in summary.groups.values())
            else ""
        ),
        "",
        *_markdown_table(["attention", *(TASKS[t] for t in tasks), "Avg (5 tasks)"], rows),
    ]


def _seeds(seeds: list[int]) -> str:
    counts = Counter(seeds)
    listed = ", ".join(f"{s} ×{n}" if n > 1 else str(s) for s, n in sorted(counts.items()))
    return ("seed " if len(counts) == 1 else "seeds ") + listed


def _notes(summary: Summary) -> list[str]:
    notes = []
    cells = [
        summary.groups[a, t]
        for a in summary.attns
        for t in summary.tasks
        if (a, t) in summary.groups
    ]
    for group in cells:
        where = f"{group.attn} / {TASKS[group.task]}"
        if group.differing:
            diffs = "; ".join(
                f"`{key}` = "
                + " vs ".join(f"{value} ({_seeds(seeds)})" for value, seeds in values.items())
                for key, values in group.differing.items()
            )
            notes.append(f"- {MIXED} {where}: runs differ in more than the seed: {diffs}.")
        for seed, paths in group.duplicate_seeds.items():
            notes.append(
                f"- {DUPLICATE} {where}: seed {seed} appears {len(paths)} times (all counted): "
                + ", ".join(f"`{p}`" for p in paths)
                + "."
            )
        if group.generated:
            settings = dict.fromkeys(
                json.dumps(r.results["data_generated"], sort_keys=True) for r in group.generated
            )
            notes.append(
                f"- {GENERATED} {where}: {len(group.generated)} of {_runs(len(group.runs))} "
                "trained and tested on a set generated by our reimplementation of the task's "
                "generator (no LRA release was found), so its accuracy is not comparable with "
                "numbers on the release, such as the published ones; generator settings: "
                + "; ".join(f"`{x}`" for x in settings)
                + "."
            )
        if group.without_config:
            notes.append(
                f"- {where}: settings compared on results.json fields "
                f"({', '.join(FALLBACK_FIELDS + OUTCOME_FIELDS)}) only, as "
                + ", ".join(f"`{r.path}` has {r.config_problem}" for r in group.without_config)
                + "."
            )
    for name, left in summary.left_out.items():
        by_reason: dict[str, list[Path]] = {}
        for item in left:
            by_reason.setdefault(item.reason, []).append(item.path)
        for reason, paths in by_reason.items():
            listed = ", ".join(f"`{p}`" for p in paths)
            notes.append(f"- Left out of the {name} table, as {reason}: {listed}.")
    for item in summary.skipped:
        notes.append(f"- Skipped: `{item.path}`: {item.reason}.")
    return notes


def plot(summary: Summary, path: str | Path, metric: str = "test_acc") -> None:
    """Accuracy against training throughput: one labelled point per attention and task
    (marker shape = task), error bars = std over seeds. Written atomically as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import FuncFormatter
    except ImportError as error:
        raise ReportError("--plot needs matplotlib: pip install matplotlib") from error
    if metric not in summary.metrics:
        raise ReportError(f"{metric} is not among the summarised metrics {summary.metrics}")
    acc, speed = summary.tables[metric], summary.tables[THROUGHPUT]
    cells = [
        (a, t) for a in summary.attns for t in summary.tasks if (a, t) in acc and (a, t) in speed
    ]
    if not cells:
        raise ReportError(f"nothing to plot: no cell has both {metric} and {THROUGHPUT}")
    markers = dict(zip(summary.tasks, "osD^vP", strict=False))
    colors = plt.get_cmap("tab10" if len(summary.attns) <= 10 else "tab20")
    color = {a: colors(i) for i, a in enumerate(summary.attns)}
    fig, ax = plt.subplots(figsize=(7, 5))
    for attn, task in cells:
        x, y = speed[attn, task].mean, acc[attn, task]
        ax.errorbar(
            x, y.mean, yerr=y.std or 0, fmt=markers[task], color=color[attn], capsize=3, ms=7
        )
        ax.annotate(attn, (x, y.mean), xytext=(5, 4), textcoords="offset points", fontsize=8)
    xs = [speed[cell].mean for cell in cells]
    # Speeds across tasks and attentions span decades; within one decade a log axis has no ticks.
    ax.set(
        xscale="log" if max(xs) > 10 * min(xs) else "linear",
        xlabel="training throughput (tokens/s, mean over seeds)",
        ylabel=f"{ACCURACY_TITLES[metric]}",
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
        description="LRA results table (attention x task, mean ± std over seeds) from run folders.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run folders or multirun folders")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--plot", type=Path, default=None, help="accuracy vs tokens/s PNG")
    p.add_argument("--csv", type=Path, default=None, help="every cell in long form")
    p.add_argument("--latex", type=Path, default=None, help="the --metric table as a tabular")
    p.add_argument(
        "--metric",
        default="test_acc",
        choices=list(ACCURACY_TITLES),
        help="accuracy for the plot (val_acc_best also adds its table)",
    )
    return p.parse_args(argv)


# Files of a run folder that a report output must never replace.
_RUN_FILES = ("results.json", "config.yaml", "train.log", "metrics.csv")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = ("test_acc", "test_acc_last")
    if args.metric not in metrics:
        metrics += (args.metric,)
    try:
        for path in (args.out, args.plot, args.csv, args.latex):
            if path is not None and (
                path.name in _RUN_FILES or path.suffix == ".ckpt" or path.is_dir()
            ):
                raise ReportError(
                    f"{path} is a run's file or a folder; write the report to a new file, e.g. "
                    f"{path.parent / 'report.md'}"
                )
        summary = summarise(collect_runs(args.paths), metrics)
        text = format_markdown(summary)
        print(text, end="", flush=True)
        for path in (args.out, args.plot, args.csv, args.latex):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        for path, make in (
            (args.out, lambda: text),
            (args.csv, lambda: format_csv(summary)),
            (args.latex, lambda: format_latex(summary, args.metric)),
        ):
            if path:
                atomic_write_text(path, make())
                print(f"wrote {path}", file=sys.stderr)
        if args.plot:
            plot(summary, args.plot, args.metric)
            print(f"wrote {args.plot}", file=sys.stderr)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
