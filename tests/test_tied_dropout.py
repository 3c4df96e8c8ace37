"""ExampleTiedDropout on channel sites: attach, modes, index plumbing, errors."""

import pytest
import torch
from torch import nn

from memkern.errors import ConfigError
from memkern.training.config import TrainConfig
from memkern.kernels.channel_mask_reference import tied_mask_values
from memkern.network.sites import (
    POST_ACTIVATION, PRE_NORM, ChannelSite, channel_sites, example_indices, name_sites,
)
from memkern.network.tied_dropout import (
    ExampleTiedDropout, attach_tied_dropout, set_tied_dropout_mode, site_seed, site_tied_dropout,
    tied_dropout_mode,
)

P = dict(p_gen=0.25, p_mem=0.5)


class TinyConvNet(nn.Module):
    """conv-ReLU-site x2, then a linear head; sites after each ReLU (and one pre-norm)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.pre1 = ChannelSite(8, PRE_NORM)
        self.act1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), ChannelSite(8, POST_ACTIVATION))
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.Sequential(nn.ReLU(), ChannelSite(16, POST_ACTIVATION))
        self.head = nn.Linear(16, 10)
        self.default_dropout_sites = ("act1.2", "act2.1")
        name_sites(self)

    def forward(self, x):
        x = self.act1(self.pre1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        return self.head(x.amax(dim=(2, 3)))


class TinyTokenNet(nn.Module):
    """``[N, T, C]`` tokens with a channels-last site, as in a ViT block."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 12)
        self.site = ChannelSite(12, POST_ACTIVATION, channel_dim=-1)
        name_sites(self)

    def forward(self, x):
        return self.site(torch.relu(self.proj(x)))


def attached(model=None, **kwargs):
    model = model or TinyConvNet()
    attach_tied_dropout(model, sites=list(model.default_dropout_sites), seed=5, **P, **kwargs)
    return model


def test_attach_gives_each_site_its_own_seed():
    model = attached()
    sites = channel_sites(model)
    ops = [site_tied_dropout(sites[name]) for name in model.default_dropout_sites]
    assert [op.seed for op in ops] == [site_seed(5, 0), site_seed(5, 1)]
    assert ops[0].seed != ops[1].seed and len(sites["pre1"].ops) == 0
    assert ops[1].channels == 16 and ops[0].mode == "train"


def test_unknown_site_lists_valid_names_and_attaches_nothing():
    model = TinyConvNet()
    with pytest.raises(ConfigError, match=r"unknown channel site\(s\) \['nope'\].*act2\.1"):
        attach_tied_dropout(model, sites=["act1.2", "nope"], seed=0, **P)
    assert all(len(site.ops) == 0 for site in channel_sites(model).values())


def test_second_tied_dropout_on_a_site_is_refused():
    model = attached()
    before = {n: list(s.ops) for n, s in channel_sites(model).items()}
    for sites in (["act2.1"], ["act1.2", "act1.2"]):
        with pytest.raises(ConfigError, match="tied dropout twice"):
            attach_tied_dropout(model, sites=sites, seed=1, **P)
    assert {n: list(s.ops) for n, s in channel_sites(model).items()} == before


def test_forward_applies_the_example_tied_mask():
    model = attached()
    site = channel_sites(model)["act2.1"]
    x = torch.randn(7, 16, 4, 4)
    ids = torch.randint(0, 60_000, (7,))
    with example_indices(ids):
        y = site(x)
    mask = tied_mask_values(ids, channels=16, seed=site_tied_dropout(site).seed, mode="train", **P)
    torch.testing.assert_close(y, x * mask[:, :, None, None], rtol=0, atol=0)


def test_same_example_same_mask_in_any_batch():
    site = channel_sites(attached())["act2.1"]
    x = torch.ones(1, 16, 2, 2)
    with example_indices(torch.tensor([123])):
        alone = site(x)
    batch = torch.ones(5, 16, 2, 2)
    with example_indices(torch.tensor([9, 8, 123, 7, 6])):
        together = site(batch)
    torch.testing.assert_close(together[2:3], alone, rtol=0, atol=0)


def test_train_step_runs_and_gradients_flow():
    model = attached()
    x, y = torch.randn(7, 3, 6, 6), torch.randint(0, 10, (7,))
    with example_indices(torch.arange(7)):
        nn.functional.cross_entropy(model(x), y).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_modes_need_indices_only_when_hashed():
    model = attached()
    x = torch.randn(3, 3, 6, 6)
    with pytest.raises(ConfigError, match="example_indices"):
        model(x)
    with example_indices(torch.arange(4)), pytest.raises(ConfigError, match="3 rows"):
        model(x)
    for mode in ("keep", "drop"):
        with tied_dropout_mode(model, mode):
            assert model(x).shape == (3, 10)


