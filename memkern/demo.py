"""``memkern demo``: every experiment of the paper on the embedded digits data, on a plain run and
on an example-tied-dropout run, and the memorization scores of both, in minutes on a laptop CPU;
``--text``: the same study of a byte GPT with planted canaries (docs/text.md). Each step
resumes, so a killed demo picks up where it was."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from memkern.training.config import TrainConfig
from memkern.training.evaluate_run import evaluate_checkpoint
from memkern.report.page import write_report
from memkern.experiments.retrain.run import retrain
from memkern.experiments.rewind.run import rewind
from memkern.rundir.paths import RunDir
from memkern.training.train import train

LOCALIZE_CLEAN = 144  # as many clean examples as the 10% noise flips on digits' 1,437
LOCALIZE_REF_BATCH = 128  # a quarter of the paper's 512: digits' localization in minutes on CPU
GRADS_EPOCHS = [0, 5, 10, 15, 20, 25, 30]
RUNS = {"plain": "cnn-digits", "tied": "cnn-digits-tied"}
TEXT_RUNS = {"plain": "gpt-stdlib", "tied": "gpt-stdlib-tied"}


def _trained(name: str, preset: str, out: Path, *, device: str, progress: bool,
             say: Callable[[str], None]) -> RunDir:
    """The demo's run ``name`` of ``preset``, trained (or resumed) to the preset's last epoch."""
    config = TrainConfig.from_name(preset)
    run = RunDir(out / name)
    if not run.epochs() or run.epochs()[-1] < config.epochs:
        say(f"[demo] training {name}: {config.model} on {config.dataset}"
            + (" with example-tied dropout" if config.tied_dropout else ""))
        train(None if run.has_content() else config, out=run.root,
              resume=run.has_content(), device=device, progress=progress)
    return run


def run_text_demo(*, out: str | Path, device: str = "auto", progress: bool = True,
                  say: Callable[[str], None] = print) -> Path:
    """Train a byte GPT with 8 planted canaries with and without example-tied dropout, then
    localize every canary and score every window of both; returns the report page that shows
    both runs side by side, ``<out>/report/index.html``."""
    from memkern.experiments.localize.run import localize
    from memkern.experiments.scores.run import score_run

    for name, preset in TEXT_RUNS.items():
        run = _trained(name, preset, Path(out), device=device, progress=progress, say=say)
        say(f"[demo] {name}: localizing every canary in the MLP neurons")
        localize(ckpt=run.final_checkpoint(), examples="canaries", device=device,
                 progress=progress)
        say(f"[demo] {name}: scoring every window, benchmarked on the planted ones")
        score_run(run=run.root, benchmark=True, device=device, progress=progress)
    say("[demo] report: plain and tied runs side by side")
    return write_report(run=Path(out) / "plain", compare=Path(out) / "tied",
                        out=Path(out) / "report")


def run_demo(*, out: str | Path, device: str = "auto", progress: bool = True,
             say: Callable[[str], None] = print) -> Path:
    """Train a plain and a tied-dropout cnn with 10% label noise, then evaluate, account
    gradients, rewind, retrain, localize and score both; ``say`` gets one line per step.
    Returns the one report page that shows both runs side by side,
    ``<out>/report/index.html``."""
    from memkern.experiments.gradients.run import gradient_accounting
    from memkern.experiments.localize.run import localize
    from memkern.experiments.scores.run import score_run

    for name, preset in RUNS.items():
        config = TrainConfig.from_name(preset)
        run = _trained(name, preset, Path(out), device=device, progress=progress, say=say)
        final = run.final_checkpoint()
        if config.tied_dropout:
            for mode in ("keep", "drop"):
                evaluate_checkpoint(ckpt=final, mode=mode, device=device)
        say(f"[demo] {name}: gradient accounting")
        gradient_accounting(run=run.root, epochs=[e for e in GRADS_EPOCHS if e <= config.epochs],
                            device=device, progress=progress)
        say(f"[demo] {name}: layer rewinding and retraining")
        rewind(run=run.root, device=device, progress=progress)
        retrain(run=run.root, device=device, progress=progress)
        say(f"[demo] {name}: localizing all noisy and {LOCALIZE_CLEAN} clean examples "
            f"(reference batch {LOCALIZE_REF_BATCH})")
        localize(ckpt=final, examples="noisy", ref_batch=LOCALIZE_REF_BATCH, device=device,
                 progress=progress)
        localize(ckpt=final, examples="clean", limit=LOCALIZE_CLEAN,
                 ref_batch=LOCALIZE_REF_BATCH, device=device, progress=progress)
        say(f"[demo] {name}: memorization scores, benchmarked on the flipped labels (without "
            f"cleanlab: `memkern scores --run {run.root} --benchmark` adds it)")
        # Localization is done above (with the demo's reference batch); cleanlab would need
        # five more trainings of each run.
        score_run(run=run.root, compute=True, localize_top=0, benchmark=True, folds=0,
                  device=device, progress=progress)
    say("[demo] report: plain and tied runs side by side")
    return write_report(run=Path(out) / "plain", compare=Path(out) / "tied",
                        out=Path(out) / "report")
