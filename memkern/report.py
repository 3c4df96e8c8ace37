"""``memkern report``: one page over a run directory — training curves plus every figure and
table the other commands left there."""
from __future__ import annotations

import json
from pathlib import Path

from memkern.atomic import atomic_write, atomic_write_text, read_json_object
from memkern.errors import RunDirError, printable
from memkern.locks import hold_run, locked
from memkern.runs import RunDir

CURVES = (("clean_acc", "clean train"), ("noisy_acc", "noisy train (noisy labels)"),
          ("test_acc", "test"))


def plot_training_curves(rows: list[dict], path: Path) -> None:
    """Accuracy of the three sets per epoch (plus keep/drop modes for tied-dropout runs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in CURVES:
        line, = ax.plot(epochs, [r[key] for r in rows], label=label)
        for mode, style in (("keep", "--"), ("drop", ":")):
            if f"{key}_{mode}" in rows[0]:
                ax.plot(epochs, [r[f"{key}_{mode}"] for r in rows], style, color=line.get_color(),
                        label=f"{label}, {mode}")
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(-0.02, 1.02), title="training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _localization_lines(path: Path) -> list[str]:
    """The localization summary as a table, with the tied-dropout shares on a tied run."""
    if not path.is_file():
        return []
    summary = read_json_object(path)

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["", "## Localization", "",
             "| targets | count | unfitted | flipped | median channels | edited noisy acc |",
             "|---|---|---|---|---|---|"]
    for g, e in summary["groups"].items():
        lines.append(f"| {g} | {e['count']} | {e.get('unfitted', 0)} | {f(e['flip_rate'])} | "
                     f"{e['median_channels_flipped'] if e['median_channels_flipped'] is not None else '-'} | "
                     f"{f(e['edited_noisy_acc'])} |")
    if summary.get("tied"):
        lines += ["", "Example-tied dropout: of the channels zeroed at the tied sites, the share "
                  "that are memorization channels and the share that are the target's own "
                  "(kept by its training mask), beside their share of all channels there.", "",
                  "| targets | zeroed | memorization | (all channels) | own | (all channels) |",
                  "|---|---|---|---|---|---|"]
        for g, e in summary["groups"].items():
            t = e["tied"]
            lines.append(f"| {g} | {t['zeroed']} | {f(t['memorization_share'])} | "
                         f"{f(t['memorization_baseline'])} | {f(t['own_share'])} | "
                         f"{f(t['own_baseline'])} |")
    return lines


def _training_lines(run: RunDir, config, noise: dict, out: Path) -> list[str]:
    """The report's head for a run memkern trained: the setup, the curves, the last epoch."""
    rows = run.load_metrics()
    if not rows:
        raise RunDirError(f"{run.root} has no completed epoch in metrics.jsonl yet")
    missing = [k for k, _ in CURVES if any(k not in r for r in rows)]
    if missing:
        raise RunDirError(f"{run.metrics_path} lacks {missing[0]} in some lines; was it edited? "
                          f"restore it")
    plot_training_curves(rows, out / "training.png")
    last = rows[-1]
    lines = [f"# memkern report: {printable(run.root.name)}", "",
             f"{config.model} on {config.dataset}, {len(noise['noisy_indices'])} of "
             f"{noise['num_train']} training labels flipped (rate {config.noise}, seed "
             f"{config.seed}), {config.epochs} epochs" +
             (f", example-tied dropout p_gen={config.p_gen} p_mem={config.p_mem}"
              if config.tied_dropout else "") + ".", "",
             "## Training", "", "![training](training.png)", "",
             "| metric | last epoch |", "|---|---|"]
    return lines + [f"| {k} | {v:.4f} |" for k, v in sorted(last.items())
                    if isinstance(v, float) and k not in ("lr", "seconds")]


@locked(lambda a: hold_run(a["run_dir"]))
def write_report(run_dir: str | Path) -> Path:
    """Write ``report/training.png`` and ``report/index.md``; returns the index path."""
    run = RunDir(run_dir)
    config = run.load_config()
    noise = run.load_noise()
    out = run.root / "report"
    if config.imported:  # weights trained elsewhere: no training curves to show
        labels = (f"{len(noise['noisy_indices'])} of {noise['num_train']} training labels differ "
                  f"from the dataset's" if config.train_labels else "training labels unknown")
        lines = [f"# memkern report: {printable(run.root.name)}", "",
                 f"{config.model} on {config.dataset}, weights imported (trained outside "
                 f"memkern), {labels}."]
    else:
        lines = _training_lines(run, config, noise, out)
    figures = sorted(p for p in run.root.rglob("*.png") if out not in p.parents)
    tables = sorted(p for p in run.root.rglob("*") if p.suffix in (".csv", ".jsonl", ".json")
                    and out not in p.parents and p.parent == run.root)
    lines += _localization_lines(run.root / "localize_summary.json")
    if figures:
        lines += ["", "## Experiments", ""]
        lines += [printable(f"### {p.stem}\n\n![{p.stem}](../{p.relative_to(run.root)})\n")
                  for p in figures]
    if tables:
        lines += ["", "## Tables", ""]
        lines += [printable(f"- [{p.name}](../{p.name})") for p in tables]
    lines += ["", "## Config", "", "```json", json.dumps(json.loads(config.to_json()), indent=2),
              "```", ""]
    index = out / "index.md"
    atomic_write_text(index, "\n".join(lines))
    return index
