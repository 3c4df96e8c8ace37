"""The README's Python snippets run exactly as written right after the quick start.

Each ```python block runs on its own (a fresh namespace) in a folder whose runs/digits is a
real run, as the quick start leaves it (here a small one: the conftest's 3-epoch mlp).
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

from memkern.rundir.atomic import read_jsonl
from memkern.rundir.paths import RunDir

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 3


@pytest.fixture
def after_quick_start(tiny_run, tmp_path, monkeypatch):
    shutil.copytree(tiny_run, tmp_path / "runs" / "digits")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_block(code: str, namespace: dict | None = None) -> str:
    """Run ``code`` in ``namespace`` (a fresh one by default); returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"}
             if namespace is None else namespace)
    return out.getvalue()


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_snippet_runs_as_written(after_quick_start, number):
    from memkern.rundir.context import open_run
    from memkern.experiments.gradients.norms import default_groups

    code = BLOCKS[number]
    namespace = {"__name__": "__readme__"}
    printed = run_block(code, namespace)
    assert printed.strip(), "every snippet shows its result"
    if "per_example_grad_norms" in code:
        model = open_run(after_quick_start / "runs" / "digits", device="cpu").model
        names = [line.split()[0] for line in printed.splitlines()]
        assert names == [g.name for g in default_groups(model)]
    if "train(" in code:
        assert "after epoch 5" in printed
        assert (after_quick_start / "runs" / "digits-mlp" / "checkpoints"
                / "epoch_005.safetensors").is_file()
    if "rewind(" in code:
        assert "Rewinding" in printed
        assert (after_quick_start / "runs" / "digits" / "rewind.csv").is_file()
    if "rewind_accuracies(" in code:
        check_algorithms_equal_runners(after_quick_start / "runs" / "digits", namespace, printed)


def check_algorithms_equal_runners(run: Path, namespace: dict, printed: str) -> None:
    """The notebook's algorithms give what the commands write: the rewind rows of epoch 0, and
    the channels `memkern localize` zeroes for the same examples with the same settings."""
    import memkern

    assert namespace["rows"] == memkern.rewind(run=run, epochs=[0], progress=False)
    found = namespace["memorized"].tolist()
    assert len(found) == 4 and printed.count("example ") == 4
    listing = run / "targets.txt"
    listing.write_text("\n".join(map(str, found)) + "\n")
    result = memkern.localize(ckpt=RunDir(run).final_checkpoint(), examples=str(listing),
                              out=run / "localize.jsonl", device="cpu", progress=False)
    lines = {r["index"]: r for r in read_jsonl(result.path)}
    for line in printed.splitlines()[-4:]:
        index = int(line.split()[1].rstrip(":"))
        assert f"flipped={lines[index]['flipped']}" in line
        assert str([tuple(c) for c in lines[index]["channels"]]) in line
