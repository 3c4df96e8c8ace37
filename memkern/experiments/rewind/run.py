"""``memkern rewind``: layer rewinding (docs/method.md, Experiment 2) over a run's checkpoints,
written to ``rewind.csv`` and ``rewind.png``; the algorithm is
:func:`memkern.experiments.rewind.algorithm.rewind_accuracies`.

``rewind.json`` beside ``rewind.csv`` records what the table was computed from (the groups, the
epochs and every checkpoint's digest); a rerun on unchanged inputs reads the table back instead
of evaluating every configuration again.

On a text run the rows hold the text measures of a metrics.jsonl line instead of accuracies
(:func:`memkern.experiments.rewind.text.rewind_text_measures`; docs/text.md), and rewind.png
plots extraction of the most-repeated canaries against held-out bits per byte.
"""
from __future__ import annotations

from pathlib import Path

from memkern.experiments.localize.settings import checkpoint_digest
from memkern.experiments.rewind.algorithm import (default_epochs, rewind_accuracies,
                                                  select_groups)
from memkern.experiments.rewind.text import rewind_text_measures
from memkern.network.models.groups import LayerGroup
from memkern.report.figures.layers import plot_rewind, plot_text_rewind
from memkern.rundir.atomic import atomic_write_json, read_json_object
from memkern.rundir.context import open_run, require_history
from memkern.rundir.csv_tables import (read_measure_table, read_table, write_measure_table,
                                       write_table)
from memkern.rundir.locks import hold_run, locked
from memkern.rundir.ownership import require_figure_outputs, require_json_output
from memkern.rundir.paths import RunDir
from memkern.rundir.progress import Progress
from memkern.training.text_evaluate import EPOCH_CANDIDATES


def rewind_settings(run: RunDir, *, final: int, epochs: list[int],
                    groups: list[LayerGroup], text: bool = False) -> dict:
    """What rewind.csv depends on: the groups, the epochs and the digest of each checkpoint (a
    text run's table also on the rank search's budget)."""
    out = {"final_epoch": final, "epochs": list(epochs), "groups": [g.name for g in groups],
           "checkpoint_sha256": {str(e): checkpoint_digest(run.checkpoint_path(e))
                                 for e in sorted({final, *epochs})}}
    if text:
        out["max_candidates"] = EPOCH_CANDIDATES
    return out


def _finished_rows(run: RunDir, settings: dict, *, text: bool) -> list[dict] | None:
    """rewind.csv's rows when an earlier call computed them from the same inputs."""
    json_path, csv_path = run.root / "rewind.json", run.root / "rewind.csv"
    if not (json_path.is_file() and csv_path.is_file()):
        return None
    if read_json_object(json_path) != settings:
        return None
    rows = read_measure_table(csv_path) if text else read_table(csv_path)
    return rows if len(rows) == 1 + len(settings["epochs"]) * len(settings["groups"]) else None


@locked(lambda a: hold_run(a["run"]))
def rewind(*, run: str | Path, epochs: list[int] | None = None,
           groups: list[str] | None = None, device: str = "auto",
           data_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Evaluate every (group, rewind epoch) of ``run``; write ``rewind.csv`` and ``rewind.png``
    into it. Returns the rows: the baseline (``group == "final"``, the final epoch) first, then
    ``{"group", "epoch", "clean_acc", "noisy_acc", "test_acc"}`` (a text run: ``{"group",
    "epoch", **text measures}``) per configuration, grouped by epoch. Each checkpoint and the
    dataset are read once; when rewind.csv already holds these configurations of these
    checkpoints, its rows are returned without evaluating again."""
    run = RunDir(run)
    require_history(run.load_config(), "rewind")
    require_json_output(run.root / "rewind.json", keys=("epochs", "groups"),
                        what="memkern's rewind settings")
    require_figure_outputs(run.root / "rewind.png")
    available = run.epochs()
    if not available:
        run.final_checkpoint()  # the error naming what is missing
    epochs = default_epochs(available) if epochs is None else list(epochs)
    for epoch in epochs:
        run.require_checkpoint(epoch)
    ctx = open_run(run.root, device=device, data_dir=data_dir, text_ok=True)
    model, data, text = ctx.model, ctx.data, ctx.config.text
    chosen = select_groups(model, groups)
    settings = rewind_settings(run, final=available[-1], epochs=epochs, groups=chosen, text=text)
    plot = plot_text_rewind if text else plot_rewind
    title = f"layer rewinding: {run.root.name}"
    finished = _finished_rows(run, settings, text=text)
    if finished is not None:
        plot(finished, run.root / "rewind.png", title=title)
        return finished

    # The bar counts rewound configurations only, as the command's closing line does; the final
    # model's baseline is not one of them.
    bar = Progress(total=len(epochs) * len(chosen), unit="config",
                   desc=f"rewind {run.root.name}", bar=progress)

    def on_row(row: dict) -> None:
        bar.advance()
        if row["group"] == chosen[-1].name:
            bar.step(f"rewound {len(chosen)} groups to epoch {row['epoch']} "
                     f"({epochs.index(row['epoch']) + 1}/{len(epochs)} epochs)")

    measure = rewind_text_measures if text else rewind_accuracies
    rows = measure(model, data, states=((e, ctx.state(e)) for e in epochs), groups=chosen,
                   final_epoch=available[-1], on_row=on_row)
    bar.close()
    (run.root / "rewind.json").unlink(missing_ok=True)  # never beside another table's rows
    (write_measure_table if text else write_table)(run.root / "rewind.csv", rows)
    atomic_write_json(run.root / "rewind.json", settings)
    plot(rows, run.root / "rewind.png", title=title)
    return rows
