"""``memkern evaluate``."""
from __future__ import annotations

import json

import click

from memkern.cli.options import (checkpoint_from, checkpoint_options, data_dir_option,
                                 device_option, progress_option)
from memkern.training.evaluate import EVAL_MODES, SPLITS


@click.command()
@checkpoint_options("A checkpoint written by `memkern train`")
@click.option("--mode", type=click.Choice(EVAL_MODES), default="own", show_default=True,
              help="Tied-dropout masks: own (each training example's own; test in keep mode), "
                   "keep (memorization channels x p_mem), drop (memorization channels removed).")
@click.option("--max-candidates", type=int, default=100_000, show_default=True,
              help="Text runs: strings scored per canary by the exact exposure search "
                   "(beyond: estimated; docs/text.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as one JSON line.")
@data_dir_option
@device_option
@progress_option
def evaluate(ckpt, run_dir, mode, max_candidates, as_json, data_dir, device, progress):
    """Clean-train, noisy-train and test accuracy of a checkpoint, written to
    <run>/evaluate_<epoch>_<mode>.json.

    \b
    Example:
      memkern evaluate --ckpt runs/tied/checkpoints/epoch_010.safetensors --mode drop
      memkern evaluate --run runs/tied --mode keep
      memkern evaluate --run runs/lm --max-candidates 1000000
    """
    from memkern.training.evaluate_run import evaluate_checkpoint

    record, path = evaluate_checkpoint(ckpt=checkpoint_from(ckpt, run_dir), mode=mode,
                                       device=device, data_dir=data_dir,
                                       max_candidates=max_candidates, progress=progress,
                                       silent=as_json)
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
        return
    if "heldout_bpb" in record:
        from memkern.report.text_summaries import text_training_summary

        click.echo(f"mode {mode}: {text_training_summary([record])}  (saved to {path})")
        return
    accs = "  ".join(f"{k} {record[k]:.4f}" for k in SPLITS)
    click.echo(f"epoch {record['epoch']} mode {mode}: {accs}  (saved to {path})")
