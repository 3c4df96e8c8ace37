"""Options shared by several commands, defined once."""
from __future__ import annotations

import click

from memkern.errors import ConfigError
from memkern.experiment import DEVICES

device_option = click.option("--device", type=click.Choice(DEVICES),
                             default="auto", show_default=True,
                             help="auto: CUDA when available, else CPU.")
data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False),
                               help="Directory with the dataset's standard files "
                                    "(not needed for digits); overrides the checkpoint's.")


def parse_epochs(text: str | None, *, option: str = "--epochs") -> list[int] | None:
    """``"0,10,20"`` -> ``[0, 10, 20]``; None or empty -> None (the command's default)."""
    if not text:
        return None
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers such as 0,10,20, got {text!r}")


def split_names(values: tuple[str, ...]) -> list[str]:
    """Repeated and/or comma-separated option values, flattened."""
    return [n for v in values for n in v.split(",") if n]
