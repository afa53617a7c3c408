"""The results report against tables computed by hand from hand-made run folders."""

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mra_lra.bench.report import (
    collect_runs,
    format_csv,
    format_latex,
    format_markdown,
    main,
    plot,
    summarise,
)

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
    **results,
) -> Path:
    """A run folder as train.py leaves it: results.json and the resolved config.yaml.

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
    return folder


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
EXPECTED = """\
# LRA results

12 runs, 0 skipped. Cells: mean ± sample std (n runs) over seeds. Devices: cpu (12 runs).

## Test accuracy (%) at the best-validation checkpoint

| attention | ListOps          | Image            | Avg   |
|-----------|------------------|------------------|-------|
| softmax   | 37.00 ± 1.00 (3) | 42.00 ± 2.00 (3) | 39.50 |
| mra       | 39.00 ± 2.65 (3) | 42.00 ± 1.73 (3) | 40.50 |

## Test accuracy (%) at the last step

| attention | ListOps          | Image            | Avg   |
|-----------|------------------|------------------|-------|
| softmax   | 30.00 ± 0.00 (3) | 41.00 ± 1.00 (3) | 35.50 |
| mra       | 37.00 ± 2.00 (3) | 40.00 ± 0.00 (3) | 38.50 |

## Published test accuracy (%): LRA paper (Tay et al. 2021), Table 1

Their models, recipes (the original LRA code) and data (the LRA release), for comparison;
Avg is theirs, over their five tasks.

| attention             | ListOps | Image | Avg (5 tasks) |
|-----------------------|---------|-------|---------------|
| softmax (Transformer) | 36.37   | 42.44 | 54.39         |

## Training throughput (tokens/s)

| attention | ListOps         | Image           |
|-----------|-----------------|-----------------|
| softmax   | 1,100 ± 100 (3) | 2,000 ± 0 (3)   |
| mra       | 3,300 ± 300 (3) | 5,100 ± 173 (3) |

## Peak memory (MiB, cpu_max_rss)

| attention | ListOps     | Image        |
|-----------|-------------|--------------|
| softmax   | 100 ± 0 (3) | 210 ± 10 (3) |
| mra       | 50 ± 0 (3)  | 90 ± 10 (3)  |
"""


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
    (multirun / "0" / ".hydra").mkdir()
    (multirun / "0" / ".hydra" / "config.yaml").write_text("data: {max_length: 1}\n")
    return root


def report(*paths: Path, **kwargs) -> str:
    return format_markdown(summarise(collect_runs(paths), **kwargs))


def table_rows(markdown: str, title: str) -> dict[str, list[str]]:
    """{attention: [cells...]} of the table under `## title`."""
    section = markdown.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]
    return {row[0]: row[1:] for row in rows}


def notes(markdown: str) -> list[str]:
    return markdown.split("## Notes\n\n", 1)[1].splitlines() if "## Notes" in markdown else []


BEST = "Test accuracy (%) at the best-validation checkpoint"


def test_table_matches_hand_computed(tmp_path):
    root = write_grid(tmp_path)
    assert report(root / "multirun", root / "runs") == EXPECTED


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
    assert report(root, job / ".." / "0", root / "runs") == EXPECTED


def test_rows_softmax_mra_mra_s_then_alphabetical(tmp_path):
    for i, attn in enumerate(["yoso", "linformer", "mra_s", "bigbird", "mra", "softmax"]):
        write_run(tmp_path / str(i), "listops", attn, 0, 0.5, 0.5)
    rows = table_rows(report(tmp_path), BEST)
    assert list(rows) == ["softmax", "mra", "mra_s", "bigbird", "linformer", "yoso"]


def test_recipe_families_get_their_own_rows(tmp_path):
    """make reproduce writes both families under runs/reproduce: the original LRA recipe's runs
    (recipe.family lra_jax) are rows of their own, after the default recipe's, not mixed cells."""
    jax = {"recipe": {"family": "lra_jax", "attention_dropout": 0.1}}
    for seed in (0, 1):
        write_run(tmp_path / f"mra{seed}", "listops", "mra", seed, 0.5, 0.5)
        write_run(tmp_path / f"soft{seed}", "listops", "softmax", seed, 0.4, 0.4)
        write_run(
            tmp_path / f"jsoft{seed}",
            "listops",
            "softmax",
            seed,
            0.6,
            0.6,
            config=jax,
            recipe="lra_jax",
        )
    # an older results.json without the field: the family comes from config.yaml
    write_run(tmp_path / "jmra0", "listops", "mra", 0, 0.7, 0.7, config=jax)
    write_run(tmp_path / "jmra1", "listops", "mra", 1, 0.7, 0.7, config=jax, recipe="lra_jax")
    text = report(tmp_path)
    rows = table_rows(text, BEST)
    assert list(rows) == ["softmax", "mra", "softmax (lra_jax)", "mra (lra_jax)"]
    assert rows["mra (lra_jax)"][0] == "70.00 ± 0.00 (2)"
    assert rows["softmax"][0] == "40.00 ± 0.00 (2)"
    assert "†" not in text


