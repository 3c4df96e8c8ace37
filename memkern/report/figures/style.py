"""One look for every memkern figure that must read in grayscale: each accuracy split and each
group of examples has its own marker, line style and hatch, so no line or bar is told apart by
colour alone."""
from __future__ import annotations

from pathlib import Path

from memkern.rundir.atomic import atomic_write
from memkern.rundir.ownership import PNG_MARK

# (key, label, colour, marker, line style) of the paper's three sets (docs/method.md).
SPLITS = (("clean_acc", "clean train", "tab:blue", "o", "-"),
          ("noisy_acc", "noisy train (noisy labels)", "tab:red", "s", "--"),
          ("test_acc", "test", "tab:green", "^", ":"))

# Noisy (memorized) vs clean targets: colour, hatch, marker, line style.
EXAMPLE_GROUPS = {"noisy": ("tab:red", "///", "s", "--"), "clean": ("tab:blue", "", "o", "-")}

# Tied-dropout evaluation modes drawn beside the plain curves: line style and marker fill.
MODE_STYLES = {"keep": ("-.", "white"), "drop": ((0, (1, 1)), "none")}


def legend_outside(ax, **kw) -> None:
    """The legend to the right of ``ax``, where it covers no data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def save_figure(fig, path: str | Path, **savefig) -> None:
    """Save ``fig`` as a PNG atomically, marked as memkern's (memkern.rundir.ownership), and
    close it. ``savefig``: dpi, bbox_inches."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png",
                                               metadata={"Software": PNG_MARK}, **savefig))
    plt.close(fig)
