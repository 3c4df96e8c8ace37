"""The batched ablation scan against the naive loop of full forwards, and the gradient score."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import channel_space, row_masks, set_masks
from memkern.experiments.localize import scan
from memkern.experiments.localize.scan import ablation_scan, naive_ablation_scan
from memkern.experiments.localize.scan_delta import FALLBACK
from memkern.experiments.localize.scan_plan import plan_scan
from memkern.network.models import build_model
from memkern.network.models.blocks import ConvBlock
from memkern.network.sites import POST_ACTIVATION, PRE_NORM, ChannelSite, name_sites
from memkern.network.tied_dropout import attach_tied_dropout, set_tied_dropout_mode


def _random_model(name, cin, size, dtype):
    """Fresh weights and non-trivial norm statistics and affine parameters (eval mode)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=cin, image_size=size).to(dtype).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model


def _check(a, b, tol):
    err = (a - b).abs()
    worst = int(err.nan_to_num(float("inf")).argmax())
    assert torch.equal(a.isnan(), b.isnan())
    assert err.nan_to_num(0).max() <= tol, f"worst channel {worst}: {a[worst]} vs {b[worst]}"


def _candidates(space, per_site, gen):
    """``per_site`` random channels of every site (flat indices)."""
    picks = [off + torch.randperm(count, generator=gen)[:per_site]
             for off, count in zip(space.offsets, space.counts)]
    return torch.cat(picks)


CASES = [("cnn", 1, 8, None), ("mlp", 1, 8, None),
         ("resnet9", 3, 12, ["conv1.pre", "conv2.pre", "res1.body.1.pre", "conv3.pre",
                             "res2.body.0.pre", "conv4.pre"]),
         ("resnet50", 3, 8, ["stem.pre", "stage1.0.expand_site", "stage1.2.expand_site",
                             "stage4.2.post"]),
         ("vit", 3, 8, ["blocks.0.hidden", "blocks.2.hidden", "blocks.3.hidden"])]


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
    cand = _candidates(space, 3 if name == "resnet50" else 7, gen)  # its naive loop is slow
    got = ablation_scan(model, x, y, sites=space, base_mask=base, candidates=cand, max_rows=20)
    want = naive_ablation_scan(model, x, y, sites=space, base_mask=base, candidates=cand)
    assert got.values.isnan().sum() == space.total - len(cand)
    _check(got.values, want, tol)
    assert all(p.startswith("delta via ") for p in got.path.values()), got.path
    assert set(got.path) == set(space.names)



def test_cpu_chunks_are_sized_by_the_sites_largest_activation(monkeypatch):
    """ResNet-9 at 12x12 in float64: conv3.pre's largest dependent output is its own
    256 x 6 x 6 map, res2.body.0.pre's the 256 x 3 x 3 map after the pool; with room for three
    conv3.pre candidates of 2 rows, its 7 candidates take 3 forwards, res2's 7 one (max_rows
    20 = 10 candidates), and every value equals the naive loop's."""
    model = _random_model("resnet9", 3, 12, torch.float64)
    space = channel_space(model, ["conv3.pre", "res2.body.0.pre"])
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 12, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=gen)
    with row_masks(model, space) as ops:
        set_masks(ops, space, torch.ones(1, space.total, dtype=torch.float64))
        plans = plan_scan(model, x[:1], space.names)
    assert plans["conv3.pre"].row_bytes == 256 * 6 * 6 * 8
    assert plans["res2.body.0.pre"].row_bytes == 256 * 3 * 3 * 8
    monkeypatch.setattr(scan, "CPU_CHUNK_BYTES", 3 * 2 * 256 * 6 * 6 * 8)
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, args: forwards.append(len(args[0])))
    cand = _candidates(space, 7, gen)
    try:
        got = ablation_scan(model, x, y, sites=space, candidates=cand, max_rows=20)
    finally:
        handle.remove()
    assert forwards == [1, 2, 6, 6, 2, 14]  # probe, prefix, conv3.pre 3+3+1, res2 all 7
    _check(got.values, naive_ablation_scan(model, x, y, sites=space, candidates=cand), 1e-10)


