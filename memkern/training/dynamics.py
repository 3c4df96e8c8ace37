"""Training dynamics: every training example's margin, loss and correctness after every epoch.

``memkern train`` records them from the evaluation pass it already makes over the training set
after each epoch (eval mode, tied dropout in mode "own", the label each example is trained
with), so they cost no extra forward. One file per run, ``<run>/dynamics.safetensors``:

- ``epochs``  int64 ``[E]``: the epochs recorded, ascending (1..E for a complete run);
- ``margin``  float16 ``[E, N]``: the trained label's logit minus the largest other logit;
- ``loss``    float16 ``[E, N]``: cross-entropy against the trained label;
- ``correct`` bool ``[E, N]``: argmax equals the trained label.

The file is rewritten atomically after each epoch, before that epoch's checkpoint, so it always
covers every checkpointed epoch; a resumed run first drops rows after its last checkpoint and
ends with the same file as an uninterrupted run. A run trained before dynamics were recorded
can rebuild them from its checkpoints (:func:`rebuild_dynamics`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from memkern.rundir.atomic import atomic_write
from memkern.errors import RunDirError
from memkern.rundir.progress import Progress
from memkern.rundir.paths import RunDir

FILE_NAME = "dynamics.safetensors"


def dynamics_path(run: RunDir) -> Path:
    return run.root / FILE_NAME


def example_stats(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row ``margin`` and ``loss`` (float32 ``[N]``) and ``correct`` (bool ``[N]``) of
    ``logits`` ``[N, C]`` against ``labels`` int64 ``[N]``."""
    logits = logits.float()
    labels = labels.to(logits.device)
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return {"margin": own - others,
            "loss": F.cross_entropy(logits, labels, reduction="none"),
            "correct": logits.argmax(1) == labels}


@dataclass
class Dynamics:
    """The arrays of a dynamics file (shapes in the module docstring), on the CPU."""

    epochs: torch.Tensor
    margin: torch.Tensor
    loss: torch.Tensor
    correct: torch.Tensor

    @classmethod
    def empty(cls, num_train: int) -> "Dynamics":
        return cls(epochs=torch.zeros(0, dtype=torch.long),
                   margin=torch.zeros(0, num_train, dtype=torch.float16),
                   loss=torch.zeros(0, num_train, dtype=torch.float16),
                   correct=torch.zeros(0, num_train, dtype=torch.bool))

    @classmethod
    def load(cls, path: str | Path) -> "Dynamics":
        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"{path} does not exist: the run was trained before memkern "
                              f"recorded training dynamics; `memkern scores --run "
                              f"{path.parent} --compute` rebuilds them from the checkpoints")
        try:
            tensors = load_file(path)
            return cls(**{k: tensors[k] for k in ("epochs", "margin", "loss", "correct")})
        except Exception as e:  # safetensors raises its own types for torn or foreign files
            raise RunDirError(f"{path} is not a memkern dynamics file ({e}); delete it and "
                              f"rebuild with `memkern scores --run {path.parent} --compute`")

    def save(self, path: str | Path) -> None:
        tensors = {"epochs": self.epochs, "margin": self.margin, "loss": self.loss,
                   "correct": self.correct}
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                                 tmp))

    def up_to(self, epoch: int) -> "Dynamics":
        """The rows of epochs ``<= epoch``."""
        keep = self.epochs <= epoch
        return Dynamics(self.epochs[keep], self.margin[keep], self.loss[keep], self.correct[keep])

    def with_epoch(self, epoch: int, stats: dict[str, torch.Tensor]) -> "Dynamics":
        """A copy with one more row (``stats`` as :func:`example_stats` returns, over all N)."""
        row = {k: v.detach().cpu()[None] for k, v in stats.items()}
        return Dynamics(torch.cat([self.epochs, torch.tensor([epoch])]),
                        torch.cat([self.margin, row["margin"].half()]),
                        torch.cat([self.loss, row["loss"].half()]),
                        torch.cat([self.correct, row["correct"]]))

    def missing_epochs(self, last_epoch: int) -> list[int]:
        """Epochs in 1..``last_epoch`` without a row."""
        have = set(self.epochs.tolist())
        return [e for e in range(1, last_epoch + 1) if e not in have]


class DynamicsRecorder:
    """Collects the training set's logits of one evaluation pass (chunks in index order, as
    :func:`memkern.training.evaluate.predictions` hands them over) and appends them as one epoch's row."""

    def __init__(self, path: Path, labels: torch.Tensor, *, after_epoch: int):
        """``after_epoch``: the last epoch already trained (rows after it are dropped: they were
        written by a run killed before that epoch's checkpoint)."""
        self.path = path
        self.labels = labels
        existing = (Dynamics.load(path) if after_epoch > 0 and path.is_file()
                    else Dynamics.empty(len(labels)))
        self.dynamics = existing.up_to(after_epoch)
        self._chunks: list[dict[str, torch.Tensor]] = []
        self._seen = 0

    def collect(self, logits: torch.Tensor) -> None:
        labels = self.labels[self._seen:self._seen + len(logits)]
        self._chunks.append({k: v.cpu() for k, v in example_stats(logits, labels).items()})
        self._seen += len(logits)

    def finish_epoch(self, epoch: int) -> None:
        if self._seen != len(self.labels):
            raise RuntimeError(f"dynamics of epoch {epoch} saw {self._seen} training examples "
                               f"of {len(self.labels)}")
        stats = {k: torch.cat([c[k] for c in self._chunks]) for k in self._chunks[0]}
        self.dynamics = self.dynamics.with_epoch(epoch, stats)
        self.dynamics.save(self.path)
        self._chunks, self._seen = [], 0


def rebuild_dynamics(run: RunDir, *, device: str = "auto", data_dir: str | Path | None = None,
                     progress: bool = True) -> Dynamics:
    """Evaluate every checkpoint after the initialization exactly as training does after each
    epoch, and write the run's dynamics file from scratch."""
    from memkern.training.evaluate import mode_accuracies
    from memkern.rundir.context import open_run

    epochs = [e for e in run.epochs() if e > 0]
    if not epochs:
        raise RunDirError(f"{run.root} has no trained checkpoints: train it first (memkern train)")
    context = open_run(run.root, device=device, data_dir=data_dir)
    recorder = DynamicsRecorder(dynamics_path(run), context.data.train_labels, after_epoch=0)
    with Progress(total=len(epochs), desc=f"dynamics {run.root.name}", unit="epoch",
                  bar=progress) as bar:
        for epoch in epochs:
            context.load(epoch)
            mode_accuracies(context.model, context.data, mode="own",
                            on_train_logits=recorder.collect)
            recorder.finish_epoch(epoch)
            bar.advance()
            bar.step(f"epoch {epoch}/{epochs[-1]}")
    return recorder.dynamics
