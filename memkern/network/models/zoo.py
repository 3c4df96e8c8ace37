"""Models by reference: ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``.

Constructor keywords follow a ``?``, joined by ``&``, values read as Python literals (numbers,
True/False, None, quoted strings, flat tuples/lists of those; an unquoted word is a string)::

    torchvision:resnet18
    timm:vit_tiny_patch16_224?img_size=32&patch_size=4
    my_package.models:build?width=64        # build(num_classes=, in_channels=, image_size=,
                                            #       width=64) -> nn.Module

torchvision models are built with ``num_classes``; when the data does not have 3 channels their
first 3-channel conv is rebuilt for ``in_channels``. timm models get ``num_classes`` and
``in_chans``. ``group_depth=N`` is memkern's own key (not passed on): layer groups at module
depth N (see :mod:`memkern.network.attach`). Weights are always freshly initialized; sites are found by
:func:`memkern.network.attach.attach_sites` on a ``[2, in_channels, image_size, image_size]`` input.
A factory's keywords must be parameters it declares, of their annotated types. A spec that
cannot be imported or built is a ConfigError. A spec read from a file must first pass
:func:`memkern.network.models.trust.check_file_spec`.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field

import torch
from torch import nn

from memkern.network.attach import attach_sites
from memkern.errors import ConfigError

ZOO_INSTALL = "pip install 'memkern[zoo]' (torchvision and timm, with --no-deps beside a CPU torch)"
ZOO_SOURCES = ("torchvision", "timm")
_SCALARS = (bool, int, float, str, type(None))
_torchvision_ops: torch.library.Library | None = None  # kept alive: the declared op schemas


@dataclass(frozen=True)
class ModelSpec:
    source: str  # "torchvision", "timm", or the module holding a factory
    name: str
    kwargs: dict = field(default_factory=dict)
    group_depth: int = 1


def is_spec(model: str) -> bool:
    return ":" in model


def parse_spec(spec: str) -> ModelSpec:
    source, _, rest = spec.partition(":")
    name, _, query = rest.partition("?")
    if not source or not name:
        raise ConfigError(f"model spec {spec!r} needs the form SOURCE:NAME[?key=value&...], "
                          f"e.g. torchvision:resnet18 or timm:vit_tiny_patch16_224?img_size=32")
    kwargs = parse_keywords(query, spec)
    depth = kwargs.pop("group_depth", 1)
    if not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"model spec {spec!r}: group_depth must be an integer >= 1")
    return ModelSpec(source, name, kwargs, depth)


def parse_keywords(query: str, spec: str) -> dict:
    """``"a=1&b=x"`` -> ``{"a": 1, "b": "x"}`` (values read as Python literals, else strings);
    ``spec`` names the whole model in errors."""
    kwargs = {}
    for part in filter(None, query.split("&")):
        key, eq, text = part.partition("=")
        if not eq or not key.isidentifier():
            raise ConfigError(f"model spec {spec!r}: {part!r} is not key=value")
        value = _literal(text)
        if not _is_plain(value):
            raise ConfigError(f"model spec {spec!r}: {key}={text} is a {type(value).__name__}; "
                              f"keyword values are numbers, True/False, None, strings or flat "
                              f"tuples/lists of those")
        kwargs[key] = value
    return kwargs


def _is_plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def import_torchvision():
    """``torchvision``, also where its compiled ops do not load (a CUDA build of torchvision
    beside a CPU torch): its import then registers fake kernels for ``nms``/``qnms`` and stops on
    the missing schemas; declaring those two schemas lets the models (plain PyTorch) import. Says
    so on stderr when it does."""
    global _torchvision_ops
    try:
        import torchvision
    except ModuleNotFoundError:
        raise ConfigError(f"torchvision is not installed: {ZOO_INSTALL}") from None
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _torchvision_ops = torch.library.Library("torchvision", "DEF")
        _torchvision_ops.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_ops.define("qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        print("memkern: warning: torchvision's compiled ops do not load with this torch; "
              "declared nms/qnms so its models import (detection ops unavailable)", file=sys.stderr)
        import torchvision
    return torchvision


def _torchvision(spec: ModelSpec, num_classes: int, in_channels: int) -> nn.Module:
    tv = import_torchvision()
    model = tv.models.get_model(spec.name, weights=None, num_classes=num_classes, **spec.kwargs)
    if in_channels != 3:
        _rebuild_first_conv(model, in_channels)
    return model


def _rebuild_first_conv(model: nn.Module, in_channels: int) -> None:
    for path, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            parent_path, _, attr = path.rpartition(".")
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                            conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                            conv.padding_mode)
            setattr(model.get_submodule(parent_path), attr, new)
            return
    raise ConfigError(f"no 3-channel conv in {type(model).__name__} to rebuild for "
                      f"{in_channels}-channel images")


def _timm(spec: ModelSpec, num_classes: int, in_channels: int) -> nn.Module:
    import_torchvision()  # timm imports it
    try:
        import timm
    except ModuleNotFoundError:
        raise ConfigError(f"timm is not installed: {ZOO_INSTALL}") from None
    return timm.create_model(spec.name, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels, **spec.kwargs)


def _factory(spec: ModelSpec, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    try:
        module = importlib.import_module(spec.source)
    except ImportError as e:
        raise ConfigError(f"cannot import {spec.source!r} for model {spec.source}:{spec.name} "
                          f"({e}); install it or add its folder to PYTHONPATH") from None
    factory = getattr(module, spec.name, None)
    if not callable(factory):
        raise ConfigError(f"{spec.source} has no callable {spec.name!r} to build the model")
    _check_keywords(factory, spec)
    return factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                   **spec.kwargs)


def _accepts(hint, value) -> bool:
    """Whether ``value`` fits annotation ``hint``; hints other than plain types pass (unknown)."""
    if isinstance(hint, str) or hint is inspect.Parameter.empty:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in _SCALARS:
        return isinstance(value, hint)
    if hint in (tuple, list) or typing.get_origin(hint) in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


def _check_keywords(factory, spec: ModelSpec) -> None:
    """Each spec keyword is a parameter ``factory`` declares, of its annotated type."""
    try:
        signature = inspect.signature(factory)
        hints = typing.get_type_hints(factory)
    except (TypeError, ValueError, NameError):  # no introspectable signature: nothing to check
        return
    params = signature.parameters
    open_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in spec.kwargs.items():
        if key not in params and not open_kw:
            raise ConfigError(f"model {spec.source}:{spec.name}: unexpected keyword argument "
                              f"{key!r}; it takes {', '.join(params)}")
        hint = hints.get(key, params[key].annotation if key in params else inspect.Parameter.empty)
        if not _accepts(hint, value):
            raise ConfigError(f"model {spec.source}:{spec.name}: {key}={value!r} is not of its "
                              f"declared type {getattr(hint, '__name__', hint)}")


def build_zoo_model(spec_text: str, *, num_classes: int, in_channels: int,
                    image_size: int) -> nn.Module:
    """The model ``spec_text`` names, freshly initialized, with its sites attached."""
    spec = parse_spec(spec_text)
    try:
        if spec.source == "torchvision":
            model = _torchvision(spec, num_classes, in_channels)
        elif spec.source == "timm":
            model = _timm(spec, num_classes, in_channels)
        else:
            model = _factory(spec, num_classes, in_channels, image_size)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a foreign constructor: any failure is bad input
        text = " ".join(str(e).split())[:300]
        raise ConfigError(f"cannot build model {spec_text!r}: {type(e).__name__}: {text}") \
            from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec_text!r} built a {type(model).__name__}, not an nn.Module")
    g = torch.Generator().manual_seed(0)  # the global generator stays as the build left it
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    example = torch.randn(2, in_channels, image_size, image_size, generator=g, dtype=dtype)
    attach_sites(model, example, group_depth=spec.group_depth)
    return model
