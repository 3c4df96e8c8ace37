"""The batched ablation scan against the naive loop of full forwards, and the gradient score."""
import pytest
import torch
import torch.nn.functional as F

from memkern.localize.channels import channel_space, row_masks, set_masks
from memkern.localize.scan import ablation_scan, naive_ablation_scan
from memkern.models import build_model


def _random_model(name, cin, size, dtype):
    """Fresh weights and non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=cin, image_size=size).to(dtype).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def _check(a, b, tol):
    err = (a - b).abs()
    worst = int(err.nan_to_num(float("inf")).argmax())
    assert torch.equal(a.isnan(), b.isnan())
    assert err.nan_to_num(0).max() <= tol, f"worst channel {worst}: {a[worst]} vs {b[worst]}"


CASES = [("cnn", 1, 8, None), ("mlp", 1, 8, None),
         ("resnet9", 3, 12, ["conv1.pre", "conv2.pre", "res1.body.1.pre", "conv3.pre",
                             "res2.body.0.pre", "conv4.pre"])]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name,cin,size,sites", CASES)
@pytest.mark.parametrize("n", [1, 3])
def test_scan_equals_naive_loop(name, cin, size, sites, dtype, tol, n):
    model = _random_model(name, cin, size, dtype)
    space = channel_space(model, sites)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, cin, size, size, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=gen)
    base = (torch.rand(space.total, generator=gen) > 0.1).to(dtype)  # some channels already off
    cand = torch.randperm(space.total, generator=gen)[:min(space.total, 40)]
    got = ablation_scan(model, x, y, sites=space, base_mask=base, candidates=cand, max_rows=40)
    want = naive_ablation_scan(model, x, y, sites=space, base_mask=base, candidates=cand)
    assert got.isnan().sum() == space.total - len(cand)
    _check(got, want, tol)


def test_scan_with_callable_objective_all_channels():
    model = _random_model("cnn", 1, 8, torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)

    def objective(logits):  # [R, N, K] -> [R]: margin of class 3 on row 0
        return logits[:, 0, 3] - logits[:, 1].logsumexp(-1)

    _check(ablation_scan(model, x, objective), naive_ablation_scan(model, x, objective), 1e-10)


def test_scan_restores_model():
    model = _random_model("cnn", 1, 8, torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    before = model(x)
    ablation_scan(model, x, torch.tensor([1, 2]))
    assert torch.equal(model(x), before)
    assert all(not hasattr(m, "forward") or "forward" not in vars(m) for m in model.modules())


def test_mask_gradient_equals_filter_score():
    """dL/dm_c at m = 1 at a pre-norm site == sum over filter c of w * dL/dw (bias-free conv)."""
    model = _random_model("cnn", 1, 8, torch.float64)
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (5,))
    space = channel_space(model)
    with row_masks(model, space) as ops:
        m = torch.ones(1, space.total, dtype=torch.float64, requires_grad=True)
        set_masks(ops, space, m.expand(5, -1))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    for name, layer in (("block1.pre", model.block1.conv), ("block2.pre", model.block2.conv),
                        ("block3.pre", model.block3.conv), ("hidden.pre", model.hidden.linear)):
        off = space.offsets[space.names.index(name)]
        got = m.grad[0, off:off + layer.weight.shape[0]]
        want = (layer.weight * layer.weight.grad).flatten(1).sum(1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
