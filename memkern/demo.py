"""``memkern demo``: every experiment of the paper on the embedded digits data, in one run
directory, in minutes on a laptop CPU. Each step resumes, so a killed demo picks up where it was."""
from __future__ import annotations

from pathlib import Path

import click

from memkern.config import TrainConfig
from memkern.evaluate import evaluate_checkpoint
from memkern.report import write_report
from memkern.retrain import retrain
from memkern.rewind import rewind
from memkern.runs import RunDir
from memkern.train import train

LOCALIZE_CLEAN = 144  # as many clean examples as the 10% noise flips on digits' 1,437
LOCALIZE_REF_BATCH = 128  # a quarter of the paper's 512: digits' localization in minutes on CPU
GRADS_EPOCHS = [0, 5, 10, 15, 20, 25, 30]


def run_demo(*, out: str | Path, device: str = "auto", progress: bool = True) -> Path:
    """Train a plain and a tied-dropout cnn with 10% label noise, then account gradients,
    rewind, retrain and localize the plain one; returns the report index."""
    from memkern.accounting import gradient_accounting
    from memkern.localize.run import localize

    root = Path(out)
    plain, tied = root / "plain", root / "tied"
    for name, config in (("plain", TrainConfig.from_name("cnn-digits")),
                         ("tied", TrainConfig.from_name("cnn-digits-tied"))):
        run = RunDir(root / name)
        if not run.epochs() or run.epochs()[-1] < config.epochs:
            click.echo(f"[demo] training {name}: {config.model} on {config.dataset}", err=True)
            train(config if not run.has_content() else None, out=run.root,
                  resume=run.has_content(), device=device, progress=progress)
    final = RunDir(plain).final_checkpoint()
    for mode in ("keep", "drop"):
        evaluate_checkpoint(ckpt=RunDir(tied).final_checkpoint(), mode=mode, device=device)
    click.echo("[demo] gradient accounting", err=True)
    gradient_accounting(run=plain, epochs=GRADS_EPOCHS, device=device, progress=progress)
    click.echo("[demo] layer rewinding and retraining", err=True)
    rewind(run=plain, device=device, progress=progress)
    retrain(run=plain, device=device, progress=progress)
    click.echo("[demo] localizing all noisy and as many clean examples", err=True)
    localize(ckpt=final, examples="noisy", ref_batch=LOCALIZE_REF_BATCH, device=device,
             progress=progress)
    localize(ckpt=final, examples="clean", limit=LOCALIZE_CLEAN, ref_batch=LOCALIZE_REF_BATCH,
             device=device, progress=progress)
    write_report(tied)
    return write_report(plain)