def test_columns_in_paper_order(tmp_path):
    for i, task in enumerate(["pathx", "image", "text", "pathfinder", "retrieval", "listops"]):
        write_run(tmp_path / str(i), task, "softmax", 0, 0.5, 0.5)
    header = report(tmp_path).split(f"## {BEST}\n\n")[1].splitlines()[0]
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == [
        "attention", "ListOps", "Text", "Retrieval", "Image", "Pathfinder", "Path-X", "Avg",
    ]  # fmt: skip


def test_mixed_settings_flagged_with_keys_and_values(tmp_path):
    for seed, (length, blocks) in enumerate([(2048, 8), (2048, 4), (1024, 8)]):
        # model.attn is Hydra's copy of attn: the difference is named once, under attn.
        config = {
            "data.max_length": length,
            "attn.block_per_row": blocks,
            "model.attn.block_per_row": blocks,
        }
        write_run(tmp_path / f"s{seed}", "text", "mra", seed, 0.6, 0.6, config=config)
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST)["mra"] == ["60.00 ± 0.00 (3) †", "60.00"]
    assert notes(markdown) == [
        "- † mra / Text: runs differ in more than the seed: "
        "`attn.block_per_row` = 8 (seeds 0, 2) vs 4 (seed 1); "
        "`data.max_length` = 2048 (seeds 0, 1) vs 1024 (seed 2)."
    ]


def test_seed_paths_and_logger_differences_are_not_flagged(tmp_path):
    # write_run already varies seed, output dirs, data_dir, num_workers and the wandb name.
    for seed in range(3):
        write_run(tmp_path / f"s{seed}", "text", "mra", seed, 0.6, 0.6)
    markdown = report(tmp_path)
    assert "†" not in markdown and "## Notes" not in markdown


def test_without_config_results_fields_are_compared(tmp_path):
    write_run(tmp_path / "a", "listops", "mra", 0, 0.4, 0.4, with_config=False)
    write_run(
        tmp_path / "b", "listops", "mra", 1, 0.4, 0.4, attn_options={"block_per_row": 4}
    )  # has a config.yaml, but its partner does not: both are compared on results.json
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST)["mra"][0] == "40.00 ± 0.00 (2) †"
    assert notes(markdown) == [
        "- † mra / ListOps: runs differ in more than the seed: "
        "`results.attn_options.block_per_row` = 8 (seed 0) vs 4 (seed 1).",
        "- mra / ListOps: settings compared on results.json fields (attn_options, max_length, "
        f"precision, steps, device, world_size, data_generated) only, as `{tmp_path / 'a'}` has "
        "no config.yaml.",
    ]


def test_steps_and_device_differences_flagged(tmp_path):
    write_run(tmp_path / "a", "listops", "softmax", 0, 0.4, 0.4, device="NVIDIA H100")
    write_run(tmp_path / "b", "listops", "softmax", 1, 0.4, 0.4, steps=1200)
    (line,) = notes(report(tmp_path))
    assert '`results.device` = "NVIDIA H100" (seed 0) vs "cpu" (seed 1)' in line
    assert "`results.steps` = 5000 (seed 0) vs 1200 (seed 1)" in line
    assert "world_size" not in line  # absent (older results.json) means one device


