"""``memkern grads`` under torchrun (2 ranks, gloo on CPU) writes what one process writes: the
per-example files bit-identical (each chunk is computed as one process computes it), the
summary's summed-gradient norms and cosines equal to float64 rounding."""
import shutil

import pytest
import torch

from memkern.experiments.gradients.run import gradient_accounting, per_example_path, summary_path
from memkern.rundir.paths import RunDir
from memkern.rundir.csv_tables import read_csv
from torchrun_launch import torchrun


@pytest.fixture(scope="module")
def one_process(tiny_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("grads", ".memkern.lock"))
    # torchrun starts its ranks with OMP_NUM_THREADS=1; a float32 reduction's order, and so its
    # last bits, depend on the thread count: compute the reference with one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gradient_accounting(run=run, epochs=[0, 3], batch_size=100, device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return RunDir(run)


def test_two_ranks_equal_one_process(tiny_run, one_process, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run, run.root, ignore=shutil.ignore_patterns("grads", ".memkern.lock"))
    res = torchrun(["grads", "--run-dir", run.root, "--epochs", "0,3", "--batch-size", "100",
                    "--device", "cpu", "--no-progress"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("gradient accounting saved") == 1
    for epoch in (0, 3):  # 1437 examples: 15 chunks, 8 on rank 0 and 7 on rank 1
        assert per_example_path(run, epoch).read_text() == \
            per_example_path(one_process, epoch).read_text()
    got, want = read_csv(summary_path(run)), read_csv(summary_path(one_process))
    assert [(r["epoch"], r["group"]) for r in got] == [(r["epoch"], r["group"]) for r in want]
    assert len(got) > 2 and list(got[0]) == list(want[0])
    for g, w in zip(got, want):
        for key in w:
            if key in ("epoch", "group"):
                continue
            a, b = float(g[key]), float(w[key])
            assert a == b or abs(a - b) <= 1e-12 * max(abs(a), abs(b)), (g["group"], key, a, b)
    assert sorted(p.name for p in run.grads.iterdir()) == \
        sorted(p.name for p in one_process.grads.iterdir())
