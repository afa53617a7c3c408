"""What every benchmark plot shares: matplotlib on the Agg backend when it is installed (the
benchmarks run without it, and then write their tables only), and writing a figure."""

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


def save(fig, path: str | Path, title: str | None = None, dpi: int = 120) -> None:
    """Title `fig`, lay it out (unless it has a layout engine of its own), write it as an image
    at `path` and free it."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