@pytest.mark.parametrize("name,cin,size,site,path", [
    ("resnet50", 3, 8, "stem.pre", "delta via stage1.0.reduce.conv, stage1.0.shortcut.0"),
    ("resnet50", 3, 8, "stage1.0.expand_site", "delta via stage1.1.reduce.conv"),
    ("resnet50", 3, 8, "stage1.2.expand_site",
     "delta via stage2.0.reduce.conv, stage2.0.shortcut.0"),
    ("resnet50", 3, 8, "stage4.2.post", "delta via head"),
    ("vit", 3, 8, "blocks.0.hidden", "delta via blocks.0.fc2"),
    ("cnn", 1, 8, "block3.post", "delta via hidden.linear"),
])
def test_scan_takes_the_consumer_that_reads_the_site(name, cin, size, site, path):
    model = _random_model(name, cin, size, torch.float64)
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    got = ablation_scan(model, x, torch.tensor([1, 2]), sites=[site], candidates=torch.arange(3))
    assert got.path == {site: path}


def test_plan_caches_modules_called_after_the_site():
    """The projection shortcut of a ResNet-50 block runs after the block's expand site but reads
    the block input: it is cached, the block itself is not, the site's own ops are not."""
    model = _random_model("resnet50", 3, 8, torch.float64)
    space = channel_space(model, ["stage2.0.expand_site"])
    with row_masks(model, space) as ops:
        set_masks(ops, space, torch.ones(1, space.total, dtype=torch.float64))
        plan = plan_scan(model, torch.randn(1, 3, 8, 8, dtype=torch.float64),
                         ("stage2.0.expand_site",))["stage2.0.expand_site"]
    assert {"stem", "stage1", "stage2.0.reduce", "stage2.0.spatial", "stage2.0.expand",
            "stage2.0.shortcut"} == set(plan.cached)
    assert plan.consumers == ("stage2.1.reduce.conv",) and plan.naive is None


class _UserCNN(nn.Module):
    """As a user writes it: functional activations, torch.flatten, reflect padding, a GroupNorm
    between a site and its conv, a grouped conv, a depthwise conv, and an in-place ReLU on a
    branch called after the sites."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.s1 = ChannelSite(6, PRE_NORM)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect")
        self.s2 = ChannelSite(8, POST_ACTIVATION)
        self.gn = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.s3 = ChannelSite(4, POST_ACTIVATION)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.s4 = ChannelSite(6, POST_ACTIVATION)
        self.depthwise = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.side = nn.Conv2d(1, 12, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(12 * 8 * 8, 10)
        name_sites(self)

    def forward(self, x):
        h = F.relu(self.bn1(self.s1(self.conv1(x))))
        h = self.conv3(self.gn(self.s2(F.relu(self.conv2(h)))))
        h = self.depthwise(self.s4(F.relu(self.grouped(self.s3(F.relu(h))))))
        return self.fc(torch.flatten(h + self.relu(self.side(x)), 1))


class _UserTokens(nn.Module):
    """Token sites ``[N, T, C]`` read by a token Linear, by a Conv1d after a transpose and by a
    Linear after a flatten (channel c owns features c, c + C, ...)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.tokens = ChannelSite(6, POST_ACTIVATION, channel_dim=-1)
        self.mix = nn.Linear(6, 6)
        self.mixed = ChannelSite(6, PRE_NORM, channel_dim=-1)
        self.conv = nn.Conv1d(6, 5, 3, padding=1)
        self.conv_out = ChannelSite(5, POST_ACTIVATION)
        self.head = nn.Linear(5 * 16, 10)
        self.head2 = nn.Linear(16 * 6, 10)
        name_sites(self)

    def forward(self, x):
        h = self.tokens(F.gelu(self.embed(x.reshape(len(x), 16, 4))))
        u = self.mixed(self.mix(h))
        c = self.conv_out(torch.tanh(self.conv(u.transpose(1, 2))))
        return self.head(torch.flatten(c, 1)) + self.head2(torch.flatten(u, 1))