def test_mode_context_restores_old_mode_even_on_error():
    model = attached()
    set_tied_dropout_mode(model, "keep")
    with pytest.raises(RuntimeError), tied_dropout_mode(model, "drop"):
        assert {m.mode for m in model.modules() if isinstance(m, ExampleTiedDropout)} == {"drop"}
        raise RuntimeError("inside")
    assert {m.mode for m in model.modules() if isinstance(m, ExampleTiedDropout)} == {"keep"}


def test_drop_and_keep_values():
    site = channel_sites(attached())["act1.2"]  # 8 channels, 2 generalization channels
    x = torch.ones(2, 8, 1, 1, dtype=torch.float64)
    site_tied_dropout(site).mode = "drop"
    torch.testing.assert_close(site(x)[0, :, 0, 0], torch.tensor([3.0] * 2 + [0.0] * 6,
                                                                  dtype=torch.float64))
    site_tied_dropout(site).mode = "keep"
    torch.testing.assert_close(site(x)[0, :, 0, 0], torch.tensor([1.0] * 2 + [0.5] * 6,
                                                                  dtype=torch.float64))


def test_bad_modes_and_probabilities():
    model = attached()
    with pytest.raises(ConfigError, match="mode 'eval'"):
        set_tied_dropout_mode(model, "eval")
    with pytest.raises(ConfigError, match="no tied dropout"):
        set_tied_dropout_mode(TinyConvNet(), "drop")
    with pytest.raises(ConfigError, match="p_mem=1.3 is not a probability"):
        attach_tied_dropout(TinyConvNet(), sites=["act1.2"], seed=0, p_gen=0.2, p_mem=1.3)
    with pytest.raises(ConfigError, match="0 < p_gen < 1"):
        ExampleTiedDropout(8, seed=0, p_gen=0.0, p_mem=0.5).mode = "drop"
    with pytest.raises(ConfigError, match="built for 8 channels"):
        ExampleTiedDropout(8, seed=0, **P, mode="keep")(torch.randn(2, 4, 3))


@pytest.mark.kernels
@pytest.mark.parametrize("mode", ["train", "drop"])
def test_token_layout_triton_equals_torch(mode):
    x = torch.randn(7, 5, 6)
    outs = []
    for backend in ("torch", "triton"):
        model = TinyTokenNet()
        torch.manual_seed(0)
        model.proj.reset_parameters()
        attach_tied_dropout(model, sites=["site"], seed=3, backend=backend, **P)
        set_tied_dropout_mode(model, mode)
        with example_indices(torch.arange(100, 107)):
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("p_gen, p_mem", [(0.5, 0.6), (0.8, 0.3), (0.25, 1.0), (0.4, 0.0)])
def test_any_probabilities_with_a_generalization_share_train_and_evaluate(p_gen, p_mem):
    """p_gen + p_mem > 1 is a valid setting: the config accepts it and every mode runs it."""
    config = TrainConfig(tied_dropout=True, p_gen=p_gen, p_mem=p_mem)
    model = TinyConvNet()
    attach_tied_dropout(model, sites=list(model.default_dropout_sites), seed=config.seed,
                        p_gen=config.p_gen, p_mem=config.p_mem)
    x, ids = torch.randn(64, 3, 4, 4), torch.arange(64)
    with example_indices(ids):
        model(x)
    op = site_tied_dropout(model.get_submodule("act2.1"))
    gen = int(p_gen * 16)
    with example_indices(ids):
        mask = op(torch.ones(64, 16))
    assert bool((mask[:, :gen] == 1).all())
    kept = float(mask[:, gen:].mean())  # 64 rows x 16-gen channels, kept with probability p_mem
    assert abs(kept - p_mem) <= 5 * (p_mem * (1 - p_mem) / mask[:, gen:].numel()) ** 0.5 + 1e-12
    for mode in ("keep", "drop"):
        with tied_dropout_mode(model, mode):
            assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("p_gen, p_mem", [(0.0, 0.1), (1.0, 0.1), (0.2, 1.5), (-0.1, 0.1)])
def test_config_and_op_refuse_the_same_settings_with_the_same_message(p_gen, p_mem):
    with pytest.raises(ConfigError) as op_error:
        ExampleTiedDropout(8, seed=0, p_gen=p_gen, p_mem=p_mem, mode="drop")
    with pytest.raises(ConfigError) as config_error:
        TrainConfig(tied_dropout=True, p_gen=p_gen, p_mem=p_mem)
    assert str(config_error.value) == str(op_error.value)
    TrainConfig(tied_dropout=False, p_gen=p_gen, p_mem=p_mem)  # unused without tied dropout
