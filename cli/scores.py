"""``memkern scores``."""
from __future__ import annotations

import click

from memkern.cli.options import (data_dir_option, device_option, parse_epochs, progress_option,
                                 run_option, trust_model_code_option)


@click.command()
@run_option()
@click.option("--compute", is_flag=True, help="First add the cheap signals the run lacks: "
              "dynamics from the checkpoints, gradient norms, localization of top candidates.")
@click.option("--grad-epochs", help="Epochs of per-example gradient norms for --compute. "
              "[default: 10% of training and the final epoch]")
@click.option("--localize-top", type=int, default=64, show_default=True,
              help="--compute localizes this many highest combined scores (0: none).")
@click.option("--top", type=int, default=32, show_default=True,
              help="Examples per image grid.")
@click.option("--benchmark", is_flag=True, help="AUROC / AP / precision@k of every signal "
              "for finding the flipped labels, beside cleanlab on K-fold cross-validation.")
@click.option("--folds", type=int, default=5, show_default=True,
              help="K of cleanlab's cross-validation (K trainings; 0: leave cleanlab out).")
@click.option("--cv-epochs", type=int, help="Epochs of each cross-validation training "
              "(quick checks only). [default: the run's]")
@data_dir_option
@device_option
@progress_option
@trust_model_code_option
def scores(run_dir, compute, grad_epochs, localize_top, top, benchmark, folds, cv_epochs,
           data_dir, device, progress):
    """Which training examples did the model memorize? Every per-example signal side by side.

    Writes RUN/scores.csv (one row per training example: index, label, original_label, noisy,
    one column per signal the run holds, memorization_score) and RUN/scores/top_*.png (the
    highest-ranked examples of each signal, with trained and original labels). Signals the run
    lacks are listed with the command that adds them. See docs/scores.md.

    \b
    Example:
      memkern scores --run runs/digits
      memkern scores --run runs/digits --compute --benchmark
    """
    from memkern.experiments.scores.run import score_run
    from memkern.report.summaries import benchmark_table, text_table

    result = score_run(run=run_dir, compute=compute, benchmark=benchmark, top=top,
                       grad_epochs=parse_epochs(grad_epochs, option="--grad-epochs"),
                       localize_top=localize_top, folds=folds, cv_epochs=cv_epochs,
                       device=device, data_dir=data_dir, progress=progress)
    if hasattr(result, "benchmark_path"):  # a text run
        click.echo(text_scores_summary(result))
        return
    for line in result.computed:
        click.echo(f"computed: {line}")
    click.echo(f"scores of {len(result.table.signals)} signals saved to {result.path}")
    reasons: dict[str, list[str]] = {}
    for name, why in result.table.missing.items():
        reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
        click.echo(f"missing {', '.join(names)}: {why}")
    click.echo(f"image grids: {result.grids[0].parent}" if result.grids else "no image grids")
    click.echo(top_examples(result.table))
    if result.benchmark is not None:
        header, cells = benchmark_table(result.benchmark.rows)
        click.echo("how well each signal finds the flipped labels, best first:")
        click.echo(text_table(header, cells))
        click.echo(f"benchmark saved to {result.benchmark.csv} and {result.benchmark.figure}")


def text_scores_summary(result) -> str:
    """What `memkern scores` found on a text run, in lines."""
    from memkern.report.summaries import text_table

    lines = [f"scores of {len(result.signals)} signals for {len(result.rows)} windows saved to "
             f"{result.path}"]
    top = sorted(result.rows, key=lambda r: -r["memorization_score"])[:10]
    lines.append("highest memorization score: " + ", ".join(
        f"window {r['index']}" + (f" (insert {r['insert']}, {r['reps']} copies)"
                                  if r["insert"] >= 0 else " (plain text)") for r in top))
    if result.benchmark:
        groups = [k for k in result.benchmark[0] if k.startswith("auroc_r")]
        lines.append("how well each signal finds the planted windows, best first:")
        lines.append(text_table(
            ["signal", "windows", "AUROC", "AP", *[f"AUROC {g[6:]} copies" for g in groups]],
            [[r["signal"], str(r["covered"]), f"{r['auroc']:.3f}", f"{r['ap']:.3f}",
              *[f"{r[g]:.3f}" for g in groups]] for r in result.benchmark]))
        lines.append(f"benchmark saved to {result.benchmark_path}")
    return "\n".join(lines)


def top_examples(table, k: int = 10) -> str:
    """The ``k`` examples the combined memorization_score ranks highest, with their labels and
    the score; on a run with label noise, how many of them have flipped labels."""
    from memkern.report.figures.scores import top_indices
    from memkern.report.summaries import text_table

    name = "memorization_score"
    if name not in table.signals:
        return "no combined memorization_score: the run holds no signal yet"
    chosen = top_indices(name, table.signals[name], k)
    labels, original = table.meta["label"], table.meta["original_label"]
    rows = [[int(i), int(labels[i]), int(original[i]),
             "yes" if labels[i] != original[i] else "", f"{table.signals[name][i]:.4g}"]
            for i in chosen]
    head = f"the {len(chosen)} examples ranked most memorized ({name}"
    head += (f"; {int(table.noisy[chosen].sum())} of them have flipped labels):"
             if table.noisy.any() else "):")
    return head + "\n" + text_table(("index", "label", "original", "flipped", name), rows)
