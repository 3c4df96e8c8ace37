"""``memkern demo``."""
from __future__ import annotations

import click

from memkern.cli.options import device_option, progress_option


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@device_option
@progress_option
def demo(out, device, progress):
    """Run every experiment on the embedded digits data (minutes on a laptop CPU; rerun the same
    command to resume: finished steps are not computed again).

    Trains a cnn with 10% label noise with and without example-tied dropout, then runs
    gradient accounting, layer rewinding, retraining, localization (reference batch 128) and
    the memorization scores (without cleanlab's cross-validation) on both, and writes one
    report page that shows the two runs side by side (OUT/report/index.html).

    \b
    Example:
      memkern demo --out runs/demo
    """
    from pathlib import Path

    from memkern.demo import run_demo
    from memkern.report.summaries import run_findings

    page = run_demo(out=out, device=device, progress=progress,
                    say=lambda line: click.echo(line, err=True))
    for name in ("plain", "tied"):
        click.echo(f"{name} run ({Path(out) / name}):")
        for line in run_findings(Path(out) / name):
            click.echo(f"  {line}")
    click.echo(f"report (plain and tied runs side by side): {page}")
