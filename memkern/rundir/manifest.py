"""The run manifest: ``<run>/manifest.json`` records the sha256 of every file a run's later
commands rebuild it from (config.json, noise.json, the imported training labels, each
checkpoint) when memkern writes it, and every command verifies a file against it before using
it. An edited, swapped or damaged file is then one line naming it, instead of a result of
another run.

A file is recorded before it is renamed into place, with its old digest kept until the rename
is done: a kill in between leaves a manifest that accepts either the old or the new file.

Runs written before the manifest existed have none: their files are used after the checks that
need no record (the checkpoint's name, its metadata epoch and config against config.json, the
noisy indices of noise.json against the data the config rebuilds; see
:mod:`memkern.rundir.consistency`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from memkern.errors import RunDirError
from memkern.rundir import json_files
from memkern.rundir.atomic import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "memkern-manifest"
VERSION = 1
_CHUNK = 1 << 20


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def run_root_of(path: str | Path) -> Path:
    """The run a file belongs to: the folder above ``checkpoints/`` for a checkpoint, else the
    file's own folder."""
    parent = Path(path).parent
    return parent.parent if parent.name == "checkpoints" else parent


def _read(root: Path) -> dict[str, list[str]] | None:
    """The manifest's ``{relative path: accepted digests}``; None for a run without one."""
    path = root / MANIFEST
    if not path.exists():
        return None
    try:
        record = json_files.loads(json_files.read_text(path), source=str(path))
    except (OSError, json.JSONDecodeError, RunDirError):
        record = None
    files = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(record, dict) or record.get("format") != FORMAT
            or not isinstance(files, dict)
            or not all(isinstance(v, list) and all(isinstance(d, str) for d in v)
                       for v in files.values())):
        raise RunDirError(f"{path} is not memkern's run manifest (was it edited?); restore it "
                          f"from a copy of the run")
    return files


def _write(root: Path, files: dict[str, list[str]]) -> None:
    atomic_write_json(root / MANIFEST, {"format": FORMAT, "version": VERSION,
                                        "files": dict(sorted(files.items()))})


def write_recorded(root: str | Path, path: str | Path, data: bytes) -> None:
    """Write ``data`` atomically to ``path`` inside run ``root`` and record its digest."""
    root, path = Path(root), Path(path)
    rel = path.relative_to(root).as_posix()
    files = _read(root) or {}
    new = digest(data)
    files[rel] = list(dict.fromkeys([*files.get(rel, []), new]))  # old or new, during the rename
    root.mkdir(parents=True, exist_ok=True)
    _write(root, files)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    files[rel] = [new]
    _write(root, files)


def verify(path: str | Path, *, root: str | Path | None = None) -> None:
    """RunDirError naming ``path`` when the manifest of its run (``root``, default
    :func:`run_root_of`) has another digest for it, or has none while recording others. A run
    without a manifest is not verified here."""
    path = Path(path)
    root = Path(root) if root is not None else run_root_of(path)
    files = _read(root)
    if files is None:
        return
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    accepted = files.get(rel)
    if accepted is None:
        raise RunDirError(f"{path} is not in {root / MANIFEST}: memkern did not write it into "
                          f"this run; remove it, or restore the run's own file")
    found = file_digest(path)
    if found not in accepted:
        raise RunDirError(f"{path} is not the file memkern wrote (sha256 {found[:12]}..., "
                          f"{root / MANIFEST} records {accepted[-1][:12]}...): it was edited or "
                          f"damaged; restore it from a copy of the run")
