"""``memkern localize``."""
from __future__ import annotations

import click

from memkern.cli.options import (checkpoint_from, checkpoint_options, data_dir_option,
                                 device_option, progress_option)


@click.command()
@checkpoint_options("Checkpoint (its run's config rebuilds model, data and noise)")
@click.option("--examples", help="noisy | clean | all (noisy and clean interleaved) | FILE of "
              "indices [default: noisy]; a text run: canaries | paragraphs | all | FILE of "
              "insert ids [default: canaries].")
@click.option("--limit", type=int, help="Localize at most N of the selected examples.")
@click.option("--method", type=click.Choice(["greedy", "exhaustive"]), default="greedy",
              show_default=True, help="greedy: gradient score (the paper's); exhaustive: the "
              "channel with the lowest true objective at each step (docs/method.md).")
@click.option("--max-channels", type=int, default=50, show_default=True,
              help="Give up (flipped: false) after zeroing this many channels.")
@click.option("--eot", type=int, default=0, show_default=True,
              help="Gaussian-noised copies of the target averaged in the objective.")
@click.option("--ref-batch", type=int, help="Other training examples (a text run: clean "
              "windows) kept right by the objective. [default: 512; text: 64]")
@click.option("--candidates", type=int, help="Exhaustive: scan only the top K channels by "
              "gradient score at each step (default: all).")
@click.option("--sites", multiple=True, help="Site names (comma-separated or repeated); "
              "default: every pre-norm site. See `memkern sites`.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="JSON-lines output. [default: <run dir>/localize.jsonl]")
@click.option("--chunk", type=int, default=32, show_default=True,
              help="Targets localized together (and saved) at a time.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the reference batch and the EoT noise.")
@click.option("--save-edited", is_flag=True,
              help="Also keep each target's edited model: a run directory X.edited/<target>/ "
                   "beside the output X.jsonl whose checkpoint has the target's channels "
                   "removed from its weights; open it with --run like any run.")
@device_option
@data_dir_option
@progress_option
def localize(ckpt, run_dir, examples, limit, method, max_channels, eot, ref_batch, candidates,
             sites, out, chunk, seed, save_edited, device, data_dir, progress):
    """Find the channels whose zeroing flips each example's prediction (docs/method.md, Experiment 4).

    Appends one line per example to the output (a killed run resumes where it stopped),
    then writes X.summary.json and X.png beside its output X.jsonl (over every result in
    the output) and prints a table of the examples asked for.
    Under torchrun each process localizes its share of the examples; rank 0 merges the
    results into the output and prints the table.
    On a text run the targets are its canaries (or duplicated paragraphs), the sites its MLP
    neurons, and each line adds what the edit cost (docs/text.md).
    --save-edited keeps every edited model as a run of its own (docs/method.md, "Keeping the
    edited model").

    \b
    Example:
      memkern localize --ckpt runs/digits/checkpoints/epoch_030.safetensors \\
          --examples all --limit 288
      memkern localize --run runs/digits --examples noisy
      memkern localize --run runs/lm --examples canaries --save-edited
      memkern evaluate --run runs/lm/localize.edited/canary_000
      torchrun --nproc-per-node 2 -m memkern.cli localize \\
          --ckpt runs/digits/checkpoints/epoch_030.safetensors --examples all
    """
    from memkern.experiments.localize import format_table, localize as run_localize
    from memkern.experiments.localize.summary import summary_paths
    from memkern.experiments.text.localize_summary import format_text_table

    result = run_localize(
        ckpt=checkpoint_from(ckpt, run_dir), examples=examples, limit=limit, method=method,
        max_channels=max_channels,
        eot=eot, ref_batch=ref_batch, candidates=candidates,
        sites=[s for v in sites for s in v.split(",") if s] or None, out=out, chunk=chunk,
        seed=seed, device=device, data_dir=data_dir, progress=progress, save_edited=save_edited)
    if result.summary is None:  # another rank of a torchrun launch: rank 0 reports
        return
    click.echo((format_text_table if result.summary.get("text") else format_table)(
        result.summary))
    summary, figure = summary_paths(result.path)
    click.echo(f"results: {result.path}; summary of all its results (what `memkern report` "
               f"shows for the run's own output): {summary}, figure: {figure}")
    if result.edited is not None:
        where = result.edited[0].parent if result.edited else "none (no targets)"
        click.echo(f"edited models ({len(result.edited)} runs, one per target): {where}")
