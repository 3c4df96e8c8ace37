"""The run directory: the contract between memkern's commands (README.md, "The CLI at a glance")."""
from __future__ import annotations

import json
from pathlib import Path

from memkern.rundir import json_files
from memkern.rundir.atomic import read_jsonl
from memkern.rundir.manifest import run_root_of, verify
from memkern.training.checkpoints import CHECKPOINT_PATTERN
from memkern.training.config import TrainConfig
from memkern.errors import ConfigError, RunDirError, printable

RUN_LOCK = ".memkern.lock"  # held by the command writing the run (memkern.rundir.locks)



class RunDir:
    """Paths and readers for ``runs/NAME``: config.json, noise.json, metrics.jsonl, checkpoints/."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "RunDir":
        """The run holding ``path`` (``<run>/checkpoints/epoch_NNN.safetensors``); a checkpoint
        kept elsewhere counts its own folder as the run."""
        return cls(run_root_of(path))

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def noise_path(self) -> Path:
        return self.root / "noise.json"

    @property
    def canaries_path(self) -> Path:
        """A text run's planted canaries and paragraphs (its noise.json)."""
        return self.root / "canaries.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def grads(self) -> Path:
        """Gradient accounting outputs (``memkern grads``, ``memkern train --track-grads``)."""
        return self.root / "grads"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.safetensors"

    def evaluation_path(self, epoch: int, mode: str) -> Path:
        return self.root / f"evaluate_{epoch:03d}_{mode}.json"

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, ascending (0 is the initialization)."""
        if not self.checkpoints.is_dir():
            return []
        found = (CHECKPOINT_PATTERN.match(p.name) for p in self.checkpoints.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def require_checkpoint(self, epoch: int) -> Path:
        """The checkpoint of ``epoch``, or an error naming the epochs that exist."""
        path = self.checkpoint_path(epoch)
        if not path.is_file():
            have = self.epochs()
            listing = ", ".join(map(str, have)) if have else "none"
            raise RunDirError(f"run {self.root} has no checkpoint for epoch {epoch} "
                              f"(epochs with checkpoints: {listing})")
        return path

    def final_checkpoint(self) -> Path:
        have = self.epochs()
        if not have:
            raise RunDirError(f"{self.root} is not a memkern run with checkpoints "
                              f"(expected {self.checkpoints}/epoch_NNN.safetensors)")
        return self.checkpoint_path(have[-1])

    def load_config(self, *, check_model: bool = True) -> TrainConfig:
        """The run's config, checked field by field; a damaged file names the field. Without
        ``check_model`` (to show the config, not to build its model) the model spec it names is
        not checked against the user's trust (:mod:`memkern.network.models.trust`)."""
        if not self.config_path.is_file():
            raise RunDirError(f"{self.root} is not a memkern run directory (no config.json)")
        config = TrainConfig.from_json(_read_text(self.config_path), source=str(self.config_path),
                                       check_model=check_model)
        verify(self.config_path, root=self.root)  # after parsing: a damaged field is named
        return config

    def load_noise(self) -> dict:
        """noise.json: the rate, seed, training-set size and the flipped indices and labels,
        checked: indices ascending, unique and within the training set, one label each."""
        try:
            noise = json_files.loads(_read_text(self.noise_path), source=str(self.noise_path))
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.noise_path} is not JSON ({e}); only `memkern train` writes "
                              f"it: restore the file") from None
        fields = {"num_train": int, "noisy_indices": list, "original_labels": list,
                  "noisy_labels": list}
        bad = [k for k, kind in fields.items() if not isinstance(noise, dict)
               or not isinstance(noise.get(k), kind) or isinstance(noise.get(k), bool)]
        if bad:
            raise RunDirError(f"{self.noise_path} is not memkern's noise record (field {bad[0]} "
                              f"missing or of the wrong type); restore it")
        _check_noise_record(noise, self.noise_path)
        verify(self.noise_path, root=self.root)
        return noise

    def load_metrics(self, *, until: int | None = None) -> list[dict]:
        """metrics.jsonl's lines (those of epochs up to ``until``), each checked to be an epoch's
        record: an integer ``epoch`` and numbers for the rest (null for an accuracy that is
        undefined, as of an empty subset)."""
        rows = read_jsonl(self.metrics_path)
        for n, row in enumerate(rows, 1):
            if row.get("epoch") != n:
                raise RunDirError(f"{self.metrics_path}, record {n}: epoch {row.get('epoch')!r} "
                                  f"where epoch {n} belongs (lines deleted, repeated or "
                                  f"reordered); restore the file, or train a new run")
            epoch = row.get("epoch")
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
                raise RunDirError(f"{self.metrics_path}, record {n}: no positive integer "
                                  f"'epoch'; was the file edited? restore it or remove the line")
            wrong = [k for k, v in row.items()
                     if isinstance(v, bool) or not isinstance(v, (int, float, type(None)))]
            if wrong:
                raise RunDirError(f"{self.metrics_path}, record {n}: field {wrong[0]!r} is not "
                                  f"a number; restore the file or remove the line")
            off = [k for k, v in row.items() if "_acc" in k and v is not None
                   and not 0.0 <= v <= 1.0]
            if off:
                raise RunDirError(f"{self.metrics_path}, record {n}: accuracy {off[0]!r} is "
                                  f"{row[off[0]]}, outside [0, 1]; restore the file")
        return [r for r in rows if until is None or r["epoch"] <= until]

    def load_history(self) -> list[dict]:
        """metrics.jsonl's records up to the last checkpoint, which must all be there (a line
        is appended before its epoch's checkpoint is saved): fewer lines mean an edited file."""
        last = self.epochs()[-1] if self.epochs() else 0
        rows = self.load_metrics(until=last)
        if len(rows) != last:
            raise RunDirError(f"{self.metrics_path} records epochs 1..{len(rows)}, but the "
                              f"checkpoints reach epoch {last}: lines were deleted; restore the "
                              f"file from a copy of the run, or train a new run")
        return rows

    def has_content(self) -> bool:
        """Anything in the run directory besides a lock."""
        return self.root.exists() and any(p.name != RUN_LOCK for p in self.root.iterdir())


def require_utf8_path(path: str | Path, *, option: str) -> None:
    """ConfigError for a path that is not valid UTF-8: every later command reads a run's files
    through safetensors and JSON, which take UTF-8 paths only."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{option} {printable(str(path))} is not a valid UTF-8 path; choose a "
                          f"UTF-8 name") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_noise_record(noise: dict, path: Path) -> None:
    n, indices = noise["num_train"], noise["noisy_indices"]
    problem = None
    if n < 1:
        problem = f"num_train is {n}"
    elif not all(_is_int(i) and 0 <= i < n for i in indices):
        problem = f"a noisy index is not an integer in 0..{n - 1}"
    elif any(a >= b for a, b in zip(indices, indices[1:])):
        problem = "the noisy indices are not ascending and unique"
    elif not (len(noise["original_labels"]) == len(noise["noisy_labels"]) == len(indices)
              and all(_is_int(v) for v in noise["original_labels"] + noise["noisy_labels"])):
        problem = "the labels do not match the noisy indices one to one"
    if problem:
        raise RunDirError(f"{path}: {problem}; only `memkern train` writes it: restore it")


def _read_text(path: Path) -> str:
    return json_files.read_text(path)
