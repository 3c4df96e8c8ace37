"""``memkern localize --save-edited``: each localized target's edited model kept as a run.

Beside the localize output ``X.jsonl`` the folder ``X.edited/`` holds one run directory per
target, ``canary_007/``, ``paragraph_012/`` (text runs) or ``example_042/`` (image runs):

    config.json, manifest.json         the source checkpoint's config; every file's sha256
    noise.json | canaries.json         copies of the source run's (as its commands check them)
    edit.json                          what was removed: the target's line, the source checkpoint
    checkpoints/epoch_NNN.safetensors  the source epoch's weights with the target's channels
                                       removed (memkern.experiments.localize.weight_edit)

so ``memkern evaluate --run X.edited/canary_007`` (and ``localize``, ``scores`` ...) open it
as any run. A folder appears complete or not at all (built under a staging name, then renamed),
and the edits are made from the output's lines after they are all written, so a killed run's
rerun writes exactly the folders still missing and leaves the others as they are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from memkern.errors import RunDirError
from memkern.experiments.localize.channels import ChannelSpace
from memkern.experiments.localize.summary import output_stem
from memkern.experiments.localize.weight_edit import without_channels
from memkern.rundir import json_files
from memkern.rundir.atomic import json_text
from memkern.rundir.manifest import verify, write_recorded
from memkern.rundir.ownership import require_writable
from memkern.rundir.paths import RunDir
from memkern.rundir.safe_files import refuse_link
from memkern.rundir.staging import built_in_place
from memkern.training.checkpoints import Checkpoint, save_checkpoint

EDIT_FILE = "edit.json"
FORMAT = "memkern-edit"
STAGING = "editing"  # staging folders: .<target>.editing-<pid>-<hex>


def edited_folder(out: str | Path) -> Path:
    """Where the edited models of localize output ``X.jsonl`` go: ``X.edited``."""
    out = Path(out)
    return out.with_name(f"{output_stem(out)}.edited")


def target_name(row: dict) -> str:
    """A line's target as a folder name: ``canary_007``, ``paragraph_012``, ``example_042``."""
    return f"{row.get('kind', 'example')}_{row['index']:03d}"


def require_edited_output(out: str | Path) -> None:
    """Before any work: ``X.edited`` is absent or a real folder, and can be written."""
    folder = edited_folder(out)
    refuse_link(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder} exists and is not a folder; --save-edited writes the "
                          f"edited models there: move it away, or pass another --out")
    require_writable(folder)


def _record(row: dict, source: Path) -> dict:
    return {"format": FORMAT, "source_checkpoint": str(source.resolve()), "index": row["index"],
            "kind": row.get("kind", "example"), "flipped": row["flipped"],
            "channels": row["channels"], "settings": row["settings"]}


def _check_existing(folder: Path, expected: dict) -> None:
    """An existing target folder holds the edit of this very line, else RunDirError."""
    path = folder / EDIT_FILE
    if not path.is_file():
        raise RunDirError(f"{folder} exists but holds no {EDIT_FILE}: not an edited model "
                          f"memkern wrote; move it away and rerun")
    try:
        held = json_files.loads(json_files.read_text(path), source=str(path))
    except json.JSONDecodeError:
        held = None
    verify(path, root=folder)
    keys = ("index", "channels", "settings")
    if not isinstance(held, dict) or any(held.get(k) != expected[k] for k in keys):
        raise RunDirError(f"{folder} holds the edit of other localization results than the "
                          f"line of target {expected['index']} in the output; move it away "
                          f"and rerun")


def _zeroed(row: dict, space: ChannelSpace) -> torch.Tensor:
    """bool ``[space.total]``: the channels a line names."""
    zeroed = torch.zeros(space.total, dtype=torch.bool)
    for site, channel in row["channels"]:
        zeroed[space.flat(site, channel)] = True
    return zeroed


def _copy_recorded(source: RunDir, target: Path, names: Sequence[str]) -> None:
    """The source run's files ``names`` (where present), verified, recorded in ``target``."""
    for name in names:
        path = source.root / name
        if path.is_file():
            verify(path, root=source.root)
            write_recorded(target, target / name, path.read_bytes())


def save_edited(rows: list[dict], out: str | Path, *, model: nn.Module, ckpt: Checkpoint,
                space: ChannelSpace) -> list[Path]:
    """Write the edited model of every line of ``rows`` that has none yet under
    :func:`edited_folder` (module docstring); returns the folders of all ``rows``."""
    root = edited_folder(out)
    source = RunDir.of_checkpoint(ckpt.path)
    copied = [source.noise_path.name, source.canaries_path.name]
    if ckpt.config.train_labels is not None:  # an imported run's labels, read from its folder
        copied.append(ckpt.config.train_labels)
    folders = []
    for row in rows:
        folder = root / target_name(row)
        folders.append(folder)
        record = _record(row, ckpt.path)
        refuse_link(folder)
        if folder.exists():
            _check_existing(folder, record)
            continue
        edited = without_channels(model, space, _zeroed(row, space))
        with built_in_place(folder, doing=STAGING) as staging:
            run = RunDir(staging)
            write_recorded(staging, run.config_path, (ckpt.config.to_json() + "\n").encode())
            _copy_recorded(source, staging, copied)
            write_recorded(staging, staging / EDIT_FILE,
                           json_text(record, staging / EDIT_FILE).encode())
            run.checkpoints.mkdir()
            save_checkpoint(run.checkpoint_path(ckpt.epoch), edited, config=ckpt.config,
                            epoch=ckpt.epoch, run=staging)
    return folders
