"""``memkern retrain``: layer retraining (docs/method.md, Experiment 3) of every chosen group of a
run, written to ``retrain.csv`` and ``retrain.png``; the algorithm is
:func:`memkern.experiments.retrain.algorithm.retrain_group`.

``retrain.json`` beside the table records its settings: a killed call resumes, skipping the
groups already completed under the same settings.

On a text run the rows hold the text measures of a metrics.jsonl line (docs/text.md), the
group is retrained on the windows holding no planted copy, and retrain.png plots extraction of
the most-repeated canaries and held-out bits per byte per retraining epoch.
"""
from __future__ import annotations

import math
from pathlib import Path

from memkern.errors import ConfigError
from memkern.experiments.retrain.algorithm import retrain_group
from memkern.experiments.rewind.algorithm import select_groups, with_group_from
from memkern.report.figures.layers import plot_retrain, plot_text_retrain
from memkern.report.summaries import accuracy_text
from memkern.report.text_summaries import measure_text
from memkern.rundir.atomic import atomic_write_json, read_json_object
from memkern.rundir.context import open_run, require_history
from memkern.rundir.csv_tables import (read_measure_table, read_table, write_measure_table,
                                       write_table)
from memkern.rundir.locks import hold_run, locked
from memkern.rundir.ownership import require_figure_outputs, require_json_output
from memkern.rundir.paths import RunDir
from memkern.rundir.progress import Progress
from memkern.training.config import TrainConfig

# Default reset point: the initialization. It removes everything the group learned, so any
# noisy-train accuracy after retraining on clean data can only come from the frozen layers.
DEFAULT_FROM_EPOCH = 0
DEFAULT_EPOCHS = 10


def _settings(config: TrainConfig, *, final_epoch: int, from_epoch: int, epochs: int,
              lr: float) -> dict:
    return {"final_epoch": final_epoch, "from_epoch": from_epoch, "epochs": epochs, "lr": lr,
            "weight_decay": config.weight_decay, "batch_size": config.batch_size,
            "optimizer": config.optimizer}


def _resumable_rows(run: RunDir, settings: dict, *, overwrite: bool,
                    text: bool) -> list[dict]:
    """Rows of groups completed by an earlier call with the same settings."""
    csv_path, json_path = run.root / "retrain.csv", run.root / "retrain.json"
    if overwrite or not json_path.is_file():
        return []
    # A retrain.json from before the optimizer was recorded: retrained with SGD, whatever the run.
    saved = {"optimizer": "sgd", **read_json_object(json_path)}
    differing = sorted(k for k in settings if saved.get(k) != settings[k])
    if differing:
        was = ", ".join(f"{k}={saved.get(k)}" for k in differing)
        raise ConfigError(f"{csv_path} was made with {was}; rerun with those settings to resume "
                          f"it, or pass --overwrite to start over")
    rows = read_measure_table(csv_path) if text else read_table(csv_path)
    done = {g for g in {r["group"] for r in rows}
            if len({r["epoch"] for r in rows if r["group"] == g}) == settings["epochs"] + 1}
    return [r for r in rows if r["group"] in done]


@locked(lambda a: hold_run(a["run"]))
def retrain(*, run: str | Path, groups: list[str] | None = None,
            from_epoch: int = DEFAULT_FROM_EPOCH, epochs: int = DEFAULT_EPOCHS,
            lr: float | None = None, device: str = "auto", data_dir: str | Path | None = None,
            overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Retrain each group of ``run`` (all by default) from checkpoint ``from_epoch`` on clean
    data for ``epochs`` epochs at peak ``lr`` (default: the run's); write ``retrain.csv`` (after
    every completed group: a killed call resumes, skipping completed groups) and
    ``retrain.png``. Returns all rows ``{"group", "epoch", "clean_acc", "noisy_acc",
    "test_acc"}`` (a text run: ``{"group", "epoch", **text measures}``)."""
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr must be a positive finite number, got {lr}")
    run = RunDir(run)
    require_history(run.load_config(), "retrain")
    require_json_output(run.root / "retrain.json", keys=("from_epoch", "epochs"),
                        what="memkern's retrain settings")
    require_figure_outputs(run.root / "retrain.png")
    run.final_checkpoint()
    run.require_checkpoint(from_epoch)
    ctx = open_run(run.root, device=device, data_dir=data_dir, text_ok=True)
    model, data, config = ctx.model, ctx.data, ctx.config
    write = write_measure_table if config.text else write_table
    describe = measure_text if config.text else accuracy_text
    chosen = select_groups(model, groups)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    early = ctx.state(from_epoch)  # validates the reset checkpoint too
    lr = config.lr if lr is None else lr
    settings = _settings(config, final_epoch=ctx.checkpoint.epoch, from_epoch=from_epoch,
                         epochs=epochs, lr=lr)
    rows = _resumable_rows(run, settings, overwrite=overwrite, text=config.text)

    done = {r["group"] for r in rows}
    todo = [g for g in chosen if g.name not in done]
    # Every input checked: now write. Table first, then settings: a kill between the two
    # leaves no rows under foreign settings.
    write(run.root / "retrain.csv", rows)
    atomic_write_json(run.root / "retrain.json", settings)
    steps = math.ceil(int((~data.noisy_mask).sum()) / config.batch_size) * epochs
    bar = Progress(total=steps * len(todo), unit="step", desc=f"retrain {run.root.name}",
                   bar=progress)
    for group in todo:
        model.load_state_dict(with_group_from(final, early, [group]))
        rows += retrain_group(
            model, group, data, epochs=epochs, lr=lr, weight_decay=config.weight_decay,
            batch_size=config.batch_size, seed=config.seed, momentum=config.momentum,
            optimizer=config.optimizer, on_step=bar.advance,
            on_epoch=lambda row: bar.step(f"{row['group']} epoch {row['epoch']}/{epochs}  "
                                          f"{describe(row)}"))
        write(run.root / "retrain.csv", rows)
    bar.close()
    write(run.root / "retrain.csv", rows)
    plot = plot_text_retrain if config.text else plot_retrain
    plot(rows, run.root / "retrain.png",
         title=f"retraining one group on clean data (reset to epoch {from_epoch}): "
               f"{run.root.name}")
    return rows
