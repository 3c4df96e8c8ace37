"""``memkern train``."""
from __future__ import annotations

import click

from memkern.cli.options import (DATASET_HELP, DatasetSpec, data_dir_option, device_option,
                                 model_option, parse_reps, progress_option, split_names,
                                 trust_model_code_option)
from memkern.training.config import LR_SCHEDULES, OPTIMIZERS, PRESETS

# CLI option name -> TrainConfig field, one to one.
CONFIG_OPTIONS = {"dataset": "dataset", "model": "model", "norm": "norm", "noise": "noise",
                  "seed": "seed", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
                  "optimizer": "optimizer", "weight_decay": "weight_decay", "warmup": "warmup",
                  "lr_schedule": "lr_schedule", "augment": "augment",
                  "tied_dropout": "tied_dropout", "p_gen": "p_gen", "p_mem": "p_mem",
                  "sites": "dropout_sites", "seq_len": "seq_len", "canaries": "canaries",
                  "canary_reps": "canary_reps", "dup_paragraphs": "dup_paragraphs",
                  "dup_reps": "dup_reps", "text_bytes": "text_bytes"}


def _explicit(ctx: click.Context) -> dict:
    """The config fields the user set on the command line (not defaults)."""
    out = {}
    for option, field in CONFIG_OPTIONS.items():
        if ctx.get_parameter_source(option) == click.core.ParameterSource.COMMANDLINE:
            value = ctx.params[option]
            out[field] = (tuple(split_names(value)) if option == "sites" else
                          parse_reps(value) if option == "canary_reps" else value)
    return out


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Start from a named preset.")
@click.option("--dataset", type=DatasetSpec(), default="digits", show_default=True,
              help=DATASET_HELP)
@model_option
@click.option("--norm", type=click.Choice(["batch", "group"]), default="batch", show_default=True)
@click.option("--noise", type=float, default=0.1, show_default=True,
              help="Fraction of training labels flipped, in [0, 1).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=int, help="[default: preset's, 30 for digits]")
@click.option("--batch-size", type=int, help="[default: preset's, 64 for digits]")
@click.option("--lr", type=float, help="Peak learning rate. [default: preset's]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), help="sgd (momentum 0.9) or adamw "
              "(betas 0.9, 0.99). [default: preset's, sgd]")
@click.option("--weight-decay", type=float)
@click.option("--warmup", type=float, help="Fraction of steps of linear warm-up.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="cosine",
              show_default=True, help="After the warm-up: cosine decay to zero, or constant "
              "(with --warmup 0 such a run can later be extended).")
@click.option("--augment/--no-augment", default=False, help="Crop (+flip) for cifar10/svhn.")
@click.option("--tied-dropout/--no-tied-dropout", default=False,
              help="Example-tied dropout at channel sites (docs/method.md, Experiment 5).")
@click.option("--p-gen", type=float, default=0.2, show_default=True,
              help="Fraction of generalization channels (always on).")
@click.option("--p-mem", type=float, default=0.1, show_default=True,
              help="Probability an example keeps a memorization channel.")
@click.option("--sites", multiple=True, help="Tied-dropout site names (comma-separated or "
              "repeated); default: the model's. See `memkern sites`.")
@click.option("--seq-len", type=int, help="Text runs: window length in bytes. [default: 128]")
@click.option("--canaries", type=int, help="Text runs: canaries 'The code of <word> is "
              "<8 digits>.' planted in the training text. [default: 0]")
@click.option("--canary-reps", help="Text runs: copies of each canary, cycled over the canaries. "
              "[default: 1,4,16,64,256]")
@click.option("--dup-paragraphs", type=int, help="Text runs: held-out paragraphs planted in the "
              "training text. [default: 0]")
@click.option("--dup-reps", type=int, help="Text runs: copies of each paragraph. [default: 16]")
@click.option("--text-bytes", type=int, help="Text runs: use the first N bytes of the training "
              "works (0: all). [default: 0]")
@data_dir_option
@click.option("--download", is_flag=True, help="Fetch missing dataset files (checksum-verified).")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint; "
              "with a larger --epochs, extend a finished run whose schedule allows it.")
@device_option
@click.option("--track-grads", is_flag=True, help="Record each epoch's summed clean and noisy "
              "gradient norms and cosine per layer group in OUT/grads/live.jsonl.")
@progress_option
@trust_model_code_option
@click.pass_context
def train(ctx: click.Context, out, preset, resume, device, data_dir, download, progress,
          track_grads, **_):
    """Train a model with label noise, checkpointing every epoch into a run directory.

    \b
    Example:
      memkern train --dataset digits --model cnn --noise 0.1 --epochs 30 --out runs/digits
      memkern train --dataset digits --model torchvision:resnet18 --epochs 5 --out runs/tv
      memkern train --out runs/digits --resume
      memkern train --out runs/flat --lr-schedule constant --warmup 0 --epochs 20
      memkern train --out runs/flat --resume --epochs 40
      memkern train --dataset folder:my_images --model cnn --noise 0.1 --out runs/mine
      memkern train --out runs/digits-tracked --track-grads
      memkern train --preset gpt-shakespeare --out runs/lm
      memkern train --dataset text:stdlib --model 'gpt?layers=2&width=64' --canaries 10 \
        --canary-reps 1,16 --text-bytes 200000 --epochs 2 --out runs/lm-small
      torchrun --nproc-per-node 2 -m memkern.cli train --out runs/digits-ddp
    """
    from memkern.report.summaries import training_summary
    from memkern.training.distributed import World
    from memkern.training.train import train_from_options

    options = _explicit(ctx)
    if not resume:
        options["data_dir"] = data_dir
    run = train_from_options(out=out, options=options, preset=preset, resume=resume,
                             device=device, data_dir=data_dir, download=download,
                             progress=progress, track_grads=track_grads)
    if World.from_env().main:  # under torchrun, rank 0 wrote the run and reports it
        click.echo(training_summary(run.load_metrics()))
        click.echo(f"run saved to {run.root} (checkpoints: {len(run.epochs())}, "
                   f"metrics: {run.metrics_path})")
