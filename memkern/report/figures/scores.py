"""Pictures of the examples a score ranks highest, and ROC / precision-recall curves."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from memkern.experiments.scores.signals import oriented
from memkern.report.figures.style import WIDTH_IN, save_png


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def displayable(image: torch.Tensor) -> np.ndarray:
    """A normalized ``[C, H, W]`` image rescaled to [0, 1] on its own range (the dataset's
    mean/std are not kept with the prepared tensors), as ``[H, W]`` or ``[H, W, 3]``."""
    x = image.double()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def top_indices(name: str, values: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most suspicious examples by column ``name`` (NaN: not covered, never chosen;
    ties: lower index first)."""
    scores = oriented(name, values)
    covered = np.nonzero(~np.isnan(scores))[0]
    order = covered[np.lexsort((covered, -scores[covered]))]
    return order[:k]


def image_grid(images: torch.Tensor, indices: np.ndarray, *, labels: np.ndarray,
               original: np.ndarray, values: np.ndarray, title: str, path: Path,
               columns: int = 8) -> None:
    """A grid of ``images[indices]``; each panel's title: dataset index, trained label ``y``, the
    original label when it differs (red: a flipped label), and the signal's value."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(indices) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(WIDTH_IN, rows * WIDTH_IN / columns * 1.3
                                                     + 0.5), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices):
        ax.imshow(displayable(images[i]), cmap="gray", interpolation="nearest")
        flipped = labels[i] != original[i]
        text = f"#{i} y={labels[i]}" + (f" (was {original[i]})" if flipped else "")
        ax.set_title(f"{text}\n{values[i]:.3g}", fontsize=8, color="red" if flipped else "black")
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


LINES = ("--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "h")


def detection_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                     title: str) -> None:
    """ROC and precision-recall curves; ``curves``: name -> (oriented scores, flipped mask)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _pyplot()
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(WIDTH_IN, 3.6 + 0.22 * len(curves)),
                                        layout="constrained")
    for k, (name, (scores, positive)) in enumerate(curves.items()):
        finite = np.where(np.isinf(scores), np.sign(scores) * 1e300, scores)
        fpr, tpr, _ = roc_curve(positive, finite)
        precision, recall, _ = precision_recall_curve(positive, finite)
        # Line style and marker cycle apart from the colour, so the curves read in grayscale.
        combined = name in ("memorization_score", "cleanlab")
        style = dict(linestyle="-" if combined else LINES[k % len(LINES)],
                     lw=2.0 if combined else 1.2, marker=MARKERS[k % len(MARKERS)], ms=4,
                     markevery=0.1, label=name)
        roc_ax.plot(fpr, tpr, **style)
        pr_ax.plot(recall, precision, **style)
    roc_ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8, label="chance")
    roc_ax.set(xlabel="false positive rate (fraction of clean labels)",
               ylabel="true positive rate (fraction of flipped labels)", title="ROC")
    pr_ax.set(xlabel="recall (fraction of flipped labels found)",
              ylabel="precision (fraction flipped)", title="precision-recall", ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
    handles, labels = roc_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_png(fig, path)


def grid_signals(names: list[str]) -> list[str]:
    """The columns that get their own grid: all but the per-group gradient norms."""
    return [n for n in names if not n.startswith("grad_") or n.startswith("grad_total_")]


def write_grids(table, images: torch.Tensor, out_dir: Path, *, k: int) -> list[Path]:
    """``top_<signal>.png`` for the combined score and each signal of :func:`grid_signals`;
    a run without label noise names the combined grid ``most_atypical.png``."""
    clean_run = not table.noisy.any()
    paths = []
    for name in grid_signals(list(table.signals)):
        values = table.signals[name]
        chosen = top_indices(name, values, k)
        if name == "memorization_score":
            what = ("most atypical training examples (no label noise)" if clean_run
                    else "most memorized training examples")
            path = out_dir / ("most_atypical.png" if clean_run else "top_memorization_score.png")
            title = f"{len(chosen)} {what}: combined memorization score"
        else:
            path = out_dir / f"top_{name}.png"
            side = "highest" if oriented(name, np.ones(1))[0] > 0 else "lowest"
            title = f"{len(chosen)} training examples with the {side} {name}"
        if not clean_run:
            title += f" ({int(table.noisy[chosen].sum())} of them flipped labels, in red)"
        image_grid(images, chosen, labels=table.meta["label"],
                   original=table.meta["original_label"], values=values, title=title, path=path)
        paths.append(path)
    return paths
