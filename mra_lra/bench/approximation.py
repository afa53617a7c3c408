"""How closely each attention approximates exact softmax attention, and at what cost.

    python -m mra_lra.bench.approximation --attn mra,mra_s,nystrom,performer \\
        --sweep mra.block_per_row=1,2,4,8 --sweep mra_s.block_per_row=1,2,4,8 \\
        --sweep nystrom.num_landmarks=16,32,64,128 --n 2048 --smooth 32 --out approx_out
    python -m mra_lra.bench.approximation --run runs/<date>/<run> --split val --examples 8 \\
        --attn mra,nystrom --sweep mra.block_per_row=1,2,4,8 --out approx_out

Inputs (synthetic, or a trained run's), options and outputs: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from mra_lra.attention import build, names
from mra_lra.attention.softmax import exact_softmax, relative_error
from mra_lra.bench.attention import config_options, median_ms, parse_overrides
from mra_lra.bench.cli import check_at_least, check_device, check_names, comma_list
from mra_lra.bench.plotting import pyplot, save, style
from mra_lra.bench.report import markdown_table
from mra_lra.errors import UserError
from mra_lra.utils import CONF_DIR

DEFAULT_ATTN = (
    "softmax,mra,mra_s,nystrom,performer,linformer,longformer,bigbird,h_transformer,scatterbrain"
)
# Model layers rather than the approximation: freshly built they are random, so off here.
APPROXIMATION_ONLY = {"nystrom": {"conv_kernel_size": None}}
# YOSO normalises each output row, so its output is not A v for any matrix A.
NO_MAP = {"softmax", "yoso"}
GRADS = ("dq", "dk", "dv")
FIELDS = (
    "source layer attn setting budget_key budget n d heads batch rel_error rel_error_std ms seeds"
).split() + [f"rel_error_{g}" for g in GRADS]


def synthetic_inputs(args: argparse.Namespace) -> list[dict]:
    """One 'layer' of random q, k, v; `--pad F` pads the last fraction F of batch entry 1."""
    g = torch.Generator().manual_seed(args.input_seed)
    shape = (args.batch, args.heads, args.n, args.d)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    if args.smooth > 1:
        q, k, v = (smooth(t, args.smooth) for t in (q, k, v))
    q, k = q * args.scale, k * args.scale
    mask = torch.ones(args.batch, args.n)
    if args.pad > 0 and args.batch > 1:
        mask[1, args.n - int(args.pad * args.n) :] = 0
    context = {"head_dim": args.d, "num_heads": args.heads, "max_length": args.n}
    return [{"layer": 0, "q": q, "k": k, "v": v, "mask": mask, "context": context}]


def smooth(x: torch.Tensor, window: int) -> torch.Tensor:
    """A sliding mean over `window` tokens along n, rescaled to unit variance per channel."""
    B, H, n, d = x.shape
    flat = x.permute(0, 1, 3, 2).reshape(-1, 1, n)
    kernel = torch.full((1, 1, window), 1.0 / window)
    out = F.conv1d(F.pad(flat, (window // 2, window - 1 - window // 2), mode="replicate"), kernel)
    out = out.reshape(B, H, d, n).permute(0, 1, 3, 2)
    return out / out.std(dim=2, keepdim=True).clamp(min=1e-6)


def captured_inputs(args: argparse.Namespace) -> tuple[list[dict], object]:
    """Each layer's attention inputs on the first --examples examples of --split of a run."""
    from mra_lra.evaluate import load_run
    from mra_lra.models.encoder import MultiHeadAttention

    run = load_run(args.run, ckpt=args.ckpt, overrides=args.override)
    net = run.net.eval()
    layers = [m for m in net.modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise SystemExit(f"{args.run}: the model has no MultiHeadAttention layers to capture")
    calls: dict[int, list[tuple]] = {i: [] for i in range(len(layers))}
    hooks = [
        layer.attention.register_forward_pre_hook(
            lambda module, inputs, i=i: calls[i].append(tuple(t.detach().float() for t in inputs))
        )
        for i, layer in enumerate(layers)
    ]
    run.datamodule.setup("validate" if args.split == "val" else "test")
    loader = getattr(run.datamodule, f"{args.split}_dataloader")()
    seen = 0
    with torch.no_grad():
        for batch in loader:
            batch = {key: value[: args.examples - seen] for key, value in batch.items()}
            net(batch)
            seen += len(next(iter(batch.values())))
            if seen >= args.examples:
                break
    for hook in hooks:
        hook.remove()
    out = []
    for i, layer in enumerate(layers):
        q, k, v, mask = (torch.cat(parts) for parts in zip(*calls[i], strict=True))
        out.append({"layer": i, "q": q, "k": k, "v": v, "mask": mask, "context": layer.context})
    return out, run.cfg


def run_options(name: str, cfg) -> dict:
    """conf/attn/<name>.yaml with its interpolations resolved against a run's config."""
    attn = OmegaConf.load(CONF_DIR / "attn" / f"{name}.yaml")
    merged = OmegaConf.merge({"task": cfg.get("task", {})}, {"attn": attn})
    options = OmegaConf.to_container(merged.attn, resolve=True)
    options.pop("name", None)
    return options


def settings(args: argparse.Namespace) -> list[tuple[str, str, object, dict]]:
    """(attention, budget key, budget value, options) for every attention and swept value."""
    sweeps: dict[str, tuple[str, list]] = {}
    for item in args.sweep:
        key, sep, values = item.partition("=")
        name, dot, key = key.partition(".")
        if not (sep and dot and key and values):
            raise SystemExit(f"--sweep takes name.key=v1,v2,..., got {item!r}")
        if name not in args.attn:
            raise SystemExit(f"--sweep {item}: {name!r} is not in --attn {','.join(args.attn)}")
        sweeps[name] = (key, [yaml.safe_load(v) for v in values.split(",")])
    out = []
    for name in args.attn:
        key, values = sweeps.get(name, ("", [None]))
        out += [(name, key, value, {key: value} if key else {}) for value in values]
    return out


def attention_options(name: str, extra: dict, args: argparse.Namespace, cfg) -> dict:
    """The config's options (resolved against a run's config when there is one), the
    approximation-only switches, --set, then the swept value."""
    base = run_options(name, cfg) if cfg is not None else config_options(name, {}, "torch")
    options = {**base, **APPROXIMATION_ONLY.get(name, {})}
    options.update({**args.overrides.get(name, {}), **extra})
    if "backend" in options:
        options["backend"] = args.backend
    return options


def effective_matrix(attn, q, k, mask, seed: int) -> torch.Tensor:
    """The [n, n] matrix A with out = A v that `attn` applies to entry 0, head 0, read off by
    feeding the columns of the identity as values, d at a time (exact for every method that is
    linear in v; the random draws repeat through `seed`)."""
    q, k = q[:1], k[:1]
    mask = None if mask is None else mask[:1]
    _, H, n, d = q.shape
    columns = []
    for lo in range(0, n, d):
        v = q.new_zeros(1, H, n, d)
        width = min(d, n - lo)
        v[:, :, lo : lo + width, :width] = torch.eye(width, dtype=q.dtype, device=q.device)
        torch.manual_seed(seed)
        columns.append(attn(q, k, v, mask)[0, 0, :, :width])
    return torch.cat(columns, dim=1)


def gradients(fn, q, k, v, mask, weights) -> list[torch.Tensor | None]:
    """dq, dk, dv of sum(fn(q, k, v, mask) * weights); None where no gradient reaches."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    (fn(q, k, v, mask) * weights).sum().backward()
    return [t.grad for t in (q, k, v)]


def measure(args: argparse.Namespace, layers: list[dict], cfg=None) -> tuple[list[dict], list]:
    """Rows of error and time, and with --maps the effective attention matrices of layer
    --maps-layer as (label, matrix) pairs."""
    rows, maps = [], []
    source = (
        f"run:{args.run}" if args.run else f"synthetic(scale={args.scale},smooth={args.smooth})"
    )
    for layer in layers:
        q, k, v, mask = (layer[key].to(args.device) for key in ("q", "k", "v", "mask"))
        ref = exact_softmax(q, k, v, mask)
        B, H, n, d = q.shape
        fixed = dict(source=source, layer=layer["layer"], n=n, d=d, heads=H, batch=B)
        context = {**layer["context"], "max_length": max(layer["context"]["max_length"], n)}
        if args.grad:
            g = torch.Generator().manual_seed(args.input_seed)
            weights = torch.randn(q.shape, generator=g).to(q.device) * mask[:, None, :, None]
            exact_grads = gradients(exact_softmax, q, k, v, mask, weights)
        draw = args.maps and layer["layer"] == args.maps_layer
        if draw:
            identity = torch.eye(n, device=q.device)[None, None]
            probs = exact_softmax(q[:1, :1], k[:1, :1], identity, mask[:1])
            maps.append(("exact softmax", probs[0, 0].cpu()))
        for name, key, value, extra in settings(args):
            options = attention_options(name, extra, args, cfg)
            setting = f"{key}={value}" if key else "default"
            errors, times, grad_errors = [], [], []
            for seed in args.seeds:
                torch.manual_seed(seed)
                try:
                    attn = build(name, context=context, **options).to(args.device).eval()
                except (TypeError, ValueError) as error:
                    raise SystemExit(f"{name} with {options}: {error}") from None
                with torch.no_grad():
                    torch.manual_seed(seed)
                    errors.append(relative_error(attn(q, k, v, mask), ref, mask))
                    forward = functools.partial(attn, q, k, v, mask)
                    times.append(median_ms(forward, q.device, args.repeats))
                    if draw and seed == args.seeds[0] and name not in NO_MAP:
                        label = f"{name} {setting}" if key else name
                        maps.append((label, effective_matrix(attn, q, k, mask, seed).cpu()))
                if args.grad:
                    torch.manual_seed(seed)
                    try:
                        got = gradients(attn, q, k, v, mask, weights)
                    except (RuntimeError, NotImplementedError) as error:  # no backward here
                        print(f"{name}: no gradient ({str(error).splitlines()[0]})")
                        got = [None] * len(GRADS)
                    pairs = zip(got, exact_grads, strict=True)
                    grad_errors.append(
                        [None if g is None else relative_error(g, e, mask) for g, e in pairs]
                    )
            grad_means = [
                None if None in column else statistics.fmean(column)
                for column in zip(*grad_errors, strict=True)
            ] or [None] * len(GRADS)
            rows.append(
                {
                    **fixed,
                    "attn": name,
                    "setting": setting,
                    "budget_key": key,
                    "budget": value if key else "",
                    "rel_error": statistics.fmean(errors),
                    "rel_error_std": statistics.pstdev(errors),
                    "ms": statistics.median(times),
                    "seeds": len(args.seeds),
                    **{f"rel_error_{g}": e for g, e in zip(GRADS, grad_means, strict=True)},
                }
            )
            print(
                f"layer {layer['layer']} {name:>14} {setting:>22}: "
                f"error {rows[-1]['rel_error']:.4f}  {rows[-1]['ms']:8.2f} ms"
            )
    return rows, maps


def by_setting(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """The rows of each (attention, setting), one per layer, in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attn"], r["setting"]), []).append(r)
    return groups


def gradient_table(rows: list[dict]) -> str:
    """Markdown: the gradient errors of each (attention, setting), mean over layers."""
    body = []
    for (name, setting), group in by_setting(rows).items():
        cells = []
        for g in GRADS:
            values = [r[f"rel_error_{g}"] for r in group]
            cells.append("" if None in values else f"{statistics.fmean(values):.4f}")
        body.append([name, setting, *cells])
    return "\n".join(markdown_table(["attention", "setting", *GRADS], body)) + "\n"


def table(rows: list[dict]) -> str:
    """Markdown: one row per (attention, setting), one error column per layer (+ mean), and the
    forward time summed over layers."""
    layers = sorted({r["layer"] for r in rows})
    head = ["attention", "setting", *(f"layer {i}" for i in layers)]
    head += ["mean", "ms"] if len(layers) > 1 else ["ms"]
    body = []
    for (name, setting), group in by_setting(rows).items():
        cells = {r["layer"]: r for r in group}
        errors = (f"{cells[i]['rel_error']:.4f}" if i in cells else "" for i in layers)
        line = [name, setting, *errors]
        if len(layers) > 1:
            line.append(f"{statistics.fmean(r['rel_error'] for r in group):.4f}")
        line.append(f"{sum(r['ms'] for r in group):.2f}")
        body.append(line)
    return "\n".join(markdown_table(head, body)) + "\n"


def plot_maps(maps: list, path: Path, tokens: int, title: str) -> None:
    """Heatmaps of log10 |A| for the first `tokens` queries and keys, one panel per matrix, on
    the colour scale of the exact matrix (its largest weight down to a thousandth of it)."""
    plt = pyplot("maps")
    if plt is None:
        return
    top = float(maps[0][1][:tokens, :tokens].abs().max().clamp(min=1e-30).log10())
    cols = min(6, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols + 1, 2.5 * rows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (label, matrix) in itertools.zip_longest(axes.flat, maps, fillvalue=(None, None)):
        ax.axis("off")
        if matrix is None:
            continue
        shown = matrix[:tokens, :tokens].abs().clamp(min=1e-30).log10()
        image = ax.imshow(shown.float().numpy(), vmin=top - 3, vmax=top, cmap="viridis")
        ax.set_title(label, fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="log10 |weight|")
    fig.suptitle(title, fontsize=9)
    save(fig, path, dpi=110)


def plot(rows: list[dict], path: Path) -> None:
    """Mean error over layers against the swept budget (one line per attention) and against
    forward time."""
    plt = pyplot("plot")
    exact_ms = [r["ms"] for r in rows if r["attn"] == "softmax"]
    rows = [r for r in rows if r["attn"] != "softmax"]  # error 0: a time, drawn as a line
    if plt is None or not rows:
        return
    points: dict[str, list[tuple]] = {}
    for (name, _), group in sorted(by_setting(rows).items()):
        budget_key = group[0]["budget_key"]
        label = f"{name} ({budget_key})" if budget_key else name
        error = statistics.fmean(r["rel_error"] for r in group)
        points.setdefault(label, []).append(
            (group[0]["budget"], error, sum(r["ms"] for r in group))
        )
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")
    for c, (label, pts) in enumerate(sorted(points.items())):
        numeric = sorted(p for p in pts if isinstance(p[0], int | float))
        if len(numeric) > 1:
            xs, ys = [p[0] for p in numeric], [p[1] for p in numeric]
            left.plot(xs, ys, "o-", color=colors(c), label=label)
        pts = sorted(pts, key=lambda p: p[2])
        right.plot([p[2] for p in pts], [p[1] for p in pts], "o-", color=colors(c), label=label)
    if exact_ms:
        total = sum(exact_ms)
        right.axvline(total, color="black", ls="--", label=f"exact softmax ({total:.1f} ms)")
    left.set(xscale="log", yscale="log", xlabel="swept option (own units)", ylabel="relative error")
    right.set(xscale="log", yscale="log", xlabel="forward ms (all layers)", ylabel="relative error")
    style(left)
    style(right)
    first = rows[0]
    title = (
        f"error against exact softmax ({first['source']}, n={first['n']}, d={first['d']}, "
        f"H={first['heads']}, B={first['batch']})"
    )
    save(fig, path, title)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mra_lra.bench.approximation",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--attn", type=comma_list(), default=DEFAULT_ATTN, help="registered names")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME.KEY=V1,V2,...")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME.KEY=V")
    p.add_argument("--seeds", type=comma_list(int), default="0,1,2", help="averaged per setting")
    p.add_argument("--repeats", type=int, default=3, help="forward timings per seed (median)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the inputs go there)")
    p.add_argument(
        "--backend", default="auto", choices=("auto", "torch", "triton"), help="MRA's path"
    )
    p.add_argument("--out", default="approx_out")
    p.add_argument("--name", default="approximation", help="file stem under --out")
    synthetic = p.add_argument_group("synthetic inputs")
    synthetic.add_argument("--n", type=int, default=1024)
    synthetic.add_argument("--d", type=int, default=32)
    synthetic.add_argument("--heads", type=int, default=2)
    synthetic.add_argument("--batch", type=int, default=2)
    synthetic.add_argument("--scale", type=float, default=1.0, help="std of q and k")
    synthetic.add_argument("--smooth", type=int, default=0, help="sliding-mean window (tokens)")
    synthetic.add_argument("--pad", type=float, default=0.0, help="padded fraction of entry 1")
    synthetic.add_argument("--input-seed", type=int, default=0)
    p.add_argument("--maps", action="store_true", help="also draw the matrices: <name>_maps.png")
    p.add_argument("--maps-layer", type=int, default=0, help="the layer --maps draws")
    p.add_argument("--grad", action="store_true", help="also the errors of dq, dk, dv")
    p.add_argument("--maps-tokens", type=int, default=256, help="queries and keys drawn")
    captured = p.add_argument_group("a trained run's inputs")
    captured.add_argument("--run", default=None, help="run folder written by train.py")
    captured.add_argument("--ckpt", default="best", help="best, last or a path")
    captured.add_argument("--split", choices=("val", "test"), default="val")
    captured.add_argument("--examples", type=int, default=8)
    captured.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    check_names(p, "--attn", args.attn, names())
    args.overrides = parse_overrides(args.overrides)
    if "*" in args.overrides:
        p.error("--set takes name.key=value here (each attention has its own options)")
    check_at_least(p, args, 1, "n", "d", "heads", "batch", "examples", "repeats", "maps_tokens")
    args.device = check_device(p, args.device)
    if not args.seeds:
        p.error("--seeds needs at least one seed")
    check_at_least(p, args, 0, "smooth")
    if args.scale <= 0:
        p.error(f"--scale must be positive, got {args.scale}")
    if not 0 <= args.pad < 1:
        p.error(f"--pad must be in [0, 1), got {args.pad}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.run:
        try:
            layers, cfg = captured_inputs(args)
        except (UserError, FileNotFoundError, ValueError) as error:  # load_run's name the fix
            raise SystemExit(f"--run {args.run}: {error}") from None
    else:
        layers, cfg = synthetic_inputs(args), None
    if args.maps and not 0 <= args.maps_layer < len(layers):
        raise SystemExit(
            f"--maps-layer {args.maps_layer}: the inputs have layers 0-{len(layers) - 1}"
        )
    rows, maps = measure(args, layers, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = table(rows)
    if args.grad:
        text += "\nGradient error against exact softmax's, mean over layers:\n\n"
        text += gradient_table(rows)
    command = " ".join(["python -m mra_lra.bench.approximation", *(argv or sys.argv[1:])])
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    (out / f"{args.name}.md").write_text(
        f"Relative error against exact softmax, and forward ms on {where}. Inputs: "
        f"{rows[0]['source']}.\n\n```bash\n{command}\n```\n\n{text}"
    )
    print(text)
    plot(rows, out / f"{args.name}.png")
    if maps:
        title = (
            f"attention matrices, layer {args.maps_layer}, entry 0, head 0, first "
            f"{min(args.maps_tokens, rows[0]['n'])} tokens ({rows[0]['source']})"
        )
        plot_maps(maps, out / f"{args.name}_maps.png", args.maps_tokens, title)
    return rows


if __name__ == "__main__":
    main()
