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


def save(fig, path: str | Path, dpi: int = 120) -> None:
    """Write `fig` as an image at `path` and free it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    print(f"wrote {path}")
