"""LRA's efficiency table: training steps per second and memory of the whole model, per attention.

    python -m mra_lra.bench.efficiency --attn softmax,mra,mra_s,nystrom,performer \\
        --n 1024,2048,3072,4096 --batch 32 --out bench_out
    python -m mra_lra.bench.efficiency --recipe lra_jax --task text --override model.n_layers=2

The LRA paper (Tay et al. 2021, Table 2) times each model on byte-level Text at lengths 1K-4K with
batch 32 and reports steps per second and peak memory relative to the Transformer; this module
does the same with our models. Each model is the one `python train.py task=<task> attn=<attn>
trainer=gpu` trains (the MRA paper's backbone), or with `--recipe lra_jax` the one `recipe=lra_jax`
adds trains (the LRA code's, conf/recipe/), with `data.max_length=<n>` and any `--override` (Hydra
syntax, e.g. `attn.backend=torch`), composed through Hydra from conf/.

A training step is what Lightning runs per batch: forward on random full-length token sequences
(no padding), cross-entropy, backward and the optimiser's step, under bf16 autocast where the
run's trainer uses bf16-mixed and the device is CUDA (float32 otherwise). `infer` rows time
the forward alone, without gradients, in eval mode. Time: median of --repeats after --warmup.
Memory: what a step needs beyond what is allocated before it (weights, gradients and optimiser
state of earlier steps excluded), measured as in `mra_lra.bench.attention`. Writes
`<out>/efficiency.csv` as rows finish, `<out>/efficiency.md` (steps per second and memory, each
also relative to softmax at the same length) and `<out>/efficiency.png` (both against length).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mra_lra.bench.attention import _list, describe, free, is_oom, measure, sync
from mra_lra.bench.cli import check_at_least, check_device, check_names
from mra_lra.bench.plotting import pyplot, save, style
from mra_lra.data.prepare import compose_train
from mra_lra.utils import CONF_DIR

FIELDS = (
    "recipe task attn impl device precision batch n pass ms steps_per_s peak_mib status".split()
)
PASSES = ("train", "infer")
MRA_NAMES = ("mra", "mra_s", "flex_mra")


def compose_model_cfg(recipe: str | None, task: str, attn: str, n: int, overrides: list[str]):
    """The run config `python train.py task=<task> attn=<attn> trainer=gpu [recipe=<recipe>]
    data.max_length=<n>` would train, with `overrides` after it."""
    chosen = [f"task={task}", f"attn={attn}", "trainer=gpu", f"data.max_length={n}"]
    if recipe:
        chosen.append(f"recipe={recipe}")
    return compose_train([*chosen, *overrides])


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
    import hydra

    model = hydra.utils.instantiate(cfg.model, _convert_="all").to(device)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(params=model.parameters())
    bf16 = device.type == "cuda" and str(cfg.trainer.precision).startswith("bf16")

    def autocast():
        if bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
        from mra_lra.attention.mra import resolve_backend

        return resolve_backend(cfg.attn.backend, device)
    return "flex" if cfg.attn.name == "flex_mra" else "torch"


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    path = args.out / "efficiency.csv"
    with path.open("w", newline="") as f:
        csv.DictWriter(f, fieldnames=FIELDS).writeheader()
    rows = []
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
                    _, steps, precision = model_steps(
                        cfg, random_batch(cfg, args.batch, n, device), device
                    )
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
                row["status"] = status or "ok"
                rows.append(row)
                with path.open("a", newline="") as f:
                    csv.DictWriter(f, fieldnames=FIELDS).writerow(
                        {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()}
                    )
                print(_row_text(row), flush=True)
            steps.clear()
            sync(device)
            free(device)
    return rows


def _row_text(row: dict) -> str:
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
        lines += [
            f"| {title} ({pass_name}) | " + " | ".join(f"n={n}" for n in lengths) + " |",
            "|---|" + "---:|" * len(lengths),
        ]
        for attn in attns:
            cells = []
            for n in lengths:
                r, b = cell.get((attn, n)), cell.get((baseline, n))
                if r is None or r["status"] != "ok":
                    cells.append(r["status"] if r else "")
                    continue
                ok = b is not None and b["status"] == "ok"
                cells.append(fmt.format(r[key]) + (ratio(r[key], b[key]) if ok else ""))
            lines.append(f"| {attn} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Steps per second and memory against length, log-log, one line per attention; a panel
    pair per pass."""
    plt = pyplot("plot")
    if plt is None:
        return
    ok = [r for r in rows if r["status"] == "ok"]
    passes = [p for p in PASSES if any(r["pass"] == p for r in ok)]
    if not ok:
        return
    attns = list(dict.fromkeys(r["attn"] for r in ok))
    colors = plt.get_cmap("tab10" if len(attns) <= 10 else "tab20")
    lengths = sorted({r["n"] for r in ok})
    fig, axes = plt.subplots(len(passes), 2, figsize=(11, 4 * len(passes)), squeeze=False)
    for i, pass_name in enumerate(passes):
        for j, (key, unit) in enumerate((("steps_per_s", "steps / s"), ("peak_mib", "MiB"))):
            ax = axes[i][j]
            for c, attn in enumerate(attns):
                line = sorted(
                    (r["n"], r[key]) for r in ok if r["attn"] == attn and r["pass"] == pass_name
                )
                if line:
                    ax.plot(*zip(*line, strict=True), "o-", color=colors(c), label=attn)
            ax.set(xscale="log", yscale="log", xlabel="n (tokens)", ylabel=unit)
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_title(f"{pass_name}: {unit}")
            style(ax)
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
    p.add_argument("--attn", type=_list(str), default=["softmax", "mra", "mra_s"])
    p.add_argument("--n", type=_list(int), default=[1024, 2048, 3072, 4096])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--task", default="text")
    recipes = sorted(f.stem for f in (CONF_DIR / "recipe").glob("*.yaml"))
    p.add_argument("--recipe", choices=recipes, help="default: the task's own (the MRA paper's)")
    p.add_argument("--passes", type=_list(str), default=list(PASSES), help="train,infer")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=60.0, help="per row, for the repeats")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
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
