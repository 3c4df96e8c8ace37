"""Figures of gradient accounting (matplotlib, Agg backend): ``grads/summed_norms.png`` and
``grads/cosine.png`` from the checkpoints, ``grads/live_*.png`` from the training steps
(``live.jsonl`` of ``memkern train --track-grads``) when the run has them."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from memkern.report.figures.style import WIDTH_IN, save_png  # noqa: E402
from memkern.rundir.paths import RunDir  # noqa: E402


def _table(summary: list[dict], column: str, epochs: list[int], groups: list[str]) -> np.ndarray:
    """``[epochs, groups]`` float array of ``column``; NaN (a gap) where a row is missing or its
    value undefined (null)."""
    cell = {(int(r["epoch"]), r["group"]): r[column] for r in summary}
    return np.array([[math.nan if cell.get((e, g)) is None else float(cell[(e, g)])
                      for g in groups] for e in epochs])


def plot_accounting(run: RunDir, summary: list[dict], *, prefix: str = "",
                    source: str = "checkpoints") -> None:
    """Per-group clean vs noisy summed-gradient norms over epochs, and the cosine heatmap.
    ``summary``: rows with ``epoch, group, clean_norm, noisy_norm, cosine``."""
    if not summary:
        return
    epochs = sorted({int(r["epoch"]) for r in summary})
    groups = list(dict.fromkeys(r["group"] for r in summary))
    clean, noisy = (_table(summary, f"{s}_norm", epochs, groups) for s in ("clean", "noisy"))
    cosine = _table(summary, "cosine", epochs, groups)

    # Log scale: the norms fall by two orders of magnitude once the model fits the data, and a
    # linear axis flattens every late epoch onto zero.
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH_IN, 2.1 * rows + 0.9), squeeze=False,
                             layout="constrained")
    for i, ax in enumerate(axes.flat):
        if i >= len(groups):
            ax.axis("off")
            continue
        ax.semilogy(epochs, clean[:, i], "o-", ms=4, color="tab:blue", label="clean examples")
        ax.semilogy(epochs, noisy[:, i], "s--", ms=4, color="tab:red", label="noisy examples")
        ax.set_title(groups[i], fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both")
    for row in axes:
        row[0].set_ylabel("L2 norm of summed gradient\n(log scale)", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle(f"{run.root.name} ({source}): summed gradient of clean vs noisy examples",
                 fontsize=10)
    save_png(fig, run.grads / f"{prefix}summed_norms.png")

    fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.8 + 0.3 * len(epochs)), layout="constrained")
    image = ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(groups)), groups, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(epochs)), [str(e) for e in epochs], fontsize=8)
    ax.set_xlabel("layer group")
    ax.set_ylabel("epoch (checkpoint)")
    if len(groups) <= 10 and len(epochs) <= 40:  # else the numbers no longer fit their cells
        for (r, c), v in np.ndenumerate(cosine):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(v) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="cosine(clean, noisy)")
    ax.set_title(f"{run.root.name} ({source}): cosine(clean, noisy)")
    save_png(fig, run.grads / f"{prefix}cosine.png")
