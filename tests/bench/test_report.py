"""The results report against tables computed by hand from hand-made run folders."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mra_lra.bench.report import (
    collect_runs,
    format_latex,
    format_markdown,
    main,
    plot,
    summarise,
)
from mra_lra.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def write_run(
    folder: Path,
    task: str,
    attn: str,
    seed: int,
    test_acc: float | None,
    test_acc_last: float | None,
    tokens_per_second: float = 1000.0,
    memory_mb: float = 100.0,
    config: dict | None = None,
    with_config: bool = True,
    debug: str | None = None,
    **results,
) -> Path:
    """A run folder as train.py leaves it: results.json, the resolved config.yaml and the
    command line's overrides (.hydra/overrides.yaml, with debug=<debug> when given).

    The config varies with the seed in exactly the keys the report must ignore (output paths,
    the data folder, the loader's workers, the wandb run name)."""
    folder.mkdir(parents=True)
    record = {
        "task": task,
        "attn": attn,
        "attn_options": {"block_per_row": 8} if attn.startswith("mra") else {"dropout": 0.1},
        "seed": seed,
        "max_length": 2048,
        "test_acc": test_acc,
        "test_acc_last": test_acc_last,
        "val_acc_best": test_acc,
        "majority_class_test_acc": 0.17,
        "best_step": 4000,
        "steps": 5000,
        "wall_seconds": 60.0,
        "train_tokens_per_second": tokens_per_second,
        "peak_memory_mb": memory_mb,
        "peak_memory_kind": "cpu_max_rss",
        "params": 123,
        "device": "cpu",
        "torch": "2.13.0+cpu",
        "precision": "32-true",
        **results,
    }
    (folder / "results.json").write_text(json.dumps(record))
    if with_config:
        resolved = {
            "seed": seed,
            "paths": {"log_dir": "runs", "output_dir": str(folder)},
            "attn": {"name": attn, **record["attn_options"]},
            "model": {"d_model": 64, "attn": {"name": attn, **record["attn_options"]}},
            "data": {"data_dir": f"/data/copy{seed}", "max_length": 2048, "num_workers": seed},
            "trainer": {"max_steps": 5000, "precision": "32-true", "default_root_dir": str(folder)},
            "callbacks": {"best_checkpoint": {"dirpath": str(folder / "checkpoints")}},
            "logger": {"wandb": {"name": f"{task}_{attn}_s{seed}"}},
            "task": {"name": task},
        }
        for key, value in (config or {}).items():
            node = resolved
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        (folder / "config.yaml").write_text(yaml.safe_dump(resolved))
    (folder / ".hydra").mkdir()
    overrides = [f"task={task}", f"attn={attn}", f"seed={seed}"]
    overrides += [f"debug={debug}"] if debug else ["debug=null"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return folder


BEST = "Test accuracy (%) at the best-validation checkpoint"

# 2 attentions x 2 tasks x 3 seeds (accuracies as fractions, as train.py writes them):
# (attn, task): (test_acc, test_acc_last, tokens/s, peak memory MiB), each over seeds 0, 1, 2.
SEEDS = {
    ("softmax", "listops"): ((0.36, 0.37, 0.38), (0.30,) * 3, (1000, 1100, 1200), (100,) * 3),
    ("softmax", "image"): ((0.40, 0.42, 0.44), (0.40, 0.41, 0.42), (2000,) * 3, (200, 210, 220)),
    ("mra", "listops"): ((0.37, 0.38, 0.42), (0.35, 0.37, 0.39), (3000, 3300, 3600), (50,) * 3),
    ("mra", "image"): ((0.41, 0.41, 0.44), (0.40, 0.40, 0.40), (5000, 5000, 5300), (80, 90, 100)),
}

# By hand (sample std: sqrt(sum of squared deviations / (n - 1)), n = 3):
#   softmax/listops test 36, 37, 38: mean 37, deviations -1, 0, 1 -> std sqrt(2/2) = 1
#   softmax/image   test 40, 42, 44: mean 42, deviations -2, 0, 2 -> std sqrt(8/2) = 2
#   mra/listops     test 37, 38, 42: mean 39, deviations -2, -1, 3 -> std sqrt(14/2) = 2.6458
#   mra/image       test 41, 41, 44: mean 42, deviations -1, -1, 2 -> std sqrt(6/2) = 1.7321
#   Avg: softmax (37 + 42) / 2 = 39.5; mra (39 + 42) / 2 = 40.5
#   last: softmax/listops 30 x3 -> 30 ± 0; softmax/image 40, 41, 42 -> 41 ± 1;
#         mra/listops 35, 37, 39 -> 37 ± 2; mra/image 40 x3 -> 40 ± 0;
#         Avg softmax (30 + 41) / 2 = 35.5; mra (37 + 40) / 2 = 38.5
#   tokens/s: 1000, 1100, 1200 -> 1100 ± 100; 2000 x3 -> 2000 ± 0;
#             3000, 3300, 3600 -> 3300 ± 300; 5000, 5000, 5300 -> 5100 ± sqrt(60000/2) = 173.2
#   memory: 100 ± 0; 200, 210, 220 -> 210 ± 10; 50 ± 0; 80, 90, 100 -> 90 ± 10
EXPECTED = {  # table title -> {row: cells}
    BEST: {
        "softmax": ["37.00 ± 1.00 (3)", "42.00 ± 2.00 (3)", "39.50"],
        "mra": ["39.00 ± 2.65 (3)", "42.00 ± 1.73 (3)", "40.50"],
    },
    "Test accuracy (%) at the last step": {
        "softmax": ["30.00 ± 0.00 (3)", "41.00 ± 1.00 (3)", "35.50"],
        "mra": ["37.00 ± 2.00 (3)", "40.00 ± 0.00 (3)", "38.50"],
    },
    "Published test accuracy (%): LRA paper (Tay et al. 2021), Table 1": {
        "softmax (Transformer)": ["36.37", "42.44", "54.39"],
    },
    "Training throughput (tokens/s)": {
        "softmax": ["1,100 ± 100 (3)", "2,000 ± 0 (3)"],
        "mra": ["3,300 ± 300 (3)", "5,100 ± 173 (3)"],
    },
    "Peak memory (MiB, cpu_max_rss)": {
        "softmax": ["100 ± 0 (3)", "210 ± 10 (3)"],
        "mra": ["50 ± 0 (3)", "90 ± 10 (3)"],
    },
}


def write_grid(root: Path) -> Path:
    """ListOps as one Hydra multirun (numbered subfolders), Image as separate dated run folders.

    Image is written first so that the column order cannot come from the order on disk."""
    job = 0
    for (attn, task), columns in reversed(SEEDS.items()):
        for seed, (acc, last, tps, mem) in enumerate(zip(*columns, strict=True)):
            if task == "listops":
                folder = root / "multirun" / "2026-11-28" / "12-00-00_listops_mra" / str(job)
                job += 1
            else:
                folder = root / "runs" / f"12-0{seed}-00_{task}_{attn}"
            write_run(folder, task, attn, seed, acc, last, tps, mem)
    multirun = root / "multirun" / "2026-11-28" / "12-00-00_listops_mra"
    # What Hydra leaves besides the jobs: the unresolved config, which the report must not read.
    (multirun / "multirun.yaml").write_text("seed: ${oc.env:NOPE}\n")
    (multirun / "0" / ".hydra" / "config.yaml").write_text("data: {max_length: 1}\n")
    return root


def report(*paths: Path, metrics=("test_acc", "test_acc_last"), **kwargs) -> str:
    return format_markdown(summarise(collect_runs(paths, **kwargs), metrics))


def table_rows(markdown: str, title: str) -> dict[str, list[str]]:
    """{first cell: [other cells...]} of the table under `## title`."""
    after = markdown.split(f"## {title}\n\n", 1)[1]
    section = next(part for part in after.split("\n\n") if part.startswith("|"))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]
    return {row[0]: row[1:] for row in rows}


def notes(markdown: str) -> list[str]:
    return markdown.split("## Notes\n\n", 1)[1].splitlines() if "## Notes" in markdown else []


def skipped(markdown: str) -> dict[str, str]:
    """{folder: the reason it was skipped} from the notes."""
    out = {}
    for line in notes(markdown):
        if line.startswith("- Skipped, as "):
            reason, paths = line.removeprefix("- Skipped, as ").rsplit(": `", 1)
            for path in ("`" + paths).rstrip(".").split(", "):
                out[path.strip("`")] = reason
    return out


def test_table_matches_hand_computed(tmp_path):
    root = write_grid(tmp_path)
    markdown = report(root / "multirun", root / "runs")
    assert {title: table_rows(markdown, title) for title in EXPECTED} == EXPECTED
    assert "12 runs in 4 groups, 0 skipped." in markdown
    assert "## Notes" not in markdown


def test_one_row_per_run(tmp_path):
    root = write_grid(tmp_path)
    runs = table_rows(report(root), "Runs")
    assert len(runs) == 12
    # run, task, attention, seed, length, steps, test, last, tokens/s, memory
    assert runs["runs/12-02-00_image_mra"] == [
        "Image", "mra", "2", "2048", "5000", "44.00", "40.00", "5,300", "100",
    ]  # fmt: skip


def test_published_rows_only_for_attentions_and_tasks_of_the_report(tmp_path):
    for i, (attn, task) in enumerate(
        [("mra", "text"), ("performer", "text"), ("bigbird", "pathx"), ("softmax", "text"),
         ("linear", "text")]
    ):  # fmt: skip
        write_run(tmp_path / str(i), task, attn, 0, 0.5, 0.5)
    # The table follows the section's one-paragraph preamble.
    section = report(tmp_path).split("Table 1\n\n", 1)[1].split("\n\n", 2)[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()]
    assert cells[0] == ["attention", "Text", "Avg (5 tasks)"]
    rows = {row[0]: row[1:] for row in cells[2:]}
    assert rows == {
        "softmax (Transformer)": ["64.27", "54.39"],
        "performer (Performer)": ["65.40", "51.41"],
        "bigbird (BigBird)": ["64.02", "55.01"],
        "linear (Linear Trans.)": ["65.90", "50.55"],  # 252.76 / 5
    }
    write_run(tmp_path / "only_mra" / "r", "listops", "mra", 0, 0.5, 0.5)
    assert "Published" not in report(tmp_path / "only_mra")


def test_overlapping_paths_count_each_run_once(tmp_path):
    root = write_grid(tmp_path)
    job = root / "multirun" / "2026-11-28" / "12-00-00_listops_mra" / "0"
    assert report(root, job / ".." / "0", root / "runs") == report(root)


def test_rows_softmax_mra_mra_s_then_alphabetical(tmp_path):
    for i, attn in enumerate(["yoso", "linformer", "mra_s", "bigbird", "mra", "softmax"]):
        write_run(tmp_path / str(i), "listops", attn, 0, 0.5, 0.5)
    rows = table_rows(report(tmp_path), BEST)
    assert list(rows) == ["softmax", "mra", "mra_s", "bigbird", "linformer", "yoso"]


def test_recipe_families_get_their_own_rows(tmp_path):
    """make reproduce writes both families under runs/reproduce: the original LRA recipe's runs
    (recipe.family lra_jax) are rows of their own, after the default recipe's."""
    jax = {"recipe": {"family": "lra_jax", "attention_dropout": 0.1}}
    for seed in (0, 1):
        write_run(tmp_path / f"mra{seed}", "listops", "mra", seed, 0.5, 0.5)
        write_run(tmp_path / f"soft{seed}", "listops", "softmax", seed, 0.4, 0.4)
        write_run(
            tmp_path / f"jsoft{seed}", "listops", "softmax", seed, 0.6, 0.6, config=jax,
            recipe="lra_jax",
        )  # fmt: skip
    # an older results.json without the field: the family comes from config.yaml
    write_run(tmp_path / "jmra0", "listops", "mra", 0, 0.7, 0.7, config=jax)
    write_run(tmp_path / "jmra1", "listops", "mra", 1, 0.7, 0.7, config=jax, recipe="lra_jax")
    rows = table_rows(report(tmp_path), BEST)
    assert list(rows) == ["softmax", "mra", "softmax (lra_jax)", "mra (lra_jax)"]
    assert rows["mra (lra_jax)"][0] == "70.00 ± 0.00 (2)"
    assert rows["softmax"][0] == "40.00 ± 0.00 (2)"


def test_columns_in_paper_order(tmp_path):
    for i, task in enumerate(["pathx", "image", "text", "pathfinder", "retrieval", "listops"]):
        write_run(tmp_path / str(i), task, "softmax", 0, 0.5, 0.5)
    header = report(tmp_path).split(f"## {BEST}\n\n")[1].splitlines()[0]
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == [
        "attention", "ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Path-X", "Avg",
    ]  # fmt: skip


def test_differing_settings_are_separate_rows_named_by_the_difference(tmp_path):
    # seeds 0, 3 share a setting; 1 and 2 each have their own.
    for seed, (length, blocks) in enumerate([(2048, 8), (2048, 4), (1024, 8), (2048, 8)]):
        # model.attn is Hydra's copy of attn: the difference is named once, under attn.
        config = {
            "data.max_length": length,
            "attn.block_per_row": blocks,
            "model.attn.block_per_row": blocks,
        }
        acc = 0.6 + seed / 100
        write_run(tmp_path / f"s{seed}", "text", "mra", seed, acc, acc, config=config)
    rows = table_rows(report(tmp_path), BEST)
    # A row names where it departs from the setting most runs share: seeds 0 and 3 (60, 63).
    assert rows == {
        "mra": ["61.50 ± 2.12 (2)", "61.50"],
        "mra [attn.block_per_row=4]": ["61.00 (1)", "61.00"],
        "mra [data.max_length=1024]": ["62.00 (1)", "62.00"],
    }


def test_seed_paths_and_logger_differences_are_one_group(tmp_path):
    # write_run already varies seed, output dirs, data_dir, num_workers and the wandb name.
    for seed in range(3):
        write_run(tmp_path / f"s{seed}", "text", "mra", seed, 0.6, 0.6)
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST) == {"mra": ["60.00 ± 0.00 (3)", "60.00"]}
    assert "## Notes" not in markdown


