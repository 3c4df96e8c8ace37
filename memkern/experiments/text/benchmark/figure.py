"""The figure both papers draw: efficacy (share of the extracted canaries forgotten) against the
damage done (held-out perplexity change; the other extracted canaries lost), one line per
method through its drop fractions, a marker per fraction."""
from __future__ import annotations

import math
from pathlib import Path

from memkern.report.figures.style import WIDTH_IN, legend_outside, save_png

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINES = ("-", "--", ":", "-.")


def _finite(*values) -> bool:
    return all(v is not None and not math.isnan(v) for v in values)


def save_figure(rows: list[dict], path: str | Path, *, title: str) -> None:
    """Two panels from the DEL rows of :func:`memkern.experiments.text.benchmark.table.
    benchmark_table`, saved as a memkern PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["benchmark"] == "DEL"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fractions = sorted({r["fraction_pct"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.4), layout="constrained", sharey=True)
    panels = (("ppl_change_pct", "held-out perplexity change (%)"),
              ("others_change_pts", "other extracted canaries: change (points)"))
    for ax, (key, label) in zip(axes, panels):
        for m, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method and _finite(r[key], r["efficacy"])]
            colour = f"C{m % 10}"
            ax.plot([r[key] for r in mine], [r["efficacy"] for r in mine], color=colour,
                    linestyle=LINES[m % len(LINES)], linewidth=1, label=method)
            for r in mine:
                ax.plot(r[key], r["efficacy"], color=colour, linestyle="none",
                        marker=MARKERS[fractions.index(r["fraction_pct"]) % len(MARKERS)])
        ax.axvline(0, color="0.6", linewidth=0.8)
        ax.set_xlabel(label, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("targets forgotten (share of extracted)", fontsize=8)
    axes[0].set_ylim(-0.05, 1.05)
    for f, fraction in enumerate(fractions):
        axes[1].plot([], [], color="0.3", linestyle="none", marker=MARKERS[f % len(MARKERS)],
                     label=f"drop {fraction:g}% per layer")
    legend_outside(axes[1], fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)
