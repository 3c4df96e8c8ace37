"""Options shared by several commands, defined once."""
from __future__ import annotations

import click

device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]),
                             default="auto", show_default=True,
                             help="auto: CUDA when available, else CPU.")
data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False),
                               help="Directory with the dataset's standard files "
                                    "(not needed for digits); overrides the checkpoint's.")