def test_without_config_results_fields_are_compared(tmp_path):
    write_run(tmp_path / "a", "listops", "mra", 0, 0.4, 0.4, with_config=False)
    write_run(tmp_path / "b", "listops", "mra", 1, 0.4, 0.4)  # same attn_options, own config
    write_run(
        tmp_path / "c", "listops", "mra", 2, 0.5, 0.5, attn_options={"block_per_row": 4}
    )  # has a config.yaml, but a run of its cell does not: all are compared on results.json
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST) == {
        "mra": ["40.00 ± 0.00 (2)", "40.00"],
        "mra [attn_options.block_per_row=4]": ["50.00 (1)", "50.00"],
    }
    assert f"as `{tmp_path / 'a'}` has no config.yaml" in "\n".join(notes(markdown))


def test_steps_device_and_world_size_split_groups(tmp_path):
    write_run(tmp_path / "a", "listops", "softmax", 0, 0.4, 0.4, device="H100", world_size=4)
    write_run(tmp_path / "b", "listops", "softmax", 1, 0.4, 0.4, device="H100", world_size=1)
    write_run(tmp_path / "c", "listops", "softmax", 2, 0.4, 0.4, steps=1200)
    write_run(tmp_path / "d", "listops", "softmax", 3, 0.4, 0.4)  # absent world_size: one
    markdown = report(tmp_path)
    assert "Devices: H100 (1 run), H100 ×4 (1 run), cpu (2 runs)." in markdown
    rows = table_rows(markdown, BEST)
    # Two runs on each device: no majority, so every row names its device.
    assert sorted(rows) == [
        'softmax [device="H100", world_size=4]',
        'softmax [device="H100"]',
        'softmax [device="cpu", steps=1200]',
        'softmax [device="cpu"]',
    ]


