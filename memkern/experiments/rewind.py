"""Layer rewinding (docs/method.md, Experiment 2): the final model with one layer group's parameters
*and* BatchNorm running statistics taken from an earlier checkpoint.

``rewind.json`` beside ``rewind.csv`` records what the table was computed from (the groups, the
epochs and every checkpoint's digest); a rerun on unchanged inputs reads the table back instead
of evaluating every configuration again.

(The reference code rewinds weights but keeps the final running statistics; here a group's
buffers travel with its parameters.) Every configuration is evaluated through
``torch.func.functional_call`` on one model instance with a swapped tensor dict: no model copy.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from memkern.rundir.atomic import atomic_write_json, read_json_object
from memkern.rundir.csv_tables import read_table, write_table
from memkern.errors import ConfigError
from memkern.training.evaluate import split_accuracies
from memkern.rundir.context import open_run, require_history
from memkern.report.figures.layers import plot_rewind
from memkern.experiments.localize.settings import checkpoint_digest
from memkern.rundir.locks import hold_run, locked
from memkern.rundir.ownership import require_figure_outputs, require_json_output
from memkern.network.models.groups import LayerGroup, layer_groups
from memkern.rundir.progress import Progress
from memkern.rundir.paths import RunDir

BASELINE = "final"  # the ``group`` of rewind.csv's row for the unchanged final model


def select_groups(model: nn.Module, names: list[str] | tuple[str, ...] | None) -> list[LayerGroup]:
    """The model's groups named in ``names`` (all when None or empty), in forward order."""
    groups = layer_groups(model)
    if not names:
        return groups
    known = {g.name for g in groups}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown layer group(s) {', '.join(unknown)}; this model's groups are "
                          f"{', '.join(g.name for g in groups)} (see `memkern sites`)")
    return [g for g in groups if g.name in names]


def with_group_from(state: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                    groups: list[LayerGroup]) -> dict[str, torch.Tensor]:
    """A shallow copy of ``state`` whose ``groups``' parameters and buffers come from ``source``
    (tensors are shared, not cloned)."""
    out = dict(state)
    for group in groups:
        for name in group.param_names + group.buffer_names:
            out[name] = source[name]
    return out


def default_epochs(available: list[int]) -> list[int]:
    """Epoch 0 and about every 10% of the run: for each target the nearest checkpoint before
    the final one (rewinding to the final epoch changes nothing)."""
    final = available[-1]
    earlier = [e for e in available if e < final]
    if not earlier:
        return []
    targets = [round(final * k / 10) for k in range(10)]
    return sorted({min(earlier, key=lambda e: (abs(e - t), e)) for t in targets})


def rewind_settings(run: RunDir, *, final: int, epochs: list[int],
                    groups: list[LayerGroup]) -> dict:
    """What rewind.csv depends on: the groups, the epochs and the digest of each checkpoint."""
    return {"final_epoch": final, "epochs": list(epochs), "groups": [g.name for g in groups],
            "checkpoint_sha256": {str(e): checkpoint_digest(run.checkpoint_path(e))
                                  for e in sorted({final, *epochs})}}


def _finished_rows(run: RunDir, settings: dict) -> list[dict] | None:
    """rewind.csv's rows when an earlier call computed them from the same inputs."""
    json_path, csv_path = run.root / "rewind.json", run.root / "rewind.csv"
    if not (json_path.is_file() and csv_path.is_file()):
        return None
    if read_json_object(json_path) != settings:
        return None
    rows = read_table(csv_path)
    return rows if len(rows) == 1 + len(settings["epochs"]) * len(settings["groups"]) else None


@locked(lambda a: hold_run(a["run"]))
def rewind(*, run: str | Path, epochs: list[int] | None = None,
           groups: list[str] | None = None, device: str = "auto",
           data_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Evaluate every (group, rewind epoch) of ``run``; write ``rewind.csv`` and ``rewind.png``
    into it. Returns the rows: the baseline (``group == "final"``, the final epoch) first, then
    ``{"group", "epoch", "clean_acc", "noisy_acc", "test_acc"}`` per configuration, grouped by
    epoch. Each checkpoint and the dataset are read once; when rewind.csv already holds these
    configurations of these checkpoints, its rows are returned without evaluating again."""
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
    ctx = open_run(run.root, device=device, data_dir=data_dir)
    model, data = ctx.model, ctx.data
    chosen = select_groups(model, groups)
    final = {k: v.detach() for k, v in model.state_dict().items()}
    settings = rewind_settings(run, final=available[-1], epochs=epochs, groups=chosen)
    finished = _finished_rows(run, settings)
    if finished is not None:
        plot_rewind(finished, run.root / "rewind.png", title=f"layer rewinding: {run.root.name}")
        return finished

    # One functional_call per configuration beats vmap over stacked dicts on CPU, where batched
    # weights turn each conv into a grouped conv. bench/bench_rewind.py (digits cnn, the 5
    # single-group configurations, 2 shared CPU cores): functional_call 7.00 s, vmap 7.82 s,
    # deep copy per configuration 9.29 s; on the 30-epoch run's 15 configurations: 14.0 s vs
    # vmap in chunks of 5: 24.4 s.
    # The bar counts rewound configurations only, as the command's closing line does; the final
    # model's baseline is evaluated before it starts.
    rows = [{"group": BASELINE, "epoch": available[-1], **split_accuracies(model, data)}]
    bar = Progress(total=len(epochs) * len(chosen), unit="config",
                   desc=f"rewind {run.root.name}", bar=progress)
    for epoch in epochs:
        earlier = ctx.state(epoch)
        for group in chosen:
            state = with_group_from(final, earlier, [group])
            rows.append({"group": group.name, "epoch": epoch,
                         **split_accuracies(model, data, state=state)})
            bar.advance()
        bar.step(f"rewound {len(chosen)} groups to epoch {epoch} "
                 f"({epochs.index(epoch) + 1}/{len(epochs)} epochs)")
    bar.close()
    (run.root / "rewind.json").unlink(missing_ok=True)  # never beside another table's rows
    write_table(run.root / "rewind.csv", rows)
    atomic_write_json(run.root / "rewind.json", settings)
    plot_rewind(rows, run.root / "rewind.png", title=f"layer rewinding: {run.root.name}")
    return rows
