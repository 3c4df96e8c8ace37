"""``memkern env``: versions and devices, for bug reports."""
from __future__ import annotations

import os
import platform

import click


@click.command()
def env():
    """Print versions, devices and the Triton status.

    \b
    Example:
      memkern env
    """
    import numpy
    import torch

    import memkern
    from memkern.rundir.context import resolve_device
    from memkern.kernels.channel_mask import kernel_path

    lines = {
        "memkern": memkern.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu threads": torch.get_num_threads(),
        "cuda available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        lines["cuda device"] = torch.cuda.get_device_name()
    try:
        import triton
        lines["triton"] = triton.__version__
    except ImportError:
        lines["triton"] = "not installed (CPU path: vectorized torch reference)"
    lines["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "unset")
    path = kernel_path(resolve_device("auto"))
    lines["kernel path"] = "triton" if path == "triton" else "torch reference"
    for k, v in lines.items():
        click.echo(f"{k:<17} {v}")
