"""Every per-example gradient norm mode against the one-backward-per-example loop."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memkern.errors import ConfigError, UnsupportedLayerError
from memkern.experiments.gradients.norms import default_groups, per_example_grad_norms
from memkern.experiments.gradients.norms.rules import RULES, rule_for
from memkern.network.models import build_model, layer_groups
from memkern.network.models.blocks import ConvBlock, Residual

TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4}
MODES = ("ghost", "func", "auto")


class Tokens(nn.Module):
    """Linear and LayerNorm on ``[B, T, D]`` tokens, then a linear head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc(x))).flatten(1))


class Shared(nn.Module):
    """One Linear called twice: its gradient sums over both calls."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def _conv_case(make_conv, shape):
    """conv -> tanh -> flatten -> linear head on inputs ``[B, *shape]``."""
    def build():
        net = nn.Sequential(make_conv(), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
        net(torch.randn(2, *shape))
        return net, shape
    return build


LAYER_CASES = {
    "linear": lambda: (nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)), (7,)),
    "linear-tokens-layernorm": lambda: (Tokens(), (4, 6)),
    "conv2d-stride-pad": _conv_case(lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 9, 9)),
    "conv2d-dilation-groups-same-reflect": _conv_case(
        lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding="same", padding_mode="reflect"),
        (4, 9, 7)),
    "conv2d-valid-nobias-groups3": _conv_case(lambda: nn.Conv2d(3, 6, (2, 3), groups=3, bias=False),
                                              (3, 6, 7)),
    "conv2d-circular-5x5": _conv_case(lambda: nn.Conv2d(2, 3, 5, padding=2, padding_mode="circular"),
                                      (2, 8, 8)),
    "conv1d-stride-pad-dilation": _conv_case(lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2),
                                             (3, 11)),
    "conv-bn-eval": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                           nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), (2, 6, 6)),
    "linear-bn1d-eval": lambda: (nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(),
                                               nn.Linear(8, 3)), (6,)),
    "conv-groupnorm": lambda: (nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(),
                                             nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), (2, 6, 6)),
    "residual-block": lambda: (nn.Sequential(ConvBlock(2, 4), Residual(ConvBlock(4, 4)),
                                             nn.Flatten(), nn.Linear(4 * 5 * 5, 3)), (2, 5, 5)),
}

MODEL_CASES = {  # name: (image size, batch)
    "cnn": (8, 5), "mlp": (8, 5), "resnet9": (16, 3), "resnet50": (8, 2), "vit": (8, 3),
}


def _randomize_norms(model: nn.Module, shape, dtype) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (never the init's 0/1)."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape, dtype=dtype) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


def assert_close_verbose(out: torch.Tensor, ref: torch.Tensor, tol: float, names) -> None:
    """Relative error against ``max(|ref|, 1e-3 * max|ref|)``; on failure print the worst."""
    scale = ref.abs().clamp_min(1e-3 * float(ref.abs().max()))
    err = (out.double() - ref.double()).abs() / scale
    if float(err.max()) > tol:
        worst = torch.topk(err.flatten(), min(5, err.numel())).indices
        lines = [f"  example {int(i) // ref.shape[1]}, group {names[int(i) % ref.shape[1]]}: "
                 f"got {float(out.flatten()[i]):.9g}, loop {float(ref.flatten()[i]):.9g}, "
                 f"rel err {float(err.flatten()[i]):.3g}" for i in worst]
        pytest.fail(f"max rel err {float(err.max()):.3g} > {tol}:\n" + "\n".join(lines))


def _check(model, shape, batch, dtype, classes, modes=MODES):
    torch.manual_seed(1000 + batch)
    model = model.to(dtype)
    _randomize_norms(model, shape, dtype)
    x = torch.randn(batch, *shape, dtype=dtype)
    y = torch.randint(0, classes, (batch,))
    ref = per_example_grad_norms(model.double(), x.double(), y, mode="loop")
    model.to(dtype)
    names = [g.name for g in default_groups(model)]
    assert ref.shape == (batch, len(names)) and bool((ref > 0).any())
    for mode in modes:
        assert_close_verbose(per_example_grad_norms(model, x, y, mode=mode), ref,
                             TOLERANCE[dtype], names)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layers_match_loop(case, batch, dtype):
    torch.manual_seed(0)
    model, shape = LAYER_CASES[case]()
    _check(model, shape, batch, dtype, classes=3)


MODEL_PARAMS = [(n, d) for n in sorted(MODEL_CASES) for d in ("f64", "f32")
                if (n, d) != ("resnet50", "f32")]  # resnet50 in float64 only: its calls are the slowest


@pytest.mark.parametrize("name,dtype", MODEL_PARAMS)
def test_models_match_loop(name, dtype):
    dtype = {"f64": torch.float64, "f32": torch.float32}[dtype]
    size, batch = MODEL_CASES[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=size)
    _check(model, (3, size, size), batch, dtype, classes=10)
    assert len(default_groups(model)) == len(layer_groups(model))


def test_shared_layer_falls_back_in_auto_and_is_refused_in_ghost():
    torch.manual_seed(0)
    _check(Shared(), (5,), 4, torch.float64, classes=3, modes=("auto", "func"))
    with pytest.raises(UnsupportedLayerError, match="called more than once"):
        per_example_grad_norms(Shared().double(), torch.randn(3, 5, dtype=torch.float64),
                               torch.tensor([0, 1, 2]), mode="ghost")


class SharedPositions(nn.Module):
    """A position embedding looked up once as ``[1, T]`` and broadcast over the rows: its
    output gradient sums over the batch, so no per-example rule may read it."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 5)
        self.pos = nn.Embedding(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        positions = torch.arange(x.shape[1]).unsqueeze(0)
        return self.head(self.tok(x) + self.pos(positions)).mean(1)


def test_a_batch_shared_lookup_falls_back_in_auto_and_is_refused_in_ghost():
    torch.manual_seed(0)
    model = SharedPositions().double()
    x, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 3, (5,))
    ref = per_example_grad_norms(model, x, y, mode="loop")
    assert_close_verbose(per_example_grad_norms(model, x, y, mode="auto"), ref, 1e-10,
                         ["tok", "pos", "head"])
    with pytest.raises(UnsupportedLayerError, match=r"pos\.weight"):
        per_example_grad_norms(model, x, y, mode="ghost")


