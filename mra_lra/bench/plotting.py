"""What every benchmark plot shares. matplotlib is optional: without it the tools write their
tables only."""

from __future__ import annotations

from pathlib import Path


def pyplot(what: str = "plot"):
    """matplotlib.pyplot on Agg, or None after saying that there will be no `what`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {what} (pip install matplotlib)")
        return None
    return plt


def style(ax) -> None:
    """The grid and legend every benchmark panel has."""
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def length_panel(ax, lines: dict[str, list[tuple]], ylabel: str, title: str) -> None:
    """A log-log panel of (n, value) points against sequence length, one line per label (the
    same label keeps its colour in every panel, as long as `lines` lists every label)."""
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20")
    for c, (label, points) in enumerate(lines.items()):
        if points:
            ax.plot(*zip(*sorted(points), strict=True), "o-", color=colors(c), label=label)
    lengths = sorted({n for points in lines.values() for n, _ in points})
    ax.set(xscale="log", yscale="log", xlabel="n (tokens)", ylabel=ylabel, title=title)
    ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()
    style(ax)


def save(fig, path: str | Path, title: str | None = None, dpi: int = 120) -> None:
    """Title `fig`, lay it out (unless it has a layout engine of its own), write it and free it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
