"""Weights trained outside memkern -> a run directory every analysis reads (``memkern import``).

The weights are a safetensors file or a torch ``state_dict`` file read with
``torch.load(weights_only=True)`` (tensors and plain containers only: no code is unpickled).
A ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and DataParallel's ``module.`` prefix
are taken off. The run holds one checkpoint (``checkpoints/epoch_001.safetensors``, memkern's
format) and a config with ``imported = True``; with ``train_labels`` (the labels the model was
trained with) the run's noisy set is the examples whose training label differs from the
dataset's, kept as ``train_labels.npy`` in the run.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memkern.rundir.atomic import json_text
from memkern.rundir.manifest import write_recorded
from memkern.rundir.staging import built_in_place
from memkern.training.checkpoints import save_checkpoint
from memkern.training.config import TrainConfig
from memkern.training.finite import first_nonfinite
from memkern.data.train_labels import read_train_labels
from memkern.errors import CheckpointError, RunDirError
from memkern.data import load_dataset, prepare
from memkern.rundir.context import model_for
from memkern.rundir.paths import RunDir, require_utf8_path
from memkern.training.train import noise_record

LABELS_FILE = "train_labels.npy"
IMPORTED_EPOCH = 1
WRAPPERS = ("state_dict", "model")  # keys under which training scripts often nest the weights
SHOWN = 3  # differences named per kind in a mismatch message


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch state_dict file, unwrapped (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file "
                                  f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "unsupported global" in str(e).lower():  # a class or function to import: refused
                raise CheckpointError(f"{path} holds objects other than tensors (a pickled "
                                      f"model or optimizer?), which memkern never unpickles: "
                                      f"save model.state_dict() with torch.save, or use "
                                      f"safetensors") from None
            raise CheckpointError(f"{path} is not a readable torch file; save "
                                  f"model.state_dict() with torch.save") from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable torch file "
                                  f"({(str(e).splitlines() or [type(e).__name__])[0]}); save "
                                  f"model.state_dict() with torch.save") from None
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        nested = next((state[k] for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if nested is not None:
            state = nested
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} holds no state_dict (found {type(state).__name__}); "
                              f"save model.state_dict()")
    not_tensor = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if not_tensor is not None:
        raise CheckpointError(f"{path}: entry {str(not_tensor)[:60]!r} is a "
                              f"{type(state[not_tensor]).__name__}, not a tensor; save "
                              f"model.state_dict() alone")
    if all(k.startswith("module.") for k in state):  # DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()  # a file object: np.save would append .npy to a path
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def check_weights_fit(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                      model_name: str) -> None:
    """CheckpointError naming the first few missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = [f"{what} {', '.join(keys[:SHOWN])}" + (f" (+{len(keys) - SHOWN} more)"
                                                       if len(keys) > SHOWN else "")
                for what, keys in (("missing", missing), ("unexpected", extra),
                                   ("shape (file vs model) of", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{source} does not fit the {model_name!r} model for this dataset: "
                              f"{'; '.join(problems)}; pass the --model (and --norm) the "
                              f"weights were trained as")
    bad = first_nonfinite(state.items())
    if bad is not None:
        raise CheckpointError(f"{source}: tensor {bad} holds NaN or inf; import finite weights")


def import_weights(*, weights: str | Path, model: str, dataset: str, out: str | Path,
                   train_labels: str | Path | None = None, norm: str = "batch",
                   data_dir: str | Path | None = None) -> RunDir:
    """Make run directory ``out`` from ``weights`` of ``model`` trained on ``dataset``
    elsewhere (module docstring). Everything is checked before anything is written, and the
    run appears complete or not at all (built beside ``out``, then renamed)."""
    require_utf8_path(out, option="--out")
    run = RunDir(out)
    if run.has_content():
        raise RunDirError(f"run directory {run.root} already exists; choose another --out")
    config = TrainConfig(dataset=dataset, model=model, norm=norm, noise=0.0,
                         epochs=IMPORTED_EPOCH, imported=True, data_dir=data_dir and str(data_dir),
                         train_labels=LABELS_FILE if train_labels is not None else None)
    raw = load_dataset(dataset, data_dir=data_dir)
    labels = None
    if train_labels is not None:
        labels = read_train_labels(train_labels, num_train=len(raw.train_labels),
                                   num_classes=raw.num_classes)
    data = prepare(raw, noise_rate=0.0, seed=config.seed, train_labels=labels)
    net = model_for(config, data)
    state = read_weights(weights)
    for key, value in net.state_dict().items():  # older torch saves BatchNorm without it
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value  # a step counter, unused in eval mode
    check_weights_fit(net, state, source=str(weights), model_name=model)
    net.load_state_dict(state)

    with built_in_place(run.root, doing="importing") as staging:
        built = RunDir(staging)
        if labels is not None:
            write_recorded(built.root, built.root / LABELS_FILE, _npy_bytes(labels.numpy()))
        record = noise_record(config, data)
        record["rate"] = len(data.noise.noisy_indices) / len(data.train_labels)
        write_recorded(built.root, built.noise_path, json_text(record, built.noise_path).encode())
        write_recorded(built.root, built.config_path, (config.to_json() + "\n").encode())
        built.checkpoints.mkdir()
        save_checkpoint(built.checkpoint_path(IMPORTED_EPOCH), net, config=config,
                        epoch=IMPORTED_EPOCH, run=built.root)
    return run
