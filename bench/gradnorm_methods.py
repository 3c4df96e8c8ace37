"""Per-example gradient norm methods benchmarked side by side (bench_gradnorms.py), and a
``__main__`` measuring one method's peak memory in a fresh process.

Every method maps ``(model, x, y)`` to a callable that computes every example's gradient norm
(or, for ``plain``, one ordinary forward and backward of the mean loss: the floor).
A peer that is not installed raises ImportError at set-up.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from memkern.experiments.gradients.norms import per_example_grad_norms
from memkern.network.models import build_model


def make_case(norm: str, batch: int, seed: int = 0):
    """ResNet-9 at 32x32, 3 channels, random data, in eval mode."""
    torch.manual_seed(seed)
    model = build_model("resnet9", num_classes=10, in_channels=3, image_size=32, norm=norm).eval()
    return model, torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))


def plain(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return run


def memkern_mode(mode):
    return lambda model, x, y: (lambda: per_example_grad_norms(model, x, y, mode=mode))


def torch_func_materialized(model, x, y):
    """All per-example gradients at once (``[B, *param]`` each), then their norms."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    def run():
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.stack([g.flatten(1).square().sum(1) for g in grads.values()], 1).sum(1).sqrt()
    return run


def opacus_hooks(model, x, y):
    from opacus import GradSampleModule
    # Opacus captures activations only in train mode; it refuses BatchNorm (buffers) anyway.
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum", strict=False).train()

    def run():
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        return torch.stack([p.grad_sample.flatten(1).square().sum(1)
                            for p in gsm.parameters()], 1).sum(1).sqrt()
    return run


def opacus_ghost(model, x, y):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(model), loss_reduction="sum",
                                               strict=False, use_ghost_clipping=True).train()

    def run():
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        return gsm.get_norm_sample()
    return run


def backpack_l2(model, x, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad
    net = extend(copy.deepcopy(model))
    lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

    def run():
        net.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            lossfunc(net(x), y).backward()
        return torch.stack([p.batch_l2 for p in net.parameters()], 1).sum(1).sqrt()
    return run


METHODS = {  # "plain" and "naive loop" first: the others report ratios to them
    "plain fwd+bwd": plain,
    "naive loop": memkern_mode("loop"),
    "memkern ghost": memkern_mode("ghost"),
    "memkern func": memkern_mode("func"),
    "torch.func materialized": torch_func_materialized,
    "opacus hooks": opacus_hooks,
    "opacus ghost": opacus_ghost,
    "backpack BatchL2Grad": backpack_l2,
}


def _peak_rss_bytes() -> int:
    """VmHWM (Linux): this process's peak resident set. Not ru_maxrss: a child inherits its
    parent's at fork, which hid every call's growth when run from a big pytest process."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory needs Linux)")


if __name__ == "__main__":
    # python gradnorm_methods.py METHOD NORM BATCH -> {"peak_extra_bytes": ...}: the growth of
    # the process's peak resident set over one call, after model, data and set-up exist.
    name, norm, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, x, y = make_case(norm, batch)
    run = METHODS[name](model, x, y)
    before = _peak_rss_bytes()
    run()
    print(json.dumps({"peak_extra_bytes": _peak_rss_bytes() - before}))
