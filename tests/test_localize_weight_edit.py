"""Channels removed from the weights (memkern.experiments.localize.weight_edit) compute exactly
what the model computes with those channels zeroed at their sites, for every kind of site, in
float64 on fresh random inputs; sites with no exact edit are refused in one line."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.localize.weight_edit import check_editable, without_channels
from memkern.network.attach import attach_sites
from memkern.network.models import build_model, build_text_model
from memkern.network.models.resnet50 import Bottleneck
from memkern.network.sites import channel_sites, example_indices, name_sites
from memkern.network.tied_dropout import attach_tied_dropout, set_tied_dropout_mode

sys.path.insert(0, str(Path(__file__).parent))
from zoo_models import tiny_net  # noqa: E402


class _Holder(nn.Module):
    """A bottleneck with a projected shortcut, as ResNet-50's first block of a stage."""

    def __init__(self):
        super().__init__()
        self.b = Bottleneck(3, 4, 1, "batch")

    def forward(self, x):
        return self.b(x)


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Norm statistics and affine parameters away from their identity initialization."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def _image(name, norm="batch", size=8):
    return lambda: build_model(name, num_classes=5, in_channels=3, image_size=size, norm=norm)


GPT = "gpt?layers=2&width=12&heads=3&mlp=20"
HF = "hf:gpt2?n_layer=2&n_embd=12&n_head=3&n_inner=20"


def _gpt(tied=False, spec=GPT):
    def build():
        if spec == HF:
            pytest.importorskip("transformers")
        m = build_text_model(spec, vocab=256, context=9)
        if tied:
            attach_tied_dropout(m, sites=list(m.default_dropout_sites), p_gen=0.3, p_mem=0.4,
                                seed=7)
        return m
    return build


def _holder():
    m = _Holder()
    name_sites(m)
    return m


def _zoo():
    m = tiny_net(num_classes=5, in_channels=3, image_size=8, width=6)
    attach_sites(m, torch.randn(2, 3, 8, 8))
    return m


def _sequential():
    """Activation modules: their outputs are sites no weight edit removes exactly."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                      nn.Linear(256, 5))
    attach_sites(m, torch.randn(2, 3, 8, 8))
    return m


CASES = {  # name: (build, input maker, editable sites: None = all)
    "cnn-batch": (_image("cnn"), "image", None),
    "cnn-group": (_image("cnn", "group"), "image", None),
    "mlp": (_image("mlp"), "image", None),
    "resnet9": (_image("resnet9", size=12), "image12", None),
    "vit": (_image("vit"), "image", None),
    "bottleneck": (_holder, "image", ["b.reduce.pre", "b.reduce.post", "b.spatial.pre",
                                       "b.spatial.post", "b.expand_site"]),
    "gpt": (_gpt(), "tokens", None),
    "gpt-tied-own": (_gpt(tied=True), "tokens", None),
    "hf-gpt2": (_gpt(spec=HF), "tokens", None),
    "hf-gpt2-tied-own": (_gpt(tied=True, spec=HF), "tokens", None),
    "zoo-hooks": (_zoo, "image", ["conv", "fc1", "fc2:in"]),
    "sequential-hooks": (_sequential, "image", ["0"]),
}


def _inputs(kind: str, gen: torch.Generator, n: int = 5) -> torch.Tensor:
    if kind == "tokens":
        return torch.randint(0, 256, (n, 9), generator=gen)
    side = 12 if kind == "image12" else 8
    return torch.randn(n, 3, side, side, generator=gen, dtype=torch.float64)


def _masked(model, space, zeroed, x):
    """``model(x)`` with the channels ``zeroed`` masked at their sites (the localize mask)."""
    on = (~zeroed).to(torch.float64)[None].expand(len(x), -1)
    with row_masks(model, space) as ops:
        set_masks(ops, space, on)
        return model(x)


@pytest.mark.parametrize("case", list(CASES))
def test_removed_channels_compute_what_the_mask_computes(case):
    build, kind, editable = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    torch.manual_seed(len(case))
    model = build().double().eval()
    _randomize(model, gen)
    if case.endswith("tied-own"):
        set_tied_dropout_mode(model, "own")
    sites = channel_sites(model)
    names = editable or list(sites)
    space = ChannelSpace(tuple(names), tuple(sites[n].channels for n in names))
    zeroed = torch.rand(space.total, generator=gen) < 0.3
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edited = without_channels(model, space, zeroed)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the source model changed at {k}"
    x = _inputs(kind, gen)
    with torch.no_grad(), example_indices(torch.arange(100, 100 + len(x))):
        want, got, plain = _masked(model, space, zeroed, x), edited(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - plain).abs().max() > 1e-6, "the edit changed nothing: the test proves nothing"
    assert not channel_sites(edited)[names[0]].ops or case.endswith("tied-own")


@pytest.mark.parametrize("spec", [GPT, HF])
def test_each_site_alone_is_removed_exactly(spec):
    """One site at a time, so an edit hitting the wrong site cannot hide behind another's."""
    gen = torch.Generator().manual_seed(3)
    model = _gpt(spec=spec)().double().eval()
    _randomize(model, gen)
    x = _inputs("tokens", gen)
    for name, site in channel_sites(model).items():
        space = ChannelSpace((name,), (site.channels,))
        zeroed = torch.zeros(site.channels, dtype=torch.bool)
        zeroed[torch.randint(site.channels, (1,), generator=gen)] = True
        with torch.no_grad():
            got = without_channels(model, space, zeroed)(x)
            torch.testing.assert_close(got, _masked(model, space, zeroed, x), rtol=1e-12,
                                       atol=1e-12)
            assert (got - model(x)).abs().max() > 1e-9, name  # the edit removed something


@pytest.mark.parametrize("case,site", [("bottleneck", "b.post"), ("sequential-hooks", "1")])
def test_a_site_without_an_exact_edit_is_refused_by_name(case, site):
    model = CASES[case][0]()
    assert site in channel_sites(model)
    with pytest.raises(ConfigError) as e:
        check_editable(model, [site])
    message = str(e.value)
    assert "--save-edited" in message and site in message and "\n" not in message
    for good in CASES[case][2]:
        check_editable(model, [good])
