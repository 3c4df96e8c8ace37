"""Gate the GPU in one place: without CUDA, Triton kernels run under the interpreter; with
CUDA, the tests that call the kernels on CPU tensors (backend="triton") run the real kernels
on the GPU: the launchers get copies of their tensors on the GPU and hand back CPU results.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so this runs before
any memkern.kernels module is imported.
"""
import os

import shutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: calls the Triton kernels (backend='triton') on "
                            "CPU tensors; skipped where neither CUDA nor the interpreter runs them")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
    for item in items:
        if item.get_closest_marker("kernels"):
            item.add_marker(skip)


def _on_gpu(launcher):
    """``launcher`` run on GPU copies of its tensors, results back on the first one's device."""
    def run(*args, **kwargs):
        home = args[0].device
        out = launcher(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
        if isinstance(out, tuple):
            return tuple(t.to(home) if isinstance(t, torch.Tensor) else t for t in out)
        return out.to(home)
    return run


@pytest.fixture(autouse=True)
def _kernels_on_gpu(monkeypatch):
    if not torch.cuda.is_available():
        return
    try:
        from memkern.kernels import channel_mask, channel_mask_triton
    except ImportError:  # no triton: the tests of the kernels skip
        return
    monkeypatch.setattr(channel_mask, "interpreter_active", lambda: True)
    for name in ("tied_apply", "gathered_fwd", "gathered_bwd"):
        monkeypatch.setattr(channel_mask_triton, name, _on_gpu(getattr(channel_mask_triton, name)))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real 3-epoch digits MLP run with 10% label noise: checkpoints 0..3 (about 5 s)."""
    from memkern.training.config import TrainConfig
    from memkern.training.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(model="mlp", epochs=3, noise=0.1), out=out, device="cpu", progress=False)
    return out


@pytest.fixture
def run(tiny_run, tmp_path):
    """A writable copy of :func:`tiny_run` (with its manifest), for tests that edit or lock it."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy
