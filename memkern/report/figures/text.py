"""A text run's training curves (``metrics.jsonl``) as a PNG: extraction and exposure of the
canaries by copies, and held-out bits per byte, per epoch."""
from __future__ import annotations

from memkern.report.figures.style import WIDTH_IN, png_bytes
from memkern.report.text_summaries import reps_groups

MODES = {"": ("-", "own masks"), "_keep": ("-.", "memorization neurons kept"),
         "_drop": (":", "dropped")}
MARKERS = "osD^v<>p"


def text_training_png(rows: list[dict], *, title: str) -> bytes:
    """Three panels sharing the epoch axis: fraction of canaries extracted per copies group,
    their mean exposure (bits), held-out bits per byte. Groups differ by marker and colour; a
    tied-dropout run's kept / dropped curves by line style."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    modes = [m for m in MODES if f"heldout_bpb{m}" in rows[-1]]
    groups = reps_groups(rows[-1])
    every = max(1, len(epochs) // 10)
    fig, axes = plt.subplots(3, 1, figsize=(WIDTH_IN, 7.8), sharex=True, layout="constrained")
    for k, r in enumerate(groups):
        for m in modes:
            for ax, key in zip(axes[:2], ("extracted", "exposure")):
                ax.plot(epochs, [row.get(f"{key}_r{r}{m}", float("nan")) for row in rows],
                        MODES[m][0], marker=MARKERS[k % len(MARKERS)], markevery=every, ms=4,
                        color=f"C{k}")
    for m in modes:
        axes[2].plot(epochs, [row[f"heldout_bpb{m}"] for row in rows], MODES[m][0],
                     color="black", marker="o", markevery=every, ms=3)
    axes[0].set(ylabel="canaries extracted\n(fraction)", ylim=(-0.03, 1.03), title=title)
    axes[1].set(ylabel="exposure (bits)")
    axes[2].set(ylabel="held-out\nbits per byte", xlabel="epoch")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole (a 3-epoch run)
    for ax in axes:
        ax.grid(alpha=0.3)
    # One legend under the panels, groups by colour and a tied run's modes by line style: one
    # entry per (group, mode) pair covered the curves it named.
    handles = [Line2D([], [], color=f"C{k}", marker=MARKERS[k % len(MARKERS)], ms=4,
                      label=f"{r} copies") for k, r in enumerate(groups)]
    if len(modes) > 1:
        handles += [Line2D([], [], color="black", linestyle=MODES[m][0], label=MODES[m][1])
                    for m in modes]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", fontsize=8,
                   ncol=min(len(handles), 4))
    return png_bytes(fig)
