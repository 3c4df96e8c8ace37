"""The versions and devices memkern runs with: one report for `memkern env` (bug reports) and
the GPU check's JSON (bench/gpucheck.py)."""
from __future__ import annotations

import os
import platform

import numpy
import torch

from memkern.kernels.channel_mask import kernel_path


def versions() -> dict[str, object]:
    """``{name: value}`` in display order; ``triton`` is None when it is not installed and
    ``cuda device`` present only where CUDA is."""
    import memkern

    out: dict[str, object] = {
        "memkern": memkern.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cpu threads": torch.get_num_threads(),
        "cuda available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        out["cuda device"] = torch.cuda.get_device_name()
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "unset")
    path = kernel_path("cuda" if torch.cuda.is_available() else "cpu")
    out["kernel path"] = "triton" if path == "triton" else "torch reference"
    return out
