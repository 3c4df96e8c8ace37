import pytest
import torch

from memkern.errors import ConfigError
from memkern.network.models import MODELS, build_model, layer_groups
from memkern.network.sites import POST_ACTIVATION, PRE_NORM, channel_sites, site_infos

SHAPES = {"cnn": (1, 8), "mlp": (1, 8), "resnet9": (3, 32), "resnet50": (3, 16), "vit": (3, 16)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_sites_and_groups(name):
    cin, size = SHAPES[name]
    model = build_model(name, num_classes=7, in_channels=cin, image_size=size).eval()
    assert model(torch.randn(3, cin, size, size)).shape == (3, 7)
    params = {n for n, _ in model.named_parameters()}
    grouped = [p for g in layer_groups(model) for p in g.param_names]
    assert sorted(grouped) == sorted(params), "every parameter in exactly one group"
    buffers = {n for n, _ in model.named_buffers()}
    assert {b for g in layer_groups(model) for b in g.buffer_names} == buffers
    infos = site_infos(model)
    assert infos and all(i.position in (PRE_NORM, POST_ACTIVATION) for i in infos)
    assert [i.name for i in infos] == [i.name for i in site_infos(build_model(
        name, num_classes=7, in_channels=cin, image_size=size))], "stable order"
    assert set(model.default_dropout_sites) <= {i.name for i in infos}


def test_resnet9_has_the_papers_1344_conv_channels():
    model = build_model("resnet9", num_classes=10, in_channels=3, image_size=32)
    assert sum(i.channels for i in site_infos(model) if i.position == PRE_NORM) == 1344
    assert [g.name for g in layer_groups(model)][-1] == "head"


def test_sites_record_the_activation_they_see():
    """A site op sees the activation at its position: pre-norm = the conv output itself."""
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8).eval()
    seen = {}

    class Record(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x

    channel_sites(model)["block1.pre"].attach(Record())
    x = torch.randn(2, 1, 8, 8)
    model(x)
    assert torch.allclose(seen["x"], model.block1.conv(x))


@pytest.mark.parametrize("bad", [dict(name="resnet7"), dict(norm="layer")])
def test_bad_model_arguments(bad):
    kwargs = dict(name="cnn", num_classes=10, in_channels=1, image_size=8, norm="batch") | bad
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match="choose one of"):
        build_model(name, **kwargs)


def test_resnet9_rejects_too_small_images():
    with pytest.raises(ConfigError, match="at least 12x12"):
        build_model("resnet9", num_classes=10, in_channels=1, image_size=8)
