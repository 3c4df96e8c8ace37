"""``memkern report``."""
from __future__ import annotations

import click


@click.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory written by `memkern train`.")
def report(run_dir):
    """Write RUN/report/index.md with training curves and every experiment figure in the run.

    \b
    Example:
      memkern report --run runs/digits
    """
    from memkern.errors import printable
    from memkern.report import write_report

    click.echo(f"report written to {printable(str(write_report(run_dir)))}")
