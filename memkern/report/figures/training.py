"""The training curves of a run (``metrics.jsonl``) as a PNG, for the report."""
from __future__ import annotations

from memkern.report.figures.style import SPLITS, WIDTH_IN, png_bytes

MODE_LINES = {"": "-", "_keep": "-.", "_drop": ":"}
MODE_NAMES = {"": ", own masks", "_keep": ", memorization ch. kept", "_drop": ", dropped"}


def training_curves_png(rows: list[dict], *, title: str) -> bytes:
    """Accuracy of the three sets per epoch, PNG bytes. A tied-dropout run's ``*_keep`` and
    ``*_drop`` curves are drawn beside its own-mask curves: split by marker, mode by line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    tied = "noisy_acc_drop" in rows[0]
    every = max(1, len(epochs) // 10)
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 5.2 if tied else 3.9), layout="constrained")
    for key, label, colour, marker, line in SPLITS:
        for mode in (MODE_LINES if tied else {"": line}):
            if f"{key}{mode}" not in rows[0]:
                continue
            ax.plot(epochs, [r[f"{key}{mode}"] for r in rows], MODE_LINES[mode] if tied else line,
                    color=colour, marker=marker, markevery=every, ms=4,
                    label=label + (MODE_NAMES[mode] if tied else ""))
    ax.set(xlabel="epoch", ylabel="accuracy (fraction correct)", ylim=(-0.02, 1.02),
           title=title)
    ax.grid(alpha=0.3)
    # Two columns on a tied run: nine labels in three would run past the figure's edges.
    fig.legend(loc="outside lower center", ncol=2 if tied else 3, fontsize=8)
    return png_bytes(fig)
