"""Checkpoints: safetensors files (no code runs on load) with the run's config in the metadata.

Tensor keys: ``model.<state_dict key>`` for weights and buffers, ``optim.<state>.<param>`` for
the optimizer's state (``momentum`` for SGD; ``exp_avg``, ``exp_avg_sq``, ``step`` for AdamW), so
a resumed run is bit-identical to an uninterrupted one. Metadata:
``format = memkern-checkpoint``, ``version``, ``epoch``, ``config`` (TrainConfig JSON).
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from memkern.rundir import json_files
from memkern.rundir.atomic import atomic_write
from memkern.rundir.manifest import verify, write_recorded
from memkern.training.config import TrainConfig
from memkern.training.finite import first_nonfinite
from memkern.errors import CheckpointError, ConfigError

FORMAT = "memkern-checkpoint"
VERSION = "1"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
# torch's per-parameter optimizer state name -> its name in a checkpoint (a fixed table: the
# names read from a file only select among these)
OPTIM_STATES = {"momentum_buffer": "momentum", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq",
                "step": "step"}
CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{3,})\.safetensors$")


@dataclass
class Checkpoint:
    path: Path
    config: TrainConfig
    epoch: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]  # checkpoint state name -> param -> value

    @property
    def momentum(self) -> dict[str, torch.Tensor]:
        return self.optimizer_state.get("momentum", {})


def save_checkpoint(path: str | Path, model: nn.Module, *, config: TrainConfig, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None,
                    run: str | Path | None = None) -> None:
    """Write atomically: a kill mid-save leaves no partial checkpoint behind. The bytes are
    written by us (safetensors' own file writer renames a temporary of its own, mode 0600).
    ``run``: the run directory whose manifest records the file (memkern.rundir.manifest)."""
    tensors = {MODEL_PREFIX + k: v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if key in OPTIM_STATES and isinstance(value, torch.Tensor):
                        tensors[f"{OPTIM_PREFIX}{OPTIM_STATES[key]}.{names[id(p)]}"] = (
                            value.detach().cpu().contiguous())
    metadata = {"format": FORMAT, "version": VERSION, "epoch": str(epoch),
                "config": config.to_json()}
    data = save(tensors, metadata=metadata)
    if run is not None:
        write_recorded(run, path, data)
    else:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _read_metadata(path: Path) -> dict[str, str]:
    """Parse the safetensors header by hand: 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a checkpoint (file is {len(head)} bytes)")
        size = int.from_bytes(head, "little")
        if size > min(100_000_000, os.fstat(f.fileno()).st_size - 8):
            raise CheckpointError(f"{path}: not a safetensors checkpoint (its header claims "
                                  f"{size:,} bytes, more than the file holds)")
        try:
            header = json_files.loads(f.read(size), source=f"{path}: the header",
                                      error=CheckpointError)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: not a safetensors checkpoint (unreadable header)")
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return meta if isinstance(meta, dict) else {}


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate; corrupt, foreign or newer-format files raise CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} exists but is not a regular file (a "
                              f"{file_kind(path)}); pass a checkpoint file")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # safetensors takes UTF-8 paths only
        raise CheckpointError(f"the path {path} is not valid UTF-8; rename the file (or its "
                              f"folder) to a UTF-8 name") from None
    meta = _read_metadata(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a memkern checkpoint (no memkern metadata); "
                              f"pass a file written by `memkern train`")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('version')}, "
                              f"this memkern reads version {VERSION}")
    config_text, epoch = meta.get("config"), meta.get("epoch")
    if not (isinstance(config_text, str) and isinstance(epoch, str) and epoch.isascii()
            and epoch.isdigit() and len(epoch) <= 9):
        raise CheckpointError(f"{path} is corrupt: its metadata lacks the config or the epoch; "
                              f"use another checkpoint of the run")
    try:
        config = TrainConfig.from_json(config_text, source=f"{path}: the config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is corrupt or truncated ({reason}); use another "
                              f"checkpoint of the run") from None
    epoch = int(epoch)
    named = CHECKPOINT_PATTERN.match(path.name)
    if named and int(named.group(1)) != epoch:
        raise CheckpointError(f"{path} holds epoch {epoch} by its metadata, not epoch "
                              f"{int(named.group(1))} as its name says: a renamed or edited "
                              f"checkpoint; restore the run's own file")
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise CheckpointError(f"{path}: tensor {bad} holds NaN or inf (a diverged run); use an "
                              f"earlier checkpoint, or retrain with a smaller --lr")
    verify(path)  # last: a damaged header or tensor is named as such first
    return Checkpoint(
        path=path, config=config, epoch=epoch,
        model_state={k[len(MODEL_PREFIX):]: v for k, v in tensors.items()
                     if k.startswith(MODEL_PREFIX)},
        optimizer_state=_optimizer_state(path, tensors),
    )


def _optimizer_state(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM_PREFIX):
            state, _, param = key[len(OPTIM_PREFIX):].partition(".")
            if state not in OPTIM_STATES.values() or not param:
                raise CheckpointError(f"{path} holds an unknown optimizer tensor {key[:60]!r}: "
                                      f"not a checkpoint memkern wrote; use the run's own file")
            out.setdefault(state, {})[param] = value
    return out


def file_kind(path: Path) -> str:
    """What a path that is not a regular file is, for messages."""
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def load_model_state(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load weights and buffers strictly; a checkpoint of another architecture is a clear error."""
    check_fits(model, ckpt)
    model.load_state_dict(ckpt.model_state)


def check_fits(model: nn.Module, ckpt: Checkpoint) -> None:
    """CheckpointError naming both models unless ``ckpt`` holds exactly ``model``'s tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(ckpt.model_state))
    extra = sorted(set(ckpt.model_state) - set(own))
    bad_shapes = [k for k in own if k in ckpt.model_state and own[k].shape != ckpt.model_state[k].shape]
    if missing or extra or bad_shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape mismatch at {bad_shapes[:3]}")
        raise CheckpointError(f"{ckpt.path} holds a {ckpt.config.model!r} model that does not fit "
                              f"the {type(model).__name__} model it is loaded into ({detail}): "
                              f"a checkpoint of another architecture, or of another run?")


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                      ckpt: Checkpoint) -> None:
    """Put ``ckpt``'s optimizer state back into ``optimizer`` (of ``model``'s parameters)."""
    params = dict(model.named_parameters())
    torch_name = {saved: own for own, saved in OPTIM_STATES.items()}
    own = {"momentum"} if isinstance(optimizer, torch.optim.SGD) else {"exp_avg", "exp_avg_sq",
                                                                      "step"}
    foreign = sorted(set(ckpt.optimizer_state) - own)
    if foreign:
        raise CheckpointError(f"{ckpt.path} holds {foreign[0]} state, which its run's "
                              f"{ckpt.config.optimizer} optimizer does not keep: an edited "
                              f"checkpoint; use the run's own file")
    for state, values in ckpt.optimizer_state.items():
        for name, value in values.items():
            if name not in params:
                raise CheckpointError(f"{ckpt.path} holds optimizer state for {name[:60]!r}, "
                                      f"which the {ckpt.config.model!r} model does not have")
            p = params[name]
            # AdamW keeps its step count on the CPU unless it runs fused or captured
            device = value.device if state == "step" else p.device
            optimizer.state[p][torch_name[state]] = value.to(device).clone()
