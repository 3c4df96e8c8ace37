"""Gate the GPU in one place: without CUDA, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this runs before
any memkern.kernels module is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real 3-epoch digits MLP run with 10% label noise: checkpoints 0..3 (about 5 s)."""
    from memkern.config import TrainConfig
    from memkern.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(model="mlp", epochs=3, noise=0.1), out=out, device="cpu", progress=False)
    return out