def test_world_size_difference_flagged_and_shown(tmp_path):
    write_run(tmp_path / "a", "listops", "softmax", 0, 0.4, 0.4, world_size=4, device="H100")
    write_run(tmp_path / "b", "listops", "softmax", 1, 0.4, 0.4, world_size=1, device="H100")
    markdown = report(tmp_path)
    assert "Devices: H100 (1 run), H100 ×4 (1 run).\n" in markdown
    assert notes(markdown) == [
        "- † softmax / ListOps: runs differ in more than the seed: "
        "`results.world_size` = 4 (seed 0) vs 1 (seed 1)."
    ]


def test_generated_data_marked_and_mixing_it_with_the_release_flagged(tmp_path):
    gen = {"preset": "pathfinder32", "num_images": 200000, "seed": 0}
    for seed in (0, 1):
        write_run(tmp_path / f"g{seed}", "pathfinder", "mra", seed, 0.7, 0.7, data_generated=gen)
    write_run(tmp_path / "r0", "pathfinder", "softmax", 0, 0.6, 0.6, data_generated=None)
    write_run(tmp_path / "r1", "pathfinder", "softmax", 1, 0.6, 0.6, data_generated=gen)
    write_run(tmp_path / "old", "listops", "mra", 0, 0.4, 0.4)  # before data_generated existed
    summary = summarise(collect_runs([tmp_path]))
    markdown = format_markdown(summary)
    rows = table_rows(markdown, BEST)
    assert rows["mra"] == ["40.00 (1)", "70.00 ± 0.00 (2) §", "55.00"]
    assert rows["softmax"] == ["—", "60.00 ± 0.00 (2) †§", "— (no ListOps)"]
    assert "Cells marked § above are on generated data, not the release." in markdown
    lines = notes(markdown)
    setting = json.dumps(gen, sort_keys=True)
    # Notes follow the rows: softmax first.
    assert lines[0].startswith("- † softmax / Pathfinder: runs differ in more than the seed: ")
    assert f"`results.data_generated` = null (seed 0) vs {setting} (seed 1)" in lines[0]
    assert lines[1].startswith("- § softmax / Pathfinder: 1 of 2 runs trained")
    assert lines[2] == (
        "- § mra / Pathfinder: 2 of 2 runs trained and tested on a set generated by our "
        "reimplementation of the task's generator (no LRA release was found), so its accuracy is "
        "not comparable with numbers on the release, such as the published ones; generator "
        f"settings: `{setting}`."
    )
    assert len(lines) == 3
    table = format_csv(summary)
    cells = {
        (r["attention"], r["task"], r["metric"]): r for r in csv.DictReader(io.StringIO(table))
    }
    assert cells["mra", "pathfinder", "test_acc"]["generated_runs"] == "2"
    assert cells["softmax", "pathfinder", "test_acc"]["generated_runs"] == "1"
    assert cells["mra", "listops", "test_acc"]["generated_runs"] == "0"
    assert r"\S" in format_latex(summary).splitlines()[6]


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
    assert notes(markdown) == [
        f"- ‡ mra / ListOps: seed 0 appears 2 times (all counted): `{tmp_path / 'a'}`, "
        f"`{tmp_path / 'b'}`."
    ]


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
    assert "3 runs, 3 skipped." in markdown
    lines = notes(markdown)
    assert len(lines) == 5
    assert lines[0] == (
        "- Left out of the test_acc table, as test_acc is null (test=false, or no validation "
        f"ran so there was no best checkpoint): `{tmp_path / 'notest'}`."
    )
    assert lines[1] == (
        "- Left out of the test_acc table, as test_acc = 41.0 is not a fraction in [0, 1]: "
        f"`{tmp_path / 'percent'}`."
    )
    assert lines[2].startswith(f"- Skipped: `{tmp_path / 'broken'}`: unreadable results.json (")
    assert lines[3] == (
        f"- Skipped: `{tmp_path / 'cifar'}`: unknown task 'cifar' (known: listops, text, "
        "retrieval, image, pathfinder, pathx); add it to TASKS in mra_lra.bench.report."
    )
    assert lines[4] == (
        f"- Skipped: `{tmp_path / 'noseed'}`: results.json has no int `seed` (got None)."
    )


