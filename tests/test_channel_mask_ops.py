"""The channel-mask ops as registered torch.library ops: schema/fake/autograd checks
(torch.library.opcheck), vmap rules against the unbatched op, torch.func per-example gradients
through tied dropout against a one-row loop, and torch.compile (inductor, CPU) against eager."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from memkern.kernels.channel_mask import gathered_channel_mask, tied_channel_mask
from memkern.kernels.channel_mask_ops import (
    gathered_channel_mask_backward_op, gathered_channel_mask_op, tied_channel_mask_op,
)
from memkern.network.models import build_model
from memkern.network.sites import example_indices
from memkern.network.tied_dropout import attach_tied_dropout

TIED = dict(seed=11, p_gen=0.25, p_mem=0.5)


def _x(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("channel_dim,shape", [(1, (5, 6, 3, 2)), (-1, (4, 7, 6)), (1, (3, 6))])
@pytest.mark.parametrize("mode", ["train", "keep", "drop"])
def test_opcheck_tied(channel_dim, shape, mode):
    x = _x(shape).requires_grad_(True)
    ids = torch.randint(0, 10_000, (shape[0],)) if mode == "train" else None
    torch.library.opcheck(tied_channel_mask_op, (x, ids, 11, 0.25, 0.5, mode, channel_dim, "auto"))


@pytest.mark.parametrize("channel_dim,shape", [(1, (5, 6, 3, 2)), (-1, (4, 7, 6)), (1, (3, 6))])
def test_opcheck_gathered(channel_dim, shape):
    x = _x(shape).requires_grad_(True)
    mask = _x((shape[0], shape[channel_dim]), seed=1).requires_grad_(True)
    torch.library.opcheck(gathered_channel_mask_op, (x, mask, channel_dim, "auto"))
    g = _x(shape, seed=2)
    torch.library.opcheck(gathered_channel_mask_backward_op,
                          (g, x.detach(), mask.detach(), channel_dim, True, True, "auto"))


@pytest.mark.parametrize("batched_ids", [True, False])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_vmap_of_tied_equals_flattened_rows(batched_ids, channel_dim):
    x = _x((4, 3, 8, 5))  # vmap over 4, rows 3
    ids = torch.randint(0, 1000, (4, 3) if batched_ids else (3,))
    f = lambda a, i: tied_channel_mask(a, i, mode="own", channel_dim=channel_dim, **TIED)
    got = vmap(f, in_dims=(0, 0 if batched_ids else None))(x, ids)
    flat_ids = ids.flatten() if batched_ids else ids.repeat(4)
    want = tied_channel_mask(x.flatten(0, 1), flat_ids, mode="own", channel_dim=channel_dim,
                             **TIED).view_as(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_vmap_of_gathered_forward_and_backward():
    x, mask, g = _x((4, 3, 6, 5)), _x((4, 3, 6), seed=1), _x((4, 3, 6, 5), seed=2)

    def loss(a, m, gg):
        return (gathered_channel_mask(a, m) * gg).sum()

    ga, gm = vmap(grad(loss, argnums=(0, 1)))(x, mask, g)
    torch.testing.assert_close(ga, g * mask[..., None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gm, (g * x).sum(-1), rtol=1e-12, atol=1e-12)


def _tied_model(name="cnn"):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=1, image_size=8).double().eval()
    attach_tied_dropout(model, sites=list(model.default_dropout_sites), p_gen=0.2, p_mem=0.3,
                        seed=4)
    return model


@pytest.mark.parametrize("name", ["cnn", "mlp", "vit"])
def test_vmap_grad_through_tied_dropout_equals_one_row_loop(name):
    model = _tied_model(name)
    x, y = _x((5, 1, 8, 8), seed=3), torch.randint(0, 10, (5,))
    ids = torch.tensor([7, 1_000, 3, 123_456, 42])
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi, ii):
        with example_indices(ii[None]):
            logits = functional_call(model, (p, buffers), (xi[None],))
        return F.cross_entropy(logits, yi[None])

    batched = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, y, ids)
    for b in range(len(x)):
        model.zero_grad()
        with example_indices(ids[b:b + 1]):
            F.cross_entropy(model(x[b:b + 1]), y[b:b + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(batched[k][b], p.grad, rtol=1e-10, atol=1e-12,
                                       msg=f"{name} row {b} param {k}")
    # each example really had its own mask: another index changes the gradient
    other = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, x, y, ids + 1)
    assert any(not torch.equal(other[k], batched[k]) for k in batched)


def test_compile_of_tied_model_equals_eager_forward_and_backward():
    torch._dynamo.reset()
    model = _tied_model().float()
    x, y = _x((6, 1, 8, 8), torch.float32, seed=5), torch.randint(0, 10, (6,))
    ids = torch.arange(100, 106)

    def step(forward):
        model.zero_grad()
        with example_indices(ids):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    eager_loss, eager_grads = step(model)
    loss, grads = step(torch.compile(model, backend="inductor", fullgraph=True))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for k in eager_grads:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-4, atol=1e-6, msg=k)