def test_generated_data_marked_and_apart_from_the_release(tmp_path):
    gen = {"preset": "pathfinder32", "num_images": 200000, "seed": 0}
    for seed in (0, 1):
        write_run(tmp_path / f"g{seed}", "pathfinder", "mra", seed, 0.7, 0.7, data_generated=gen)
    write_run(tmp_path / "r0", "pathfinder", "softmax", 0, 0.6, 0.6, data_generated=None)
    write_run(tmp_path / "r1", "pathfinder", "softmax", 1, 0.5, 0.5, data_generated=gen)
    write_run(tmp_path / "old", "listops", "mra", 0, 0.4, 0.4)  # before data_generated existed
    markdown = report(tmp_path)
    rows = table_rows(markdown, BEST)
    setting = json.dumps(gen, sort_keys=True)
    assert rows["mra"] == ["40.00 (1)", "70.00 ± 0.00 (2) §", "55.00"]
    assert rows[f"softmax [data_generated={setting}]"] == ["—", "50.00 (1) §", "— (no ListOps)"]
    assert rows["softmax [data_generated=null]"] == ["—", "60.00 (1)", "— (no ListOps)"]
    assert "Cells marked § above are on generated data, not the release." in markdown
    (line,) = [n for n in notes(markdown) if n.startswith("- §")]
    assert "mra / Pathfinder" in line and f"softmax [data_generated={setting}]" in line
    assert setting in line.rsplit("generator settings", 1)[1]


