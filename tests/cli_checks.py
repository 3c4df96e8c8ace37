"""What every bad-input test checks: one `memkern: error:` line, exit 2, no traceback, and no
file that existed before changed."""
from __future__ import annotations

import hashlib
from pathlib import Path

from click.testing import CliRunner

from memkern.cli.main import main


def run_cli(*args, env: dict | None = None):
    """``memkern ARGS`` in this process (paths may be Path objects)."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("memkern: error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]


def snapshot(*folders: Path) -> dict[Path, tuple[str, int]]:
    """(sha256, mode) of every file under ``folders``."""
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_unchanged(before: dict, *folders: Path) -> None:
    """Every file of ``before`` still there with the same bytes and mode (new files allowed
    only if the caller checks them)."""
    after = snapshot(*folders)
    changed = [p for p in before if after.get(p) != before[p]]
    assert not changed, f"changed or removed: {changed[:5]}"
