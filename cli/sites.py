"""``memkern sites``: a model's channel sites and layer groups."""
from __future__ import annotations

import click

from memkern.models import MODELS, build_model, layer_groups
from memkern.sites import site_infos


@click.command()
@click.option("--model", "model_name", type=click.Choice(sorted(MODELS)), default="cnn",
              show_default=True)
@click.option("--in-channels", type=int, default=1, show_default=True)
@click.option("--image-size", type=int, default=8, show_default=True)
@click.option("--num-classes", type=int, default=10, show_default=True)
def sites(model_name, in_channels, image_size, num_classes):
    """List a model's channel sites (stable order) and layer groups.

    \b
    Example:
      memkern sites --model resnet9 --in-channels 3 --image-size 32
    """
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels,
                        image_size=image_size)
    infos = site_infos(model)
    defaults = set(getattr(model, "default_dropout_sites", ()))
    click.echo(f"channel sites of {model_name} ({len(infos)}; * = default tied-dropout site):")
    for i, s in enumerate(infos):
        star = "*" if s.name in defaults else " "
        click.echo(f" {star}{i:3d}  {s.name:<28} {s.position:<16} {s.channels:5d} channels")
    click.echo(f"layer groups of {model_name}:")
    for g in layer_groups(model):
        count = sum(p.numel() for n, p in model.named_parameters() if n in g.param_names)
        click.echo(f"  {g.name:<20} {len(g.param_names):3d} tensors {count:10,d} parameters")