def test_avg_blank_for_row_missing_a_task(tmp_path):
    # softmax: ListOps 40, Image 50 -> Avg 45; linformer has ListOps only -> no Avg.
    write_run(tmp_path / "a", "listops", "softmax", 0, 0.40, 0.40)
    write_run(tmp_path / "b", "image", "softmax", 0, 0.50, 0.50)
    write_run(tmp_path / "c", "listops", "linformer", 0, 0.30, 0.30)
    rows = table_rows(report(tmp_path), BEST)
    assert rows["softmax"] == ["40.00 (1)", "50.00 (1)", "45.00"]
    assert rows["linformer"] == ["30.00 (1)", "—", "— (no Image)"]


def test_row_without_values_gets_no_average(tmp_path):
    write_run(tmp_path / "a", "listops", "softmax", 0, 0.40, 0.40)
    write_run(tmp_path / "b", "listops", "mra", 0, None, 0.50)
    rows = table_rows(report(tmp_path), BEST)
    assert rows == {"softmax": ["40.00 (1)", "40.00"], "mra": ["—", "—"]}


def test_duplicate_seed_flagged_and_counted(tmp_path):
    # seed 0 twice (40, 44) and seed 1 (42): mean 42, deviations -2, 2, 0 -> std 2
    write_run(tmp_path / "a", "listops", "mra", 0, 0.40, 0.40)
    write_run(tmp_path / "b", "listops", "mra", 0, 0.44, 0.44)
    write_run(tmp_path / "c", "listops", "mra", 1, 0.42, 0.42)
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST)["mra"] == ["42.00 ± 2.00 (3) ‡", "42.00"]
    (line,) = notes(markdown)
    assert line.startswith("- ‡ mra / ListOps: seed 0 appears 2 times")
    assert f"`{tmp_path / 'a'}`, `{tmp_path / 'b'}`" in line


