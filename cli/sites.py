"""``memkern sites``: a model's channel sites and layer groups."""
from __future__ import annotations

import click

from memkern.cli.options import (data_dir_option, model_option, run_option,
                                 trust_model_code_option)


@click.command()
@model_option
@run_option("Run directory written by `memkern train`: list its model (as trained, tied "
            "dropout included) instead of --model's.", required=False)
@click.option("--in-channels", type=click.IntRange(1, 4096), default=1, show_default=True)
@click.option("--image-size", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--num-classes", type=click.IntRange(2, 1_000_000), default=10, show_default=True)
@click.option("--seq-len", type=click.IntRange(1, 1_000_000), default=128, show_default=True,
              help="A text model's context (gpt, hf:gpt2).")
@data_dir_option
@trust_model_code_option
def sites(model, run_dir, in_channels, image_size, num_classes, seq_len, data_dir):
    """List a model's channel sites (stable order) and layer groups.

    \b
    Example:
      memkern sites --model resnet9 --in-channels 3 --image-size 32
      memkern sites --model 'timm:vit_tiny_patch16_224?img_size=32&patch_size=4' \\
        --in-channels 3 --image-size 32
      memkern sites --model 'gpt?layers=2&width=64'
      memkern sites --model 'hf:gpt2?n_layer=2&n_embd=64&n_head=2'
      memkern sites --run runs/lm
    """
    from memkern.data.text import VOCAB
    from memkern.network.models import (build_model, build_text_model, check_fits_memory,
                                        is_text_model, layer_groups)
    from memkern.network.sites import channel_sites

    if run_dir is not None:
        from memkern.rundir.context import open_run

        given = [o for o in ("model", "in_channels", "image_size", "num_classes", "seq_len")
                 if click.get_current_context().get_parameter_source(o).name != "DEFAULT"]
        if given:
            raise click.UsageError(f"--run lists the run's own model; drop "
                                   f"--{given[0].replace('_', '-')}")

        ctx = open_run(run_dir, device="cpu", data_dir=data_dir, text_ok=True)
        built, model = ctx.model, f"{ctx.config.model} ({run_dir})"
    elif is_text_model(model):
        built = build_text_model(model, vocab=VOCAB, context=seq_len)
    else:
        check_fits_memory(model, num_classes=num_classes, in_channels=in_channels,
                          image_size=image_size)
        built = build_model(model, num_classes=num_classes, in_channels=in_channels,
                            image_size=image_size)
    found = channel_sites(built)
    defaults = set(getattr(built, "default_dropout_sites", ()))
    click.echo(f"channel sites of {model} ({len(found)}; * = default tied-dropout site):")
    for i, (name, s) in enumerate(found.items()):
        star = "*" if name in defaults else " "
        layout = "  (tokens: channels last)" if s.channel_dim == -1 else ""
        click.echo(f" {star}{i:3d}  {name:<28} {s.position:<16} {s.channels:5d} channels{layout}")
    for reason in getattr(built, "memkern_skipped_sites", ()):
        click.echo(f"  no site: {reason}")
    click.echo(f"layer groups of {model}:")
    for g in layer_groups(built):
        count = sum(p.numel() for n, p in built.named_parameters() if n in g.param_names)
        click.echo(f"  {g.name:<20} {len(g.param_names):3d} tensors {count:10,d} parameters")
