"""The import rules of docs/architecture.md, read from the source with ``ast`` (every import
statement, including those inside functions; relative imports resolved).

- kernels/ (memkern.kernels) imports nothing of memkern but itself;
- memkern/ (the library) never imports the CLI (memkern.cli);
- the CLI takes no locks and writes no run files itself: it never imports the run directory's
  locks, atomic writes, ownership checks or progress (the runners do);
- the algorithms (ALGORITHMS) import nothing of the run directory, the report or the CLI: no
  files, locks or progress.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where each installed package's source lives (pyproject.toml's package-dir).
SOURCES = {"memkern": ROOT / "memkern", "memkern.kernels": ROOT / "kernels",
           "memkern.cli": ROOT / "cli"}

# Algorithm modules: models, states and tensors in; arrays or dataclasses out.
ALGORITHMS = (
    "memkern/network",
    "memkern/experiments/gradients/norms",
    "memkern/experiments/gradients/accounting.py",
    "memkern/experiments/gradients/subset.py",
    "memkern/experiments/rewind/algorithm.py",
    "memkern/experiments/retrain/algorithm.py",
    "memkern/experiments/localize/channels.py",
    "memkern/experiments/localize/edited.py",
    "memkern/experiments/localize/exhaustive.py",
    "memkern/experiments/localize/greedy.py",
    "memkern/experiments/localize/objective.py",
    "memkern/experiments/localize/scan.py",
    "memkern/experiments/localize/scan_delta.py",
    "memkern/experiments/localize/scan_plan.py",
    "memkern/experiments/localize/weight_edit.py",
    "memkern/experiments/scores/detection.py",
    "memkern/experiments/text/edits.py",
    "memkern/experiments/text/exposure.py",
    "memkern/experiments/text/extraction.py",
    "memkern/experiments/text/objective.py",
    "memkern/experiments/text/targets.py",
    "memkern/experiments/scores/signals.py",
    "memkern/experiments/scores/text_signals.py",
    "memkern/experiments/text/methods",
    "memkern/training/evaluate.py",
)
RUNNER_TOOLS = ("memkern.rundir.locks", "memkern.rundir.atomic", "memkern.rundir.ownership",
                "memkern.rundir.progress")


def module_name(path: Path) -> str:
    """The installed dotted name of a source file."""
    for package, folder in SOURCES.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            return ".".join((package, *parts))
    raise AssertionError(f"{path} is in no package")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from X import a, b`` also
    yields ``X.a`` and ``X.b`` (which may name submodules)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def sources(folder: str) -> list[Path]:
    path = ROOT / folder
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def offending(paths: list[Path], forbidden) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in paths
            for line, mod in imports(p) if forbidden(mod)]


def within(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def test_the_checker_sees_relative_imports_and_names_inside_functions():
    found = dict((m, line) for line, m in imports(ROOT / "kernels" / "channel_mask.py"))
    assert "memkern.kernels.channel_mask_ops" in found
    assert module_name(ROOT / "cli" / "rewind.py") == "memkern.cli.rewind"
    lazily = [m for _, m in imports(ROOT / "cli" / "rewind.py")]
    assert "memkern.experiments.rewind.run" in lazily  # imported inside the command


def test_kernels_import_nothing_of_memkern_but_themselves():
    bad = offending(sources("kernels"), lambda m: within(m, "memkern")
                    and not within(m, "memkern.kernels"))
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_cli():
    bad = offending(sources("memkern"), lambda m: within(m, "memkern.cli"))
    assert not bad, "\n".join(bad)


def test_the_cli_leaves_locks_and_writes_to_the_runners():
    bad = offending(sources("cli"), lambda m: any(within(m, t) for t in RUNNER_TOOLS))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ALGORITHMS)
def test_algorithms_touch_no_run_directory(folder):
    paths = sources(folder)
    assert paths and all(p.is_file() for p in paths), f"{folder} is gone: update ALGORITHMS"
    bad = offending(paths, lambda m: any(within(m, p) for p in (
        "memkern.rundir", "memkern.report", "memkern.cli")))
    assert not bad, "\n".join(bad)


def test_the_public_api_loads_from_memkern_on_first_use():
    code = ("import sys, memkern; assert 'torch' not in sys.modules, 'import memkern loaded torch'; "
            "missing = [n for n in memkern.__all__ if getattr(memkern, n, None) is None]; "
            "print(len(memkern.__all__), missing)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    count, missing = done.stdout.split(" ", 1)
    assert int(count) >= 30 and missing.strip() == "[]"
