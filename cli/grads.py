"""``memkern grads``."""
from __future__ import annotations

import click

from memkern.cli.options import (data_dir_option, device_option, progress_option, run_option,
                                 trust_model_code_option)


@click.command()
@run_option("Run directory written by `memkern train` (under torchrun write --run-dir: "
            "torchrun takes --run for its own --run-path).", aliases=("--run-dir",))
@click.option("--epochs", help="Comma-separated epochs, e.g. 0,5,10. [default: all checkpoints]")
@click.option("--mode", type=click.Choice(["auto", "ghost", "func", "loop"]), default="auto",
              show_default=True, help="How per-example norms are computed (loop: reference).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@data_dir_option
@device_option
@progress_option
@trust_model_code_option
def grads(run_dir, epochs, mode, batch_size, data_dir, device, progress):
    """Per-example, per-layer gradient norms and clean/noisy gradient accounting of a run.

    Writes RUN/grads/: summary.csv (per epoch x layer group: summed clean and noisy gradient
    norms, their cosine, per-example norm statistics), per_example_epoch_NNN.csv (every
    example's per-group norms), summed_norms.png and cosine.png. On a text run an example is a
    window (its mean next-byte loss) and the noisy split its planted windows (docs/text.md).
    Complete epochs are skipped on a rerun. Under torchrun the examples are split over the
    ranks and rank 0 writes the files, equal to one process's.

    \b
    Example:
      memkern grads --run runs/digits --epochs 0,10,20,30
      torchrun --nproc-per-node 2 -m memkern.cli grads --run-dir runs/digits
    """
    from memkern.experiments.gradients.run import gradient_accounting, summary_path
    from memkern.cli.options import parse_epochs
    from memkern.report.summaries import accounting_summary
    from memkern.rundir.csv_tables import read_csv
    from memkern.training.distributed import World

    run = gradient_accounting(run=run_dir, epochs=parse_epochs(epochs), mode=mode,
                              batch_size=batch_size, device=device, data_dir=data_dir,
                              progress=progress)
    if World.from_env().main:  # under torchrun, rank 0 wrote the files
        click.echo(accounting_summary(read_csv(summary_path(run)), text=run.load_config().text))
        click.echo(f"gradient accounting saved to {run.grads}")