def test_unreadable_and_unknown_runs_listed_never_dropped(tmp_path):
    write_run(tmp_path / "good", "listops", "mra", 0, 0.40, 0.40)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text('{"task": "listops", "attn"')
    write_run(tmp_path / "cifar", "cifar", "mra", 0, 0.5, 0.5)
    write_run(tmp_path / "noseed", "listops", "mra", None, 0.5, 0.5)
    write_run(tmp_path / "notest", "listops", "mra", 1, None, 0.44)
    write_run(tmp_path / "percent", "listops", "mra", 2, 41.0, 0.42)
    markdown = report(tmp_path)
    # test_acc: only `good` (40); test_acc_last: good, notest, percent = 40, 44, 42 -> 42 ± 2
    assert table_rows(markdown, BEST)["mra"] == ["40.00 (1)", "40.00"]
    last = table_rows(markdown, "Test accuracy (%) at the last step")
    assert last["mra"] == ["42.00 ± 2.00 (3)", "42.00"]
    assert "3 runs in 1 group, 3 skipped." in markdown
    lines = notes(markdown)
    assert "- Left out of the test_acc table, as test_acc is null (" in lines[0]
    assert lines[0].endswith(f"`{tmp_path / 'notest'}`.")
    assert "not a fraction in [0, 1]" in lines[1] and str(tmp_path / "percent") in lines[1]
    reasons = skipped(markdown)
    assert reasons[str(tmp_path / "broken")].startswith("unreadable results.json")
    assert "TASKS in mra_lra.bench.report" in reasons[str(tmp_path / "cifar")]
    assert "`seed`" in reasons[str(tmp_path / "noseed")]


