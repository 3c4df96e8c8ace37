"""Figures of the layer experiments: rewinding heatmaps and retraining curves (PNG, Agg); on a
text run (docs/text.md, "Rewinding and retraining"), extraction of the most-repeated canaries
against held-out bits per byte."""
from __future__ import annotations

import math
from pathlib import Path

from memkern.report.figures.style import SPLITS, WIDTH_IN, save_png
from memkern.report.text_summaries import reps_groups

MARKERS = "osD^v<>p*hX"


def _pyplot():
    """pyplot on the Agg backend, imported on first use: every CLI command imports this module's
    importers, and matplotlib would add its import time to all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def plot_rewind(rows: list[dict], path: str | Path, *, title: str) -> None:
    """Three annotated heatmaps, groups x rewind epochs: clean-train, noisy-train and test
    accuracy (numbers in every cell: the figure reads without colour). The first row of
    ``rows`` is the final model's baseline, shown in the panel titles."""
    base, configs = rows[0], rows[1:]
    groups = _ordered(r["group"] for r in configs)
    epochs = sorted({r["epoch"] for r in configs})
    plt = _pyplot()
    # Stacked, not side by side: the report shows the figure one column wide, where three
    # panels in a row leave the cell numbers no room.
    fig, axes = plt.subplots(3, 1, figsize=(WIDTH_IN, 3 * (1.0 + 0.35 * max(len(groups), 2))),
                             squeeze=False, layout="constrained")
    numbers = len(epochs) <= 14  # beyond that a cell is too narrow for "0.00" at 8 pt
    for ax, (key, label, *_) in zip(axes[:, 0], SPLITS):
        grid = [[math.nan] * len(epochs) for _ in groups]
        for r in configs:
            grid[groups.index(r["group"])][epochs.index(r["epoch"])] = r[key]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, line in enumerate(grid if numbers else []):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_yticks(range(len(groups)), groups)
        ax.set_xlabel("rewound to epoch")
        ax.set_ylabel("layer group rewound")
        ax.set_title(f"{label} (final model: {base[key]:.3f})", fontsize=10)
        fig.colorbar(image, ax=ax, label="accuracy (fraction)")
    fig.suptitle(title)
    save_png(fig, path)


def plot_retrain(rows: list[dict], path: str | Path, *, title: str) -> None:
    """One panel per group: clean, noisy and test accuracy against retraining epoch."""
    groups = _ordered(r["group"] for r in rows)
    cols = min(3, max(1, len(groups)))
    nrows = max(1, math.ceil(len(groups) / cols))
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, cols, figsize=(WIDTH_IN, 2.3 * nrows + 0.8), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, group in zip(axes.flat, groups):
        mine = sorted((r for r in rows if r["group"] == group), key=lambda r: r["epoch"])
        for key, label, colour, marker, line in SPLITS:
            ax.plot([r["epoch"] for r in mine], [r[key] for r in mine], line, color=colour,
                    marker=marker, ms=4, label=label)
        ax.set_title(group, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("retraining epoch (0 = reset)", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("accuracy (fraction)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(title)
    save_png(fig, path)


def _extraction_key(row: dict) -> tuple[str, str]:
    """The key and axis label of the most-repeated canaries' extraction (held-out bpb when the
    run has no canaries)."""
    groups = reps_groups(row)
    if not groups:
        return "heldout_bpb", "held-out bits per byte"
    return f"extracted_r{groups[-1]}", f"canaries with {groups[-1]} copies extracted (fraction)"


def plot_text_rewind(rows: list[dict], path: str | Path, *, title: str) -> None:
    """One point per (group, rewind epoch): held-out bits per byte across, extraction of the
    most-repeated canaries up; one marker per group, each point labelled with its epoch, the
    final model a star. A group whose rewinding removes the memory and keeps the text sits low
    and left."""
    base, configs = rows[0], rows[1:]
    key, label = _extraction_key(base)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.2), layout="constrained")
    ax.scatter([base["heldout_bpb"]], [base[key]], marker="*", s=160, color="black",
               label=f"final model (epoch {base['epoch']})", zorder=3)
    for k, group in enumerate(_ordered(r["group"] for r in configs)):
        mine = [r for r in configs if r["group"] == group]
        ax.scatter([r["heldout_bpb"] for r in mine], [r[key] for r in mine],
                   marker=MARKERS[k % len(MARKERS)], s=36, label=f"{group} rewound")
        for r in mine:
            ax.annotate(str(r["epoch"]), (r["heldout_bpb"], r[key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("held-out bits per byte (lower: text kept)")
    ax.set_ylabel(label)
    if key != "heldout_bpb":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=10)
    save_png(fig, path)


def plot_text_retrain(rows: list[dict], path: str | Path, *, title: str) -> None:
    """Two panels against retraining epoch (0 = reset), one line per group: extraction of the
    most-repeated canaries, held-out bits per byte."""
    key, label = _extraction_key(rows[0])
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.4), layout="constrained")
    for k, group in enumerate(_ordered(r["group"] for r in rows)):
        mine = sorted((r for r in rows if r["group"] == group), key=lambda r: r["epoch"])
        for ax, column in zip(axes, (key, "heldout_bpb")):
            ax.plot([r["epoch"] for r in mine], [r[column] for r in mine],
                    marker=MARKERS[k % len(MARKERS)], ms=4, label=group)
    for ax, ylabel in zip(axes, (label, "held-out bits per byte")):
        ax.set_xlabel("retraining epoch (0 = reset)", fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    if key != "heldout_bpb":
        axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)
