"""``memkern rewind``."""
from __future__ import annotations

import click

from memkern.cli.options import (data_dir_option, device_option, parse_epochs, progress_option,
                                 run_option, split_names, trust_model_code_option)


groups_option = click.option("--groups", multiple=True,
                             help="Layer groups (comma-separated or repeated); default: all. "
                                  "See `memkern sites`.")


@click.command()
@run_option()
@click.option("--epochs", help="Comma-separated checkpoint epochs to rewind to "
              "[default: 0 and about every 10% of the run].")
@groups_option
@data_dir_option
@device_option
@progress_option
@trust_model_code_option
def rewind(run_dir, epochs, groups, data_dir, device, progress):
    """Rewind each layer group (weights and BatchNorm statistics) of a run's final model to
    earlier checkpoints; write rewind.csv and rewind.png into the run directory.

    On a text run the table holds held-out bits per byte and the canaries' extraction and
    exposure by reps group instead of accuracies (docs/text.md).

    \b
    Example:
      memkern rewind --run runs/digits
      memkern rewind --run runs/digits --epochs 0,10,20 --groups block1,head
    """
    from memkern.experiments.rewind.run import rewind as run_rewind
    from memkern.report.summaries import rewind_summary
    from memkern.report.text_summaries import is_text_metrics, text_rewind_summary

    rows = run_rewind(run=run_dir, epochs=parse_epochs(epochs), groups=split_names(groups),
                      device=device, data_dir=data_dir, progress=progress)
    text = bool(rows) and is_text_metrics(rows[0])
    click.echo((text_rewind_summary if text else rewind_summary)(rows))
    click.echo(f"{len(rows) - 1} configurations evaluated; wrote {run_dir}/rewind.csv and "
               f"{run_dir}/rewind.png")