def test_nothing_usable_is_an_error(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("[]")
    with pytest.raises(ValueError, match="no usable runs.*not a JSON object"):
        summarise(collect_runs([tmp_path]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results.json under .*empty: a run writes it"):
        collect_runs(p for p in [tmp_path / "empty"])
    (tmp_path / "report.md").write_text("# LRA results\n")
    with pytest.raises(ValueError, match="report.md is a file: pass run folders"):
        collect_runs([tmp_path / "report.md"])


def test_cli_writes_markdown_and_png(tmp_path, capsys):
    root = write_grid(tmp_path / "runs")
    md, png = tmp_path / "out" / "report.md", tmp_path / "out" / "acc_vs_speed.png"
    assert main([str(root), "--out", str(md), "--plot", str(png)]) == 0
    assert capsys.readouterr().out == EXPECTED
    assert md.read_text() == EXPECTED
    from PIL import Image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert sorted(p.name for p in md.parent.iterdir()) == ["acc_vs_speed.png", "report.md"]


def test_cli_subprocess_and_errors(tmp_path):
    write_run(tmp_path / "r", "listops", "softmax", 0, 0.40, 0.40)
    cmd = [sys.executable, "-m", "mra_lra.bench.report"]
    ok = subprocess.run([*cmd, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| softmax   | 40.00 (1) | 40.00 |" in ok.stdout
    missing = subprocess.run(
        [*cmd, str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert f"error: {tmp_path / 'nope'} does not exist" in missing.stderr


def test_plot_needs_a_cell_with_speed(tmp_path):
    write_run(tmp_path / "r", "listops", "softmax", 0, 0.40, 0.40, train_tokens_per_second=None)
    summary = summarise(collect_runs([tmp_path]))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot(summary, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_real_configs_of_two_seeds_are_one_setting(compose_cfg, tmp_path):
    # train.py's resolved configs for two seeds of one experiment, in separate run folders with
    # separate data folders and wandb names: nothing but ignored keys may differ.
    from omegaconf import OmegaConf

    for seed in (0, 1):
        run_dir = tmp_path / str(seed)
        cfg = compose_cfg(
            ["experiment=lra/listops_mra", f"seed={seed}", "logger=wandb"],
            run_dir=run_dir,
            data_dir=tmp_path / f"data{seed}",
        )
        write_run(run_dir, "listops", "mra", seed, 0.4, 0.4, with_config=False)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    markdown = report(tmp_path)
    assert table_rows(markdown, BEST)["mra"] == ["40.00 ± 0.00 (2)", "40.00"]
    assert "## Notes" not in markdown


def test_latex_and_csv_outputs(tmp_path):
    root = write_grid(tmp_path / "grid")
    # A second ListOps softmax run with seed 0 again: ‡ on that cell.
    write_run(tmp_path / "grid" / "dup", "listops", "softmax", 0, 0.37, 0.30, 1100.0, 100.0)
    tex, table = tmp_path / "out" / "table.tex", tmp_path / "out" / "cells.csv"
    assert main([str(root), "--latex", str(tex), "--csv", str(table)]) == 0
    body = tex.read_text().splitlines()
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
    rows = list(csv.DictReader(table.open()))
    cell = {(r["attention"], r["task"], r["metric"]): r for r in rows}
    assert len(rows) == 2 * 2 * 4  # attentions x tasks x (two accuracies, throughput, memory)
    assert cell["mra", "listops", "test_acc"]["mean"] == "39"
    assert float(cell["mra", "listops", "test_acc"]["std"]) == pytest.approx(2.64575, rel=1e-5)
    assert cell["softmax", "listops", "test_acc"]["duplicate_seeds"] == "1"
    assert cell["mra", "image", "peak_memory_mb"]["n"] == "3"


def test_cli_refuses_to_write_over_a_run_file(tmp_path, capsys):
    root = write_grid(tmp_path / "runs")
    (result,) = list(root.rglob("results.json"))[:1]
    before = result.read_text()
    assert main([str(root), "--out", str(result)]) == 2
    assert "is a run's file" in capsys.readouterr().err
    assert result.read_text() == before
