"""``memkern report``."""
from __future__ import annotations

import click

from memkern.cli.options import run_option


@click.command()
@run_option()
@click.option("--compare", "compare_dir", type=click.Path(file_okay=False),
              help="A second run shown side by side (a plain and a tied-dropout run: the "
                   "tied-dropout comparison of docs/method.md, Experiment 5).")
def report(run_dir, compare_dir):
    """Write RUN/report/index.html: one self-contained page (figures embedded) with the
    findings of every analysis the run holds, in words, figures and tables.

    \b
    Example:
      memkern report --run runs/digits
      memkern report --run runs/demo/plain --compare runs/demo/tied
    """
    from memkern.errors import printable
    from memkern.report.page import write_report

    path = write_report(run=run_dir, compare=compare_dir)
    click.echo(f"report written to {printable(str(path))}")
