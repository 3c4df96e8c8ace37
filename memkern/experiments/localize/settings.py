"""What a localize output's lines were computed with, so a resumed run never mixes settings.

Every line carries the settings of the run that wrote it; a run appending to an output whose
lines were computed otherwise (another checkpoint, reference batch, method, ...) refuses with
the keys that differ, instead of silently mixing incomparable results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from memkern.errors import ConfigError
from memkern.rundir.manifest import file_digest


def checkpoint_digest(path: str | Path) -> str:
    """First 16 hex digits of the checkpoint file's SHA-256: same weights under any path."""
    return file_digest(Path(path))[:16]


def localize_settings(*, ckpt: str | Path, method: str, max_channels: int, eot: int,
                      ref_batch: int, candidates: int | None, sites: Sequence[str],
                      seed: int) -> dict:
    """The settings a line's result depends on (JSON-ready)."""
    return {"checkpoint": Path(ckpt).name, "checkpoint_sha256": checkpoint_digest(ckpt),
            "method": method, "max_channels": max_channels, "eot": eot, "ref_batch": ref_batch,
            "candidates": candidates, "sites": list(sites), "seed": seed}


def check_resumable(rows: list[dict], settings: dict, out: Path) -> None:
    """ConfigError when a line of ``out`` was computed with other settings."""
    for row in rows:
        theirs = row.get("settings")
        if theirs == settings:
            continue
        if theirs is None:
            raise ConfigError(f"{out} holds lines without recorded settings (written by an older "
                              "memkern); pass --out to start a new file")
        diff = ", ".join(f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in settings.items()
                         if theirs.get(k) != v)
        raise ConfigError(f"{out} holds results of other settings ({diff}); rerun with the same "
                          "options to resume, or pass --out to start a new file")
