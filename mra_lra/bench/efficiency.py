"""LRA's efficiency table (Tay et al. 2021, Table 2: Text at 1K-4K tokens, batch 32) for our
models: training steps per second and memory of the whole model, per attention and length.

    python -m mra_lra.bench.efficiency --attn softmax,mra,mra_s,nystrom,performer \\
        --n 1024,2048,3072,4096 --batch 32 --out bench_out
    python -m mra_lra.bench.efficiency --recipe lra_jax --task text --override model.n_layers=2

Each model is the one `python train.py task=<task> attn=<attn> trainer=gpu [recipe=<recipe>]
data.max_length=<n> <--override...>` trains. `train` is one Lightning step on random full-length
sequences (bf16 autocast where the trainer is bf16-mixed on CUDA); `infer` the forward in eval
mode. Time and memory as in `mra_lra.bench.attention`. Writes efficiency.csv, .md (ratios to
softmax at the same length) and .png under --out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mra_lra.attention.mra import resolve_backend
from mra_lra.bench.attention import Recorder, describe, free, is_oom, measure, sync
from mra_lra.bench.cli import add_timing, check_at_least, check_device, check_names, comma_list
from mra_lra.bench.plotting import length_panel, pyplot, save
from mra_lra.bench.report import markdown_table
from mra_lra.utils import CONF_DIR

FIELDS = (
    "recipe task attn impl device precision batch n pass ms steps_per_s peak_mib status".split()
)
PASSES = ("train", "infer")


def compose_model_cfg(recipe: str | None, task: str, attn: str, n: int, overrides: list[str]):
    """The config `python train.py task=<task> attn=<attn> trainer=gpu [recipe=<recipe>]
    data.max_length=<n> <overrides>` composes (minus Hydra's runtime fields)."""
    chosen = [f"task={task}", f"attn={attn}", "trainer=gpu", f"data.max_length={n}"]
    chosen += [f"recipe={recipe}"] if recipe else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*chosen, *overrides])


def recipe_label(recipe: str | None) -> str:
    return f"{recipe} recipe" if recipe else "MRA paper's recipe"


