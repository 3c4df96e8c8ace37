"""The run directory: the contract between memkern's commands (DESIGN.md "Data flow")."""
from __future__ import annotations

import json
import re
from pathlib import Path

from memkern.config import TrainConfig
from memkern.errors import RunDirError

CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{3,})\.safetensors$")


class RunDir:
    """Paths and readers for ``runs/NAME``: config.json, noise.json, metrics.jsonl, checkpoints/."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> "RunDir":
        """The run holding ``path`` (``<run>/checkpoints/epoch_NNN.safetensors``); a checkpoint
        kept elsewhere counts its own folder as the run."""
        parent = Path(path).parent
        return cls(parent.parent if parent.name == "checkpoints" else parent)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def noise_path(self) -> Path:
        return self.root / "noise.json"

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

    def load_config(self) -> TrainConfig:
        if not self.config_path.is_file():
            raise RunDirError(f"{self.root} is not a memkern run directory (no config.json)")
        return TrainConfig.from_json(self.config_path.read_text())

    def load_noise(self) -> dict:
        return json.loads(self.noise_path.read_text())

    def has_content(self) -> bool:
        return self.root.exists() and any(self.root.iterdir())
