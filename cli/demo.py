"""``memkern demo``."""
from __future__ import annotations

import click

from memkern.cli.options import device_option, progress_option


@click.command()
@click.option("--out", type=click.Path(file_okay=False),
              help="Where the runs go. [default: runs/demo; --text: runs/demo-text]")
@click.option("--text", is_flag=True, help="The language-model study instead: a byte GPT with "
              "planted canaries, localized and scored (docs/text.md).")
@device_option
@progress_option
def demo(out, text, device, progress):
    """Run every experiment on the embedded digits data (minutes on a laptop CPU; rerun the same
    command to resume: finished steps are not computed again).

    Trains a cnn with 10% label noise with and without example-tied dropout, then runs
    gradient accounting, layer rewinding, retraining, localization (reference batch 128) and
    the memorization scores (without cleanlab's cross-validation) on both, and writes one
    report page that shows the two runs side by side (OUT/report/index.html).

    With --text: a 2-layer byte GPT on 20 KB of the standard library's sources with 8 canaries
    (half planted once, half 128 times), with and without example-tied dropout; every canary
    localized in the MLP neurons, every window scored, and the same side-by-side page.

    \b
    Example:
      memkern demo --out runs/demo
      memkern demo --text
    """
    from pathlib import Path

    from memkern.demo import run_demo, run_text_demo
    from memkern.report.summaries import run_findings

    out = out if out is not None else ("runs/demo-text" if text else "runs/demo")
    page = (run_text_demo if text else run_demo)(
        out=out, device=device, progress=progress, say=lambda line: click.echo(line, err=True))
    for name in ("plain", "tied"):
        click.echo(f"{name} run ({Path(out) / name}):")
        for line in run_findings(Path(out) / name):
            click.echo(f"  {line}")
    click.echo(f"report (plain and tied runs side by side): {page}")