def random_batch(cfg, batch: int, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Full-length sequences of random non-padding tokens (and a second one for two towers)."""
    vocab, two_tower = cfg.task.vocab_size, cfg.task.two_tower
    out = {"label": torch.randint(cfg.task.num_classes, (batch,), device=device)}
    for suffix in ("", "_2") if two_tower else ("",):
        out[f"input_ids{suffix}"] = torch.randint(1, vocab, (batch, n), device=device)
        out[f"mask{suffix}"] = torch.ones(batch, n, device=device)  # float, as the loaders give
    return out


def model_steps(
    cfg, batch: dict, device: torch.device
) -> tuple[torch.nn.Module, dict[str, Callable], str]:
    """(model, pass -> step, precision label) for the config's model and optimiser."""
    model = hydra.utils.instantiate(cfg.model, _convert_="all").to(device)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(params=model.parameters())
    bf16 = device.type == "cuda" and str(cfg.trainer.precision).startswith("bf16")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = model(batch)
        F.cross_entropy(logits.float(), batch["label"]).backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.no_grad(), autocast():
            model(batch)

    return model, {"train": train, "infer": infer}, "bf16-mixed" if bf16 else "32-true"


def impl_label(cfg, device: torch.device) -> str:
    if cfg.attn.name in ("mra", "mra_s"):
        return resolve_backend(cfg.attn.backend, device)
    return "flex" if cfg.attn.name == "flex_mra" else "torch"


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rec = Recorder(args.out / "efficiency.csv", FIELDS, row_text)
    for attn in args.attn:
        failed = None  # after an out-of-memory error, longer lengths are skipped
        for n in args.n:
            cfg = compose_model_cfg(args.recipe, args.task, attn, n, args.override)
            base = {
                "recipe": args.recipe or "",  # blank: the task's own (as results.json's null)
                "task": args.task,
                "attn": attn,
                "impl": impl_label(cfg, device),
                "device": device.type,
                "batch": args.batch,
                "n": n,
            }
            steps, precision, status = {}, "", failed
            if status is None:
                try:
                    torch.manual_seed(0)
                    batch = random_batch(cfg, args.batch, n, device)
                    _, steps, precision = model_steps(cfg, batch, device)
                except Exception as e:  # a model that cannot be built at this length
                    status = describe(e)
                    failed = status if is_oom(e) else None
            for pass_name in args.passes:
                row = dict(base, precision=precision, **{"pass": pass_name})
                if status is None:
                    try:
                        ms, peak = measure(steps[pass_name], device, args)
                        row.update(ms=ms, steps_per_s=1e3 / ms, peak_mib=peak)
                    except Exception as e:  # every failure becomes a row
                        status = describe(e)
                        failed = status if is_oom(e) else None
                rec.add(dict(row, status=status or "ok"))
            steps.clear()
            sync(device)
            free(device)
    return rec.rows


def row_text(row: dict) -> str:
    timing = f"{row['ms']:9.1f} ms {row['peak_mib']:9.1f} MiB" if row["status"] == "ok" else ""
    return (
        f"{row['attn']:>13} {row['impl']:>6} n={row['n']:<6} {row['pass']:>5} {timing:>27}  "
        f"{row['status']}"
    )


def table(rows: list[dict], pass_name: str, baseline: str = "softmax") -> str:
    """Markdown: per attention and length, steps/s and memory, and their ratio to `baseline`
    (speed: how many times faster; memory: how many times as much)."""
    lengths = sorted({r["n"] for r in rows})
    attns = list(dict.fromkeys(r["attn"] for r in rows))
    cell = {(r["attn"], r["n"]): r for r in rows if r["pass"] == pass_name}

    def ratio(value: float, base: float) -> str:
        return f" ({value / base:.2f}x)" if base and math.isfinite(base) else ""

    lines = []
    for title, key, fmt in (("steps / s", "steps_per_s", "{:.3g}"), ("MiB", "peak_mib", "{:.0f}")):
        rows_out = []
        for attn in attns:
            cells = [attn]
            for n in lengths:
                r, b = cell.get((attn, n)), cell.get((baseline, n))
                if r is None or r["status"] != "ok":
                    cells.append(r["status"] if r else "")
                    continue
                ok = b is not None and b["status"] == "ok"
                cells.append(fmt.format(r[key]) + (ratio(r[key], b[key]) if ok else ""))
            rows_out.append(cells)
        header = [f"{title} ({pass_name})", *(f"n={n}" for n in lengths)]
        lines += [*markdown_table(header, rows_out), ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Steps per second and memory against length, log-log, one line per attention; a panel
    pair per pass."""
    plt = pyplot("plot")
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return
    passes = [p for p in PASSES if any(r["pass"] == p for r in ok)]
    attns = list(dict.fromkeys(r["attn"] for r in ok))
    fig, axes = plt.subplots(len(passes), 2, figsize=(11, 4 * len(passes)), squeeze=False)
    for i, pass_name in enumerate(passes):
        for j, (key, unit) in enumerate((("steps_per_s", "steps / s"), ("peak_mib", "MiB"))):
            lines = {
                attn: [(r["n"], r[key]) for r in ok if (r["attn"], r["pass"]) == (attn, pass_name)]
                for attn in attns
            }
            length_panel(axes[i][j], lines, unit, f"{pass_name}: {unit}")
    first = ok[0]
    title = (
        f"whole model, {recipe_label(first['recipe'])}, {first['task']}, batch {first['batch']}, "
        f"{first['device']}"
    )
    save(fig, path, title)


def report(rows: list[dict], args: argparse.Namespace) -> str:
    first = next((r for r in rows if r["status"] == "ok"), rows[0] if rows else {})
    head = (
        f"# Efficiency: {recipe_label(args.recipe)}, task {args.task}, batch {args.batch}\n\n"
        f"Device {args.device_name}, torch {torch.__version__}, precision "
        f"{first.get('precision', '')}. Command: `python -m mra_lra.bench.efficiency "
        f"{' '.join(args.argv)}`. Ratios are to softmax at the same length.\n"
    )
    return head + "\n" + "\n".join(table(rows, p) for p in args.passes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mra_lra.bench.efficiency",
        description="Training steps per second and memory of the whole LRA model, per attention.",
    )
    p.add_argument("--attn", type=comma_list(), default=["softmax", "mra", "mra_s"])
    p.add_argument("--n", type=comma_list(int), default=[1024, 2048, 3072, 4096])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--task", default="text")
    recipes = sorted(f.stem for f in (CONF_DIR / "recipe").glob("*.yaml"))
    p.add_argument("--recipe", choices=recipes, help="default: the task's own (the MRA paper's)")
    p.add_argument("--passes", type=comma_list(), default=list(PASSES), help="train,infer")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    add_timing(p)
    args = p.parse_args(argv)
    check_device(p, args.device)
    check_names(p, "--passes", args.passes, PASSES)
    check_at_least(p, args, 1, "n", "batch", "repeats")
    check_at_least(p, args, 0, "warmup")
    check_names(p, "--task", [args.task], (f.stem for f in (CONF_DIR / "task").glob("*.yaml")))
    check_names(p, "--attn", args.attn, (f.stem for f in (CONF_DIR / "attn").glob("*.yaml")))
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {args.device_name}, torch {torch.__version__}", flush=True)
    rows = run(args)
    text = report(rows, args)
    (args.out / "efficiency.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'efficiency.csv'} and {args.out / 'efficiency.md'}")
    plot(rows, args.out / "efficiency.png")


if __name__ == "__main__":
    main()