class _Twice(nn.Module):
    """A block (with its sites) applied twice and an activation module shared by three calls."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.s0 = ChannelSite(4, PRE_NORM)
        self.act = nn.ReLU()
        self.block = ConvBlock(4, 4)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        name_sites(self)

    def forward(self, x):
        h = self.act(self.s0(self.conv0(x)))
        return self.fc(torch.flatten(self.act(self.block(self.block(h))), 1))


USER_CASES = [
    (_UserCNN, {"s1": "delta via conv2", "s2": f"full at conv3: {FALLBACK}",
                "s3": "delta via grouped", "s4": "delta via depthwise"}),
    (_UserTokens, {"tokens": "delta via mix", "mixed": "delta via conv, head2",
                   "conv_out": "delta via head"}),
    (_Twice, {"s0": "full: block.conv runs 2 times in one forward",
              "block.pre": "naive: the site runs 2 times in one forward",
              "block.post": "naive: the site runs 2 times in one forward"}),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("build,paths", USER_CASES)
@pytest.mark.parametrize("n", [1, 3])
def test_scan_equals_naive_loop_on_user_models(build, paths, dtype, tol, n):
    torch.manual_seed(n)
    model = build().to(dtype).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    space = channel_space(model, list(paths))
    x = torch.randn(n, 1, 8, 8, dtype=dtype)
    y = torch.randint(0, 10, (n,))
    base = (torch.rand(space.total) > 0.2).to(dtype)
    got = ablation_scan(model, x, y, sites=space, base_mask=base, max_rows=7)
    want = naive_ablation_scan(model, x, y, sites=space, base_mask=base)
    _check(got.values, want, tol)
    assert got.path == paths


def test_scan_with_tied_dropout_in_own_mode_equals_naive():
    """Each candidate row runs with its input's dataset index, so "own" masks match."""
    model = _random_model("cnn", 1, 8, torch.float64)
    attach_tied_dropout(model, sites=["block2.post", "hidden.post"], p_gen=0.3, p_mem=0.4, seed=3)
    set_tied_dropout_mode(model, "own")
    space = channel_space(model, ["block1.pre", "block3.pre", "hidden.pre"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=gen)
    ids = torch.tensor([5, 17, 2])
    cand = _candidates(space, 9, gen)
    got = ablation_scan(model, x, y, sites=space, candidates=cand, max_rows=10, ids=ids)
    want = naive_ablation_scan(model, x, y, sites=space, candidates=cand, ids=ids)
    _check(got.values, want, 1e-10)
    assert all(p.startswith("delta via ") for p in got.path.values()), got.path
    other = ablation_scan(model, x, y, sites=space, candidates=cand, ids=ids + 1)
    assert (other.values[cand] - got.values[cand]).abs().max() > 1e-3  # the ids reach the masks
    with pytest.raises(ConfigError, match="ids has shape"):
        ablation_scan(model, x, y, sites=space, candidates=cand, ids=ids[:2])


def test_scan_with_callable_objective_all_channels():
    model = _random_model("cnn", 1, 8, torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)

    def objective(logits):  # [R, N, K] -> [R]: margin of class 3 on row 0
        return logits[:, 0, 3] - logits[:, 1].logsumexp(-1)

    got, want = ablation_scan(model, x, objective), naive_ablation_scan(model, x, objective)
    _check(got.values, want, 1e-10)


def test_scan_restores_model():
    model = _random_model("cnn", 1, 8, torch.float64)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    before = model(x)
    ablation_scan(model, x, torch.tensor([1, 2]))
    assert torch.equal(model(x), before)
    assert all(not hasattr(m, "forward") or "forward" not in vars(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


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
