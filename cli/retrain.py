"""``memkern retrain``."""
from __future__ import annotations

import click

from memkern.cli.options import (data_dir_option, device_option, progress_option, run_option,
                                 trust_model_code_option)
from memkern.cli.options import split_names
from memkern.cli.rewind import groups_option
from memkern.experiments.retrain.run import DEFAULT_EPOCHS, DEFAULT_FROM_EPOCH


@click.command()
@run_option()
@groups_option
@click.option("--from-epoch", type=int, default=DEFAULT_FROM_EPOCH, show_default=True,
              help="Checkpoint the retrained group is reset to (0: the initialization).")
@click.option("--epochs", type=int, default=DEFAULT_EPOCHS, show_default=True,
              help="Fine-tuning epochs over the clean examples.")
@click.option("--lr", type=float, help="Peak learning rate of the cosine schedule "
              "[default: the run's].")
@click.option("--overwrite", is_flag=True,
              help="Start over instead of resuming an earlier retrain.csv.")
@data_dir_option
@device_option
@progress_option
@trust_model_code_option
def retrain(run_dir, groups, from_epoch, epochs, lr, overwrite, data_dir, device, progress):
    """Reset one layer group at a time to an early checkpoint, freeze the rest, fine-tune the
    group on clean examples only; write retrain.csv and retrain.png into the run directory.
    A killed call resumes: groups already in retrain.csv are skipped. On a text run the group
    is retrained on the windows holding no planted copy, and the table holds held-out bits per
    byte and the canaries' extraction and exposure by reps group (docs/text.md).

    \b
    Example:
      memkern retrain --run runs/digits
      memkern retrain --run runs/digits --groups block2,hidden --from-epoch 3 --epochs 5
    """
    from memkern.experiments.retrain.run import retrain as run_retrain
    from memkern.report.summaries import retrain_summary
    from memkern.report.text_summaries import is_text_metrics, text_retrain_summary

    rows = run_retrain(run=run_dir, groups=split_names(groups), from_epoch=from_epoch,
                       epochs=epochs, lr=lr, device=device, data_dir=data_dir,
                       overwrite=overwrite, progress=progress)
    text = bool(rows) and is_text_metrics(rows[0])
    click.echo((text_retrain_summary if text else retrain_summary)(rows))
    click.echo(f"{len({r['group'] for r in rows})} groups retrained; wrote {run_dir}/retrain.csv "
               f"and {run_dir}/retrain.png")