def test_ghost_names_the_unsupported_layer():
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(2 * 2 * 2 * 2, 3))
    x, y = torch.randn(2, 1, 3, 3, 3), torch.tensor([0, 2])
    with pytest.raises(UnsupportedLayerError, match=r"0 \(Conv3d\)"):
        per_example_grad_norms(model, x, y, mode="ghost")
    ref = per_example_grad_norms(model.double(), x.double(), y, mode="loop")
    assert_close_verbose(per_example_grad_norms(model, x.double(), y, mode="auto"), ref, 1e-6,
                         ["0", "2"])


def test_train_mode_model_uses_eval_statistics_and_keeps_its_flags():
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8).double()
    _randomize_norms(model, (1, 8, 8), torch.float64)
    model.train()
    x, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    out = per_example_grad_norms(model, x, y, mode="ghost")
    assert all(m.training for m in model.modules())
    ref = per_example_grad_norms(model.eval(), x, y, mode="loop")
    assert_close_verbose(out, ref, 1e-6, [g.name for g in layer_groups(model)])


def test_ghost_computes_no_weight_gradient_and_tiny_budget_chunks_agree():
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8).double().eval()
    x, y = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (7,))
    whole = per_example_grad_norms(model, x, y, mode="ghost")
    assert all(p.grad is None for p in model.parameters())
    for mode in ("ghost", "func"):  # budget of 1 byte: chunks of one example
        assert_close_verbose(per_example_grad_norms(model, x, y, mode=mode, memory_budget=1),
                             whole, 1e-9, [g.name for g in layer_groups(model)])


