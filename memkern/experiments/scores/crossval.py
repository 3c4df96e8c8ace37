"""Out-of-sample predicted probabilities by K-fold cross-validation: the input cleanlab needs.

Every fold trains the run's own model with the run's own config (optimizer, schedule, epochs,
batch size, tied dropout) on the other K-1 folds, through :func:`memkern.training.train.train`, then
predicts the held-out fold. Folds are stratified by the trained label and shuffled with the
run's seed (cleanlab's own protocol). Each fold trains in
``<run>/scores/crossval/<K>-fold_<epochs>-epochs/fold_k`` and resumes there after a kill; once
its held-out probabilities are saved (``fold_k.safetensors`` beside it) the fold's run
directory is removed.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memkern.rundir.atomic import atomic_write, read_jsonl
from memkern.rundir.safe_files import refuse_links
from memkern.training.config import TrainConfig
from memkern.data import PreparedData
from memkern.data.noise import LabelNoise
from memkern.errors import ConfigError
from memkern.training.evaluate import predictions
from memkern.rundir.context import load_trained
from memkern.rundir.paths import RunDir
from memkern.network.tied_dropout import unindexed_rows


@dataclass
class CrossValidation:
    """``probabilities`` float64 ``[N, C]``: each row from the fold model that did not see the
    example; ``seconds``: training + prediction wall time summed over folds (a resumed fold
    counts only the epochs it trained); ``trainings``: K."""

    probabilities: np.ndarray
    seconds: float
    trainings: int


def check_folds(folds: int) -> None:
    """0 leaves cross-validation out; one fold would hold out everything."""
    if folds < 0 or folds == 1:
        raise ConfigError(f"--folds must be 0 (no cleanlab) or at least 2, got {folds}")


def fold_assignment(labels: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """int64 ``[N]``: the held-out fold of each example (stratified by label, shuffled)."""
    from sklearn.model_selection import StratifiedKFold

    smallest = np.bincount(labels).min(initial=len(labels))
    if folds < 2 or folds > smallest:
        raise ConfigError(f"--folds must be in 2..{smallest} (the rarest trained label has "
                          f"{smallest} examples), got {folds}")
    out = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        out[held_out] = k
    return out


def fold_data(data: PreparedData, keep: torch.Tensor) -> PreparedData:
    """``data`` with its training set cut to rows ``keep`` (int64, ascending); the test set and
    normalization stay; the noise record follows the kept rows."""
    noisy = data.noisy_mask[keep]
    original = data.train_labels.clone()
    original[data.noise.noisy_indices] = data.noise.original_labels
    noise = LabelNoise(labels=data.train_labels[keep],
                       noisy_indices=torch.nonzero(noisy).flatten(),
                       original_labels=original[keep][noisy])
    return PreparedData(name=data.name, num_classes=data.num_classes,
                        train_images=data.train_images[keep],
                        train_labels=data.train_labels[keep], test_images=data.test_images,
                        test_labels=data.test_labels, noise=noise)


def held_out_probabilities(ckpt: Path, images: torch.Tensor, *, device: str) -> torch.Tensor:
    """Softmax of a fold model on rows it never trained on (tied dropout: mode "keep", as test
    examples are evaluated: they have no mask of their own)."""
    trained = load_trained(ckpt, device=device, cross_check=False)  # trained on a fold
    chunks = []
    with unindexed_rows(trained.model):
        predictions(trained.model, images, on_logits=lambda z: chunks.append(z.double().cpu()))
    return torch.softmax(torch.cat(chunks), 1)


def cross_validate(*, run: str | Path, folds: int = 5, epochs: int | None = None,
                   device: str = "auto", data: PreparedData,
                   progress: bool = True) -> CrossValidation:
    """Out-of-sample probabilities for every training example of ``run`` (``data``: the run's
    prepared data). ``epochs`` overrides the config's epochs (quick checks only: the protocol
    trains exactly as the run did)."""
    from memkern.training.train import train

    run = RunDir(run)
    config: TrainConfig = run.load_config()
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    labels = data.train_labels.numpy()
    held = fold_assignment(labels, folds=folds, seed=config.seed)
    # Folds of other settings (a quick check's) live apart, never mixed into these.
    root = run.root / "scores" / "crossval" / f"{folds}-fold_{config.epochs}-epochs"
    probabilities = np.zeros((len(labels), data.num_classes))
    seconds = 0.0
    for k in range(folds):
        done = root / f"fold_{k}.safetensors"
        fold_run = RunDir(root / f"fold_{k}")
        refuse_links((root, fold_run.root))  # trained into: must be the run's own folders
        if not done.is_file():
            keep = torch.from_numpy(np.nonzero(held != k)[0])
            out_rows = torch.from_numpy(np.nonzero(held == k)[0])
            resume = fold_run.config_path.is_file()
            train(None if resume else config, out=fold_run.root, resume=resume, device=device,
                  progress=progress, data=fold_data(data, keep))
            started = time.perf_counter()
            probs = held_out_probabilities(fold_run.final_checkpoint(),
                                           data.train_images[out_rows], device=device)
            train_seconds = sum(r["seconds"] for r in read_jsonl(fold_run.metrics_path))
            record = {"rows": out_rows, "probabilities": probs,
                      "seconds": torch.tensor([train_seconds + time.perf_counter() - started],
                                              dtype=torch.float64)}
            atomic_write(done, lambda tmp: save_file(record, tmp))
            shutil.rmtree(fold_run.root)
        saved = load_file(done)
        probabilities[saved["rows"].numpy()] = saved["probabilities"].numpy()
        seconds += float(saved["seconds"])
    return CrossValidation(probabilities=probabilities, seconds=seconds, trainings=folds)