def test_failed_starts_are_named_and_logger_folders_are_no_runs(tmp_path):
    good = write_run(tmp_path / "good", "listops", "mra", 0, 0.40, 0.40)
    # wandb keeps a config.yaml of its own inside the run folder: not a run
    (good / "wandb" / "offline-run-1" / "files").mkdir(parents=True)
    (good / "wandb" / "offline-run-1" / "files" / "config.yaml").write_text("a: 1\n")
    started = tmp_path / "started"  # config.yaml written, then the process died
    started.mkdir()
    (started / "config.yaml").write_text("seed: 0\n")
    crashed = tmp_path / "sweep" / "3"  # a sweep trial whose error went to its train.log
    crashed.mkdir(parents=True)
    (crashed / "train.log").write_text(
        "[2026-11-28 12:00:00,000][train][INFO] - protocol card\n"
        "[2026-11-28 12:00:01,000][train][ERROR] - this trial failed\n"
        "Traceback (most recent call last):\n"
        '  File "train.py", line 1, in <module>\n'
        "ValueError: scheduler.warmup_steps must be >= 0, got -1\n"
    )
    markdown = report(tmp_path)
    assert "1 run in 1 group, 2 skipped." in markdown
    reasons = skipped(markdown)
    assert set(reasons) == {str(started), str(crashed)}
    assert reasons[str(started)].startswith("no results.json")
    assert "ValueError: scheduler.warmup_steps must be >= 0" in reasons[str(crashed)]


def test_debug_runs_kept_apart_unless_asked(tmp_path):
    write_run(tmp_path / "real", "listops", "mra", 0, 0.40, 0.40)
    write_run(tmp_path / "dbg", "listops", "mra", 1, 0.10, 0.10, debug="fdr", steps=1)
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST) == {"mra": ["40.00 (1)", "40.00"]}
    assert "debug=fdr" in skipped(markdown)[str(tmp_path / "dbg")]
    rows = table_rows(report(tmp_path, with_debug=True), BEST)
    assert rows == {
        "mra [steps=1]": ["10.00 (1)", "10.00"],
        "mra [steps=5000]": ["40.00 (1)", "40.00"],
    }


def test_include_and_exclude_globs(tmp_path):
    for seed, name in enumerate(["reproduce/a", "reproduce/b", "scratch/c"]):
        write_run(tmp_path / name, "listops", "mra", seed, 0.4, 0.4)
    markdown = report(tmp_path, include=["*/reproduce/*"], exclude=["*/b"])
    assert table_rows(markdown, BEST) == {"mra": ["40.00 (1)", "40.00"]}
    reasons = skipped(markdown)
    assert "--exclude */b" in reasons[str(tmp_path / "reproduce" / "b")]
    assert "--include" in reasons[str(tmp_path / "scratch" / "c")]


