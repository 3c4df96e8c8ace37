"""Sites attached by hooks (memkern.network.attach): which sites a traced forward finds on torchvision,
timm and plain models, that hooks without ops change nothing (bit for bit), that ops act at
the right place, and that deep copies and detaching keep models apart."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memkern
from memkern.errors import ConfigError
from memkern.experiments.gradients.norms import per_example_sq_norms
from memkern.network.models import build_model, layer_groups
from memkern.network.sites import POST_ACTIVATION, PRE_NORM, channel_sites
from memkern.network.tied_dropout import attach_tied_dropout, set_tied_dropout_mode
from zoo_checks import needs_zoo

TV_RESNET18 = "torchvision:resnet18"
TIMM_VIT = "timm:vit_tiny_patch16_224?img_size=32&patch_size=4"


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(),
                         nn.Linear(7, 3))


class Functional(nn.Module):
    """Activations as functions: one feeds a conv alone, one is read twice (no exact hook),
    one is returned by a block, one feeds a linear on tokens."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6))
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv2(F.relu(self.conv1(x)))  # relu -> conv2 only: conv2:in
        x = x + F.silu(x)  # silu read by the add only: no site
        x = F.gelu(self.block(x))  # gelu output read by flatten: no module reads it alone
        tokens = x.flatten(2).transpose(1, 2)  # [N, T, 6]
        return self.fc2(F.relu(self.fc1(tokens))).mean(1)  # relu on tokens -> fc2:in


def _sites(model):
    return {n: (s.position, s.channels, s.channel_dim) for n, s in channel_sites(model).items()}


@needs_zoo
def test_torchvision_resnet18_sites():
    model = build_model(TV_RESNET18, num_classes=10, in_channels=3, image_size=16)
    sites = _sites(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [n for n, s in sites.items() if s[0] == PRE_NORM] == convs  # 20, forward order
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    post = ["relu"] + [n for b in blocks for n in (f"{b}.conv2:in", b)]
    assert [n for n, s in sites.items() if s[0] == POST_ACTIVATION] == post
    assert sites["layer3.0.conv2:in"] == (POST_ACTIVATION, 256, 1)
    assert "fc" not in sites and model.memkern_skipped_sites == ()
    assert model.default_dropout_sites == ("layer4.1.conv2:in", "layer4.1")
    assert [g.name for g in layer_groups(model)] == ["conv1", "bn1", "layer1", "layer2",
                                                     "layer3", "layer4", "fc"]


@needs_zoo
def test_timm_vit_sites_token_layout():
    model = build_model(TIMM_VIT, num_classes=10, in_channels=3, image_size=32)
    sites = _sites(model)
    assert sites["patch_embed.proj"] == (PRE_NORM, 192, 1)
    for i in range(12):
        assert sites[f"blocks.{i}.attn.qkv"] == (PRE_NORM, 576, -1)
        assert sites[f"blocks.{i}.mlp.fc1"] == (PRE_NORM, 768, -1)
        assert sites[f"blocks.{i}.mlp.act"] == (POST_ACTIVATION, 768, -1)
    assert len(sites) == 1 + 12 * 5 and "head" not in sites
    assert [g.name for g in layer_groups(model)] == ["patch_embed", "cls_token", "blocks", "norm",
                                                     "head"]
    assert layer_groups(model)[1].param_names == ("cls_token", "pos_embed")
    memkern.detach_sites(model)
    memkern.attach_sites(model, torch.randn(2, 3, 32, 32), group_depth=2)
    assert [g.name for g in layer_groups(model)][2:5] == ["blocks.0", "blocks.1", "blocks.2"]


def test_mlp_sites_head_excluded_unless_asked():
    model = _mlp()
    infos = memkern.attach_sites(model, torch.randn(2, 3, 2, 2))
    assert [(i.name, i.position, i.channels) for i in infos] == [
        ("1", PRE_NORM, 9), ("2", POST_ACTIVATION, 9), ("3", PRE_NORM, 7),
        ("4", POST_ACTIVATION, 7)]
    memkern.detach_sites(model)
    memkern.attach_sites(model, torch.randn(2, 12), include_head=True)
    assert list(_sites(model))[-1] == "5"


def test_functional_activations():
    model = Functional()
    memkern.attach_sites(model, torch.randn(3, 2, 4, 4))
    sites = _sites(model)
    assert sites == {"conv1": (PRE_NORM, 5, 1), "conv2:in": (POST_ACTIVATION, 5, 1),
                     "conv2": (PRE_NORM, 5, 1), "block.0": (PRE_NORM, 6, 1),
                     "fc1": (PRE_NORM, 8, -1), "fc2:in": (POST_ACTIVATION, 8, -1)}
    skipped = " | ".join(model.memkern_skipped_sites)
    assert "silu" in skipped and "gelu" in skipped


def _zero_channel(site, c):
    class Zero(nn.Module):
        def forward(self, x):
            x = x.clone()
            x.select(site.channel_dim, c).zero_()
            return x
    return site.attach(Zero())


@pytest.mark.parametrize("build", ["mlp", "functional",
                                   pytest.param(TV_RESNET18, marks=needs_zoo),
                                   pytest.param(TIMM_VIT, marks=needs_zoo)])
def test_hooks_without_ops_are_bit_identical_and_ops_act_where_named(build):
    torch.manual_seed(0)
    if build == "mlp":
        plain, x = _mlp(), torch.randn(4, 12)
    elif build == "functional":
        plain, x = Functional(), torch.randn(4, 2, 4, 4)
    else:
        plain = build_model(build, num_classes=10, in_channels=3, image_size=32)
        memkern.detach_sites(plain)
        x = torch.randn(4, 3, 32, 32)
    attached = copy.deepcopy(plain)
    memkern.attach_sites(attached, x[:2])
    assert attached.state_dict().keys() == plain.state_dict().keys()
    for model in (plain, attached):
        model.train()
        model.zero_grad()
        model(x).square().sum().backward()
    assert torch.equal(attached(x), plain(x))  # train mode: BatchNorm batch statistics
    for (n, p), q in zip(plain.named_parameters(), attached.parameters()):
        assert torch.equal(p.grad, q.grad), n
    attached.eval(), plain.eval()
    # an op at a site changes the output; the same op in a deep copy leaves the original alone
    name, site = list(channel_sites(attached).items())[1]
    twin = copy.deepcopy(attached)
    _zero_channel(channel_sites(twin)[name], 0)
    assert not torch.equal(twin(x), plain(x)), name
    assert torch.equal(attached(x), plain(x))
    memkern.detach_sites(twin)
    assert torch.equal(twin(x), plain(x)) and not channel_sites(twin)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in twin.modules())


