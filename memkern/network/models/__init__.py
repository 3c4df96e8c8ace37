"""The paper's models, each with named channel sites and layer groups.

``build_model(name, num_classes=..., in_channels=..., image_size=...)`` builds one; ``name`` may
also name a model elsewhere (``torchvision:resnet18``, ``timm:...``, ``package.module:factory``;
see :mod:`memkern.network.models.zoo`), whose sites are found and attached by hooks.
``layer_groups(model)`` and ``memkern.network.sites.site_infos(model)`` describe it.
Text models: ``gpt[?...]`` (:mod:`memkern.network.models.gpt`) and ``hf:gpt2[?...]``
(:mod:`memkern.network.models.hf_gpt2`), built by ``build_text_model``.
"""
from __future__ import annotations

from torch import nn

from memkern.errors import ConfigError
from memkern.network.models.blocks import NORMS
from memkern.network.models.gpt import build_gpt, is_gpt
from memkern.network.models.groups import LayerGroup, layer_groups
from memkern.network.models.hf_gpt2 import build_hf_gpt2, is_hf_spec
from memkern.network.models.resnet9 import ResNet9
from memkern.network.models.resnet50 import ResNet50
from memkern.network.models.small import MLP, SmallCNN
from memkern.network.models.vit import ViT
from memkern.network.models.zoo import build_zoo_model, is_spec
from memkern.network.sites import name_sites

MODELS = {"cnn": SmallCNN, "mlp": MLP, "resnet9": ResNet9, "resnet50": ResNet50, "vit": ViT}
TEXT_MODELS = ("gpt", "hf:gpt2")

__all__ = ["MODELS", "TEXT_MODELS", "LayerGroup", "build_model", "build_text_model",
           "check_fits_memory", "is_gpt", "is_text_model", "layer_groups"]


def is_text_model(name: str) -> bool:
    """Whether ``name`` names a language model (``gpt[?...]`` or ``hf:...``)."""
    return is_gpt(name) or is_hf_spec(name)


def check_fits_memory(name: str, *, num_classes: int, in_channels: int, image_size: int) -> None:
    """ConfigError when memkern's model ``name`` for these sizes, or the example input its sites
    are found with, would not fit in half this machine's memory: its parameters are counted on
    the meta device, where nothing is allocated."""
    import os

    import torch

    budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    need = 2 * in_channels * image_size * image_size * 4  # the [2, C, S, S] example
    if name in MODELS and need <= budget:
        with torch.device("meta"):
            model = MODELS[name](num_classes=num_classes, in_channels=in_channels,
                                 image_size=image_size, norm="batch")
        need += sum(p.numel() * p.element_size() for p in model.parameters())
    if need > budget:
        raise ConfigError(f"{name} for {in_channels}-channel {image_size}x{image_size} images "
                          f"needs {need / 2**30:,.1f} GiB, more than half of this machine's "
                          f"memory ({budget * 2 / 2**30:,.1f} GiB); choose smaller sizes")


def build_model(name: str, *, num_classes: int, in_channels: int, image_size: int,
                norm: str = "batch") -> nn.Module:
    """A freshly initialized model; its sites are named after their module paths."""
    if is_text_model(name):
        raise ConfigError(f"model {name!r} reads text: train it on --dataset text:shakespeare, "
                          f"text:stdlib or text:PATH")
    if is_spec(name):
        if norm != "batch":
            raise ConfigError(f"--norm {norm} applies to memkern's own models, not {name!r}")
        return build_zoo_model(name, num_classes=num_classes, in_channels=in_channels,
                               image_size=image_size)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or "
                          f"name one as torchvision:NAME, timm:NAME or package.module:factory")
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    model = MODELS[name](num_classes=num_classes, in_channels=in_channels,
                         image_size=image_size, norm=norm)
    name_sites(model)
    return model


def build_text_model(name: str, *, vocab: int, context: int) -> nn.Module:
    """A freshly initialized language model over ``vocab`` tokens with ``context`` positions."""
    if is_hf_spec(name):
        return build_hf_gpt2(name, vocab=vocab, context=context)
    if not is_gpt(name):
        raise ConfigError(f"model {name!r} reads images; a text dataset needs --model gpt "
                          f"(sizes as gpt?layers=2&width=64&heads=2&mlp=256) or hf:gpt2[?...]")
    return build_gpt(name, vocab=vocab, context=context)