def test_a_mixed_folder_is_never_pooled(tmp_path):
    """The issue's folder: a demo, two sweep trials, a DDP run and a debug run, all ListOps
    with MRA, next to three seeds of the recipe."""
    for seed in range(3):
        write_run(tmp_path / "reproduce" / str(seed), "listops", "mra", seed, 0.38, 0.38)
    demo = {"data.max_length": 128, "data.num_train": 10000, "trainer.max_steps": 1500}
    write_run(tmp_path / "demo", "listops", "mra", 42, 0.5, 0.5, config=demo, steps=1500)
    for k, lr in enumerate((1e-4, 3e-4)):
        config = {"optimizer": {"lr": lr}}
        write_run(tmp_path / "sweep" / str(k), "listops", "mra", 42, 0.3, 0.3, config=config)
    write_run(tmp_path / "ddp", "listops", "mra", 0, 0.37, 0.37, world_size=2)
    write_run(tmp_path / "debug", "listops", "mra", 42, 0.1, 0.1, debug="limit", steps=1)
    markdown = report(tmp_path)
    rows = table_rows(markdown, BEST)
    assert rows == {
        "mra": ["38.00 ± 0.00 (3)", "38.00"],
        "mra [optimizer.lr=0.0001]": ["30.00 (1)", "30.00"],
        "mra [optimizer.lr=0.0003]": ["30.00 (1)", "30.00"],
        "mra [steps=1500, data.max_length=128, data.num_train=10000, …]": ["50.00 (1)", "50.00"],
        "mra [world_size=2]": ["37.00 (1)", "37.00"],
    }
    # What the … leaves out is named once, keys only (the CSV has every value).
    (line,) = [n for n in notes(markdown) if "its groups differ in" in n]
    assert "`trainer.max_steps`" in line
    assert "7 runs in 5 groups, 1 skipped." in markdown
    assert "debug=limit" in skipped(markdown)[str(tmp_path / "debug")]
    assert all(len(line) < 400 for line in notes(markdown))


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("[]")
    with pytest.raises(UserError, match="no usable runs.*not a JSON object"):
        summarise(collect_runs([tmp_path]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no run folder under .*empty"):
        collect_runs(p for p in [tmp_path / "empty"])
    (tmp_path / "report.md").write_text("# LRA results\n")
    with pytest.raises(UserError, match="report.md is a file"):
        collect_runs([tmp_path / "report.md"])


def test_cli_writes_markdown_csv_and_png(tmp_path, capsys):
    root = write_grid(tmp_path / "runs")
    out = tmp_path / "out"
    md, png, table = out / "report.md", out / "acc_vs_speed.png", out / "runs.csv"
    main([str(root), "--out", str(md), "--plot", str(png), "--csv", str(table)])
    printed = capsys.readouterr().out
    assert table_rows(printed, BEST) == EXPECTED[BEST] and md.read_text() == printed
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 12
    (row,) = [r for r in rows if r["run"].endswith("12-02-00_image_mra")]
    assert (row["task"], row["attention"], row["seed"], row["test_acc"]) == (
        "image", "mra", "2", "0.44",
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["acc_vs_speed.png", "report.md", "runs.csv"]


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    write_run(tmp_path / "r", "listops", "softmax", 0, 0.40, 0.40)
    cmd = [sys.executable, "-m", "mra_lra.bench.report"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    ok = subprocess.run([*cmd, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "| softmax   | 40.00 (1) | 40.00 |" in ok.stdout
    for args in (
        [str(tmp_path / "nope")],
        [str(tmp_path), "--out", str(tmp_path / "r" / "results.json")],
    ):
        bad = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ")
        assert len(bad.stderr.strip().splitlines()) == 1
    assert json.loads((tmp_path / "r" / "results.json").read_text())["seed"] == 0


def test_plot_needs_a_cell_with_speed(tmp_path):
    write_run(tmp_path / "r", "listops", "softmax", 0, 0.40, 0.40, train_tokens_per_second=None)
    summary = summarise(collect_runs([tmp_path]))
    with pytest.raises(UserError, match="nothing to plot"):
        plot(summary, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_real_configs_of_two_seeds_are_one_group(compose_cfg, tmp_path):
    # train.py's resolved configs for two seeds of one experiment, in separate run folders with
    # separate data folders and wandb names: nothing but ignored keys may differ.
    from omegaconf import OmegaConf

    for seed in (0, 1):
        run_dir = tmp_path / str(seed)
        cfg = compose_cfg(
            ["task=listops", "attn=mra", f"seed={seed}", "logger=wandb"],
            run_dir=run_dir,
            data_dir=tmp_path / f"data{seed}",
        )
        write_run(run_dir, "listops", "mra", seed, 0.4, 0.4, with_config=False)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST) == {"mra": ["40.00 ± 0.00 (2)", "40.00"]}
    assert "## Notes" not in markdown


def test_latex_table(tmp_path):
    root = write_grid(tmp_path / "grid")
    # A second ListOps softmax run with seed 0 again: ‡ on that cell.
    write_run(tmp_path / "grid" / "dup", "listops", "softmax", 0, 0.37, 0.30, 1100.0, 100.0)
    body = format_latex(summarise(collect_runs([root]))).splitlines()
    assert body[1:5] == [
        r"\begin{tabular}{lccc}",
        r"\toprule",
        r"Attention & ListOps & Image & Avg \\",
        r"\midrule",
    ]
    # softmax ListOps: 38, 36, 37 and the duplicate 37 -> mean 37.00, std 0.82
    assert body[5] == (
        r"softmax & 37.00 $\pm$ 0.82$^{\ddagger}$ & \textbf{42.00 $\pm$ 2.00} & 39.50 \\"
    )
    assert body[6] == (
        r"mra & \textbf{39.00 $\pm$ 2.65} & \textbf{42.00 $\pm$ 1.73} & \textbf{40.50} \\"
    )
    assert body[7:] == [r"\bottomrule", r"\end{tabular}"]
