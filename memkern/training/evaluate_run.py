"""``memkern evaluate``: one checkpoint's accuracies in one tied-dropout mode, written into its
run as ``evaluate_<epoch>_<mode>.json`` (the algorithm: :mod:`memkern.training.evaluate`)."""
from __future__ import annotations

from pathlib import Path

from memkern.data.text import TextData
from memkern.errors import ConfigError
from memkern.rundir.atomic import atomic_write_json
from memkern.rundir.context import load_trained
from memkern.rundir.locks import for_checkpoint, hold_run, locked
from memkern.rundir.ownership import require_json_output
from memkern.rundir.paths import RunDir
from memkern.rundir.progress import Progress
from memkern.training.evaluate import EVAL_MODES, evaluation_mode, mode_accuracies
from memkern.training.text_evaluate import EVALUATE_CANDIDATES, text_measures


@locked(lambda a: for_checkpoint(
    a["ckpt"], lambda: hold_run(RunDir.of_checkpoint(a["ckpt"]).root)))
def evaluate_checkpoint(*, ckpt: str | Path, mode: str, device: str = "auto",
                        data_dir: str | Path | None = None,
                        max_candidates: int = EVALUATE_CANDIDATES,
                        progress: bool = True, silent: bool = False) -> tuple[dict, Path]:
    """Accuracies of checkpoint ``ckpt`` in ``mode``, written atomically to
    ``<run>/evaluate_<epoch>_<mode>.json``; returns (the record, its path).

    The record: ``checkpoint``, ``epoch``, ``mode``, ``tied_dropout`` and the three accuracies of
    :func:`mode_accuracies`. The masks come from the checkpoint's config alone. A text run's
    record holds :func:`memkern.training.text_evaluate.text_measures` instead (exposure ranks
    exact up to ``max_candidates`` strings scored; ``progress``: a bar over the canaries, whose
    exposure searches are the long part, else plain lines; ``silent``: neither).
    """
    if mode not in EVAL_MODES:
        raise ConfigError(f"evaluation mode {mode!r} is unknown: use one of {EVAL_MODES}")
    if max_candidates < 1:
        raise ConfigError(f"max_candidates must be at least 1, got {max_candidates}")
    trained = load_trained(ckpt, device=device, data_dir=data_dir, text_ok=True)
    path = RunDir.of_checkpoint(trained.checkpoint.path).evaluation_path(
        trained.checkpoint.epoch, mode)
    require_json_output(path, keys=("checkpoint", "epoch", "mode"),
                        what="a memkern evaluation record")
    if isinstance(trained.data, TextData):
        canaries = len(trained.data.canaries())
        with evaluation_mode(trained.model, mode), Progress(
                total=canaries, desc=f"evaluate {path.parent.name} ({mode})", unit="secret",
                bar=progress, silent=silent or not canaries) as bar:
            measures = text_measures(trained.model, trained.data, max_candidates=max_candidates,
                                     on_canary=bar.advance)
    else:
        measures = mode_accuracies(trained.model, trained.data, mode=mode)
    record = {"checkpoint": str(trained.checkpoint.path), "epoch": trained.checkpoint.epoch,
              "mode": mode, "tied_dropout": trained.checkpoint.config.tied_dropout, **measures}
    atomic_write_json(path, record)
    return record, path
