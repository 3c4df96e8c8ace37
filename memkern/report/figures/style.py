"""One look for every memkern figure that must read in grayscale: each accuracy split and each
group of examples has its own marker, line style and hatch, so no line or bar is told apart by
colour alone.

Every figure is drawn at the size the report shows it: ``WIDTH_IN`` inches at ``DPI`` is one
column of the report's page (two runs side by side on a wide screen, one column below that), so
the browser never shrinks a chart's labels below what they were drawn at; fonts are 8 pt or
more (11 px at ``DPI``).
"""
from __future__ import annotations

import io
from pathlib import Path

from memkern.rundir.atomic import atomic_write
from memkern.rundir.ownership import PNG_MARK

WIDTH_IN = 7.2
DPI = 100

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


def png_bytes(fig) -> bytes:
    """``fig`` as PNG bytes at :data:`DPI`, its size as drawn (no tight cropping); closes it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": PNG_MARK})
    plt.close(fig)
    return buf.getvalue()


def save_png(fig, path: str | Path) -> None:
    """:func:`png_bytes` written atomically to ``path``, marked as memkern's
    (memkern.rundir.ownership)."""
    data = png_bytes(fig)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
