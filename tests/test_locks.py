"""One writer at a time: a second writer of a run or a localize output is refused with one line
naming the holder's pid, a stale lock of a dead process is taken over, and two writers started
together leave one intact run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import memkern.rundir.locks
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot

from memkern.rundir.atomic import read_jsonl
from memkern.training.checkpoints import load_checkpoint
from memkern.training.config import TrainConfig
from memkern.rundir.locks import hold, hold_run
from memkern.rundir.paths import RUN_LOCK, RunDir

MEMKERN = [sys.executable, "-m", "memkern.cli"]
LOCALIZE = ["--examples", "all", "--limit", "6", "--chunk", "2", "--ref-batch", "16",
            "--max-channels", "5", "--no-progress", "--device", "cpu"]

# Holds a lock until its stdin closes; prints "held" once it has it.
HOLDER = """
import sys
from memkern.rundir.locks import hold_output, hold_run
lock = hold_run(sys.argv[2]) if sys.argv[1] == "run" else hold_output(sys.argv[2])
with lock:
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder():
    """``holder(kind, path)`` starts a process holding that lock; it is released at exit."""
    procs = []

    def start(kind: str, path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)


@pytest.mark.parametrize("args", [
    ["train", "--out", "{run}", "--resume", "--no-progress"],
    ["rewind", "--run", "{run}", "--epochs", "0", "--no-progress"],
    ["retrain", "--run", "{run}", "--epochs", "1", "--no-progress"],
    ["grads", "--run", "{run}", "--epochs", "0", "--no-progress"],
    ["evaluate", "--ckpt", "{run}/checkpoints/epoch_003.safetensors"],
    ["report", "--run", "{run}"],
])
def test_second_writer_of_a_run_is_refused_naming_the_holder(run, holder, args):
    proc = holder("run", run)
    before = snapshot(run)
    result = run_cli(*[a.format(run=run) for a in args])
    assert_one_line_error(result, f"run directory {run}", f"pid {proc.pid}", "in use")
    assert_unchanged(before, run)
    proc.stdin.close()
    proc.wait(timeout=60)
    assert not (run / RUN_LOCK).exists()  # released and removed
    result = run_cli(*[a.format(run=run) for a in args])
    assert result.exit_code == 0, result.output


def test_second_writer_of_a_localize_output_is_refused(run, holder):
    out = run / "mine.jsonl"
    proc = holder("output", out)
    result = run_cli("localize", "--ckpt", RunDir(run).checkpoint_path(3), "--out", out,
                     *LOCALIZE)
    assert_one_line_error(result, f"output {out}", f"pid {proc.pid}")
    assert not out.exists()


def test_stale_lock_of_a_dead_process_is_taken_over(run):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run / RUN_LOCK).write_text(f"{dead}\n")  # what a kill -9 leaves: the file, no flock
    result = run_cli("report", "--run", run)
    assert result.exit_code == 0, result.output
    assert not (run / RUN_LOCK).exists()


def test_a_process_may_nest_holds_of_its_own_lock(tmp_path):
    with hold_run(tmp_path / "r"), hold_run(tmp_path / "r"):
        assert (tmp_path / "r" / RUN_LOCK).read_text().strip() == str(os.getpid())
    assert not (tmp_path / "r").exists()  # made for the lock only: removed again


def test_lock_file_removed_between_open_and_lock_is_not_trusted(tmp_path, monkeypatch):
    """The holder removes its lock file on release; a process that opened the old file just
    before must not believe that locking it locks the path: it opens the path again."""
    path = tmp_path / ".x.lock"
    real_open, opened = os.open, []

    def racing_open(p, flags, mode=0o777):
        fd = real_open(p, flags, mode)
        if not opened:
            os.unlink(p)  # the previous holder releases right after our open
        opened.append(fd)
        return fd

    monkeypatch.setattr(memkern.rundir.locks.os, "open", racing_open)
    with hold(path, what="x"):
        assert len(opened) == 2 and path.read_text().strip() == str(os.getpid())
    assert not path.exists()


def _wait_all(procs, *, check) -> None:
    """Wait for ``procs``, calling ``check()`` meanwhile (readers during the writes)."""
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        check()
        time.sleep(0.05)
    for p in procs:
        p.wait(timeout=10)


def test_two_trains_started_together(tmp_path):
    out = tmp_path / "cc2"
    common = ["train", "--out", str(out), "--model", "mlp", "--epochs", "2", "--batch-size",
              "32", "--no-progress"]
    seeds = {"3": "0.1", "4": "0.2"}  # different seeds and noise, as in the report
    procs = {seed: subprocess.Popen([*MEMKERN, *common, "--seed", seed, "--noise", noise],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed, noise in seeds.items()}
    seen_epochs = set()

    def readers_see_whole_files():
        run = RunDir(out)
        for epoch in run.epochs():  # a listed checkpoint is always complete
            if epoch not in seen_epochs:
                load_checkpoint(run.checkpoint_path(epoch))
                seen_epochs.add(epoch)
        read_jsonl(run.metrics_path)

    _wait_all(list(procs.values()), check=readers_see_whole_files)
    results = {seed: (p.returncode, p.stdout.read(), p.stderr.read()) for seed, p in procs.items()}
    winners = [s for s, (rc, _, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    winner = winners[0]
    loser = next(s for s in results if s != winner)
    rc, _, err = results[loser]
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, results[loser]
    assert f"pid {procs[winner].pid}" in lines[0] and "in use" in lines[0], lines[0]
    # The run is the winner's alone.
    run = RunDir(out)
    config = run.load_config()
    assert config == TrainConfig(model="mlp", epochs=2, batch_size=32, seed=int(winner),
                                 noise=float(seeds[winner]))
    assert run.epochs() == [0, 1, 2]
    assert all(load_checkpoint(run.checkpoint_path(e)).config == config for e in run.epochs())
    assert [r["epoch"] for r in run.load_metrics()] == [1, 2]
    noise = run.load_noise()
    assert noise["seed"] == int(winner) and noise["rate"] == float(seeds[winner])
    assert not (out / RUN_LOCK).exists()


def test_two_localize_runs_started_together(run):
    out = run / "localize.jsonl"
    cmd = [*MEMKERN, "localize", "--ckpt", str(RunDir(run).checkpoint_path(3)), *LOCALIZE]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    _wait_all(procs, check=lambda: read_jsonl(out))
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, p.stderr.read()) for p in procs]
    winner = next(p for p in procs if p.returncode == 0)
    loser = next(p for p in procs if p.returncode == 2)
    lines = [line for line in loser.stderr.read().splitlines() if line.strip()]
    assert len(lines) == 1 and f"pid {winner.pid}" in lines[0], lines
    indices = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    assert len(indices) == len(set(indices)) == 6
    summary = json.loads((run / "localize.summary.json").read_text())
    assert summary["examples"] == 6