@needs_zoo
def test_ghost_with_tied_dropout_at_attached_pre_norm_sites_equals_loop():
    """Tied dropout at conv outputs: the ghost rule needs the conv's own output gradient."""
    torch.manual_seed(0)
    model = build_model(TV_RESNET18, num_classes=10, in_channels=3, image_size=16).double()
    attach_tied_dropout(model, sites=["conv1", "layer1.0.conv2", "layer2.0.downsample.0"],
                        p_gen=0.25, p_mem=0.5, seed=1)
    set_tied_dropout_mode(model, "own")
    x, y, ids = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([1, 5, 7]), \
        torch.tensor([4, 0, 9])
    loop = per_example_sq_norms(model, x, y, ids=ids, mode="loop")
    ghost = per_example_sq_norms(model, x, y, ids=ids, mode="ghost")
    assert ghost.keys() == loop.keys()
    for n in loop:
        torch.testing.assert_close(ghost[n], loop[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("spec,size,fallback", [
    pytest.param(TV_RESNET18, 16, set(), marks=needs_zoo),
    # timm's LayerNorm overrides forward: not provably nn.LayerNorm's math, so torch.func
    pytest.param(TIMM_VIT + "&depth=2", 32,
                 {"cls_token", "pos_embed", "norm.weight", "norm.bias",
                  *(f"blocks.{b}.norm{i}.{p}" for b in (0, 1) for i in (1, 2)
                    for p in ("weight", "bias"))}, marks=needs_zoo)])
def test_auto_ghost_norms_cover_every_parameter_equal_to_loop(spec, size, fallback):
    """auto: ghost rules for every layer, torch.func only for the loose parameters."""
    from memkern.experiments.gradients.norms.ghost import ghost_sq_norms

    torch.manual_seed(0)
    model = build_model(spec, num_classes=10, in_channels=3, image_size=size).double().eval()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    y = torch.tensor([2, 0, 9])
    ruled = ghost_sq_norms(model, x, y, memory_budget=1 << 26)
    names = {n for n, _ in model.named_parameters()}
    assert names - ruled.keys() == fallback
    auto = per_example_sq_norms(model, x, y, mode="auto")
    loop = per_example_sq_norms(model, x, y, mode="loop")
    assert auto.keys() == loop.keys() == names
    for n in names:
        torch.testing.assert_close(auto[n], loop[n], rtol=1e-9, atol=1e-12, msg=n)


def test_bad_input_is_a_config_error():
    model = _mlp()
    with pytest.raises(ConfigError, match="failed on an example input of shape"):
        memkern.attach_sites(model, torch.randn(2, 5))
    assert not channel_sites(model) and not model._forward_hooks
    memkern.attach_sites(model, torch.randn(2, 12))
    with pytest.raises(ConfigError, match="already has channel sites"):
        memkern.attach_sites(model, torch.randn(2, 12))
    memkern.detach_sites(model)
    with pytest.raises(ConfigError, match="in no group"):
        memkern.attach_sites(model, torch.randn(2, 12), layer_groups=["1", "3"])
    with pytest.raises(ConfigError, match="in two groups"):
        memkern.attach_sites(model, torch.randn(2, 12), layer_groups=["1", ("1", "3", "5")])
    memkern.attach_sites(model, torch.randn(2, 12), layer_groups=[("1", "3"), "5"])
    assert [g.param_names for g in layer_groups(model)] == [
        ("1.weight", "1.bias", "3.weight", "3.bias"), ("5.weight", "5.bias")]
