"""Gate the GPU in one place: without CUDA, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this runs before
any memkern.kernels module is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
