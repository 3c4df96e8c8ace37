"""Options shared by several commands, defined once."""
from __future__ import annotations

import click

from pathlib import Path

from memkern.errors import ConfigError
from memkern.experiment import DEVICES
from memkern.runs import RunDir

device_option = click.option("--device", type=click.Choice(DEVICES),
                             default="auto", show_default=True,
                             help="auto: CUDA when available, else CPU.")
data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False),
                               help="Directory with the dataset's standard files "
                                    "(not needed for digits); overrides the checkpoint's.")


def checkpoint_options(what: str):
    """``--ckpt PATH`` or ``--run DIR`` (that run's final checkpoint), exactly one of them; the
    command gets ``ckpt`` and ``run_dir`` and passes them to :func:`checkpoint_from`."""
    def decorate(command):
        command = click.option("--run", "run_dir", type=click.Path(file_okay=False),
                               help="Run directory: use its final checkpoint.")(command)
        return click.option("--ckpt", type=click.Path(dir_okay=False),
                            help=f"{what}; or give --run.")(command)
    return decorate


def checkpoint_from(ckpt: str | None, run_dir: str | None) -> Path:
    """The checkpoint named by ``--ckpt``, or the final one of ``--run``."""
    if (ckpt is None) == (run_dir is None):
        raise ConfigError(f"give {'only one of' if ckpt else 'one of'} --ckpt (a checkpoint) and "
                          f"--run (a run directory: its final checkpoint)")
    return Path(ckpt) if ckpt is not None else RunDir(run_dir).final_checkpoint()


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