def test_total_norm_is_the_whole_gradient_norm():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8).double().eval()
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 5, 9])
    total = per_example_grad_norms(model, x, y).square().sum(1).sqrt()
    for b in range(3):
        loss = nn.functional.cross_entropy(model(x[b:b + 1]), y[b:b + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected = torch.sqrt(sum(g.square().sum() for g in grads))
        assert abs(float(total[b] - expected)) <= 1e-9 * float(expected)


def test_empty_batch_and_bad_arguments():
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    empty = per_example_grad_norms(model, torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 3)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="unknown gradient-norm mode 'fast'"):
        per_example_grad_norms(model, x, y, mode="fast")
    with pytest.raises(ConfigError, match="3 rows"):
        per_example_grad_norms(model, torch.randn(3, 1, 8, 8), y)
    with pytest.raises(ConfigError, match="memory_budget"):
        per_example_grad_norms(model, x, y, memory_budget=0)


class TiedWeights(nn.Module):
    """One weight held by two Linear modules (as in a tied embedding and head)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_parameter_shared_by_two_modules_is_exact_in_auto_and_refused_in_ghost():
    torch.manual_seed(0)
    _check(TiedWeights(), (5,), 4, torch.float64, classes=3, modes=("auto", "func"))
    with pytest.raises(UnsupportedLayerError, match="shared by two layers"):
        per_example_grad_norms(TiedWeights().double(), torch.randn(3, 5, dtype=torch.float64),
                               torch.tensor([0, 1, 2]), mode="ghost")


class StandardizedConv(nn.Conv2d):
    """Weight standardization per output filter, as in BiT's ResNetV2: not Conv2d's math."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A linear layer that scales its weight in the forward."""

    def forward(self, x):
        return F.linear(x, 0.5 * self.weight, self.bias)


class SquaredKernelConv(nn.Conv2d):
    """Overrides only ``_conv_forward``, which Conv2d's inherited forward calls."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * weight.abs(), bias)


class NamedConv(nn.Conv2d):
    """A subclass that keeps Conv2d's forward: Conv2d's rule is its math."""

    def extra_repr(self):
        return "named " + super().extra_repr()


SUBCLASS_CASES = {  # name: (model, input shape, whether a fast rule applies)
    "standardized-conv": lambda: (_conv_case(lambda: StandardizedConv(3, 4, 3, padding=1),
                                             (3, 6, 6))()[0], (3, 6, 6), False),
    "scaled-linear": lambda: (nn.Sequential(ScaledLinear(7, 5), nn.Tanh(), nn.Linear(5, 3)),
                              (7,), False),
    "conv-forward-override": lambda: (_conv_case(lambda: SquaredKernelConv(2, 3, 3), (2, 6, 6))()[0],
                                      (2, 6, 6), False),
    "subclass-keeping-forward": lambda: (_conv_case(lambda: NamedConv(2, 3, 3, stride=2), (2, 7, 7))()[0],
                                         (2, 7, 7), True),
}


@pytest.mark.parametrize("case", sorted(SUBCLASS_CASES))
def test_layer_subclasses_get_a_rule_only_when_it_is_their_math(case):
    torch.manual_seed(0)
    model, shape, fast = SUBCLASS_CASES[case]()
    layer = model[0]
    base = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Linear
    assert (rule_for(layer) is RULES[base]) == fast and (fast or rule_for(layer) is None)
    _check(model, shape, 5, torch.float64, classes=3, modes=MODES if fast else ("auto", "func"))
    if not fast:  # no rule: ghost names the layer instead of using its parent's formula
        with pytest.raises(UnsupportedLayerError, match=rf"0 \({type(layer).__name__}\)"):
            per_example_grad_norms(model, torch.randn(2, *shape, dtype=torch.float64),
                                   torch.tensor([0, 1]), mode="ghost")


def _tiny_bit_resnet() -> nn.Module:
    """A tiny timm ResNetV2 with BiT's weight-standardized convs, randomly initialized."""
    try:
        from memkern.network.models.zoo import import_torchvision
        import_torchvision()
        from timm.layers import GroupNormAct, StdConv2d
        from timm.models.resnetv2 import ResNetV2
    except (ConfigError, ImportError, RuntimeError) as e:
        pytest.skip(f"timm does not import here: {e}")
    model = ResNetV2(layers=[1], channels=(8,), num_classes=3, stem_chs=8, stem_type="fixed",
                     conv_layer=partial(StdConv2d, eps=1e-8),
                     norm_layer=partial(GroupNormAct, num_groups=2))
    assert any(type(m) is StdConv2d for m in model.modules())
    return model


def test_timm_model_with_standardized_convs_matches_loop():
    torch.manual_seed(0)
    model = _tiny_bit_resnet()
    _check(model, (3, 12, 12), 3, torch.float64, classes=3, modes=("auto", "func"))
    with pytest.raises(UnsupportedLayerError, match="StdConv2d"):
        per_example_grad_norms(model, torch.randn(2, 3, 12, 12, dtype=torch.float64),
                               torch.tensor([0, 1]), mode="ghost")


CONV_FORM_CASES = {  # (conv, input shape): strides, dilations, groups, paddings, Conv1d
    "3x3-pad1": (lambda: nn.Conv2d(3, 5, 3, padding=1, bias=False), (3, 7, 9)),
    "5x5-stride2-pad2": (lambda: nn.Conv2d(4, 6, 5, stride=2, padding=2), (4, 11, 8)),
    "stride-2x3-dilation-2x1": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 3), dilation=(2, 1)),
                                (2, 13, 10)),
    "groups3-valid": (lambda: nn.Conv2d(6, 9, (2, 3), groups=3, bias=False), (6, 6, 7)),
    "same-reflect-dilation2-groups2": (
        lambda: nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding="same", padding_mode="reflect"),
        (4, 9, 7)),
    "1x1-stride3": (lambda: nn.Conv2d(3, 4, 1, stride=3), (3, 8, 8)),
    "conv1d-stride2-dilation2": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2),
                                 (3, 11)),
}


@pytest.mark.parametrize("form", ["direct", "input_gram"])
@pytest.mark.parametrize("case", sorted(CONV_FORM_CASES))
def test_both_conv_forms_equal_per_example_weight_gradients(case, form):
    """Each exact form on its own (the chooser picks one per layer), float64, fresh inputs."""
    from memkern.experiments.gradients.norms import conv
    torch.manual_seed(sum(map(ord, case + form)))
    make, shape = CONV_FORM_CASES[case]
    layer = make().double()
    x = torch.randn(4, *shape, dtype=torch.float64)
    g = torch.randn_like(layer(x))
    expected = torch.stack([
        torch.autograd.grad(layer(x[b:b + 1]), layer.weight, g[b:b + 1])[0].square().sum()
        for b in range(len(x))])
    got = getattr(conv, f"{form}_sq_norms")(layer, x, g)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
