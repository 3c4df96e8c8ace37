"""``memkern env``: versions and devices, for bug reports."""
from __future__ import annotations

import click


@click.command()
def env():
    """Print versions, devices and the Triton status.

    \b
    Example:
      memkern env
    """
    from memkern.versions import versions

    for k, v in versions().items():
        if k == "triton" and v is None:
            v = "not installed (CPU path: vectorized torch reference)"
        click.echo(f"{k:<17} {v}")
