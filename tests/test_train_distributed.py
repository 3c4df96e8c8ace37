"""``memkern train`` under torchrun (2 ranks, gloo on CPU) on real digits: the same run as one
process with the same global batch (weights, momentum and BatchNorm statistics within float
tolerance, tied-dropout masks of each example's own index; a tied text run's canary measures too),
written once by rank 0; a rank
killed mid-run, resumed with another world size, ends equal to an uninterrupted run;
one-process commands refuse a world of 2.

Tolerance: float32 sums taken in another order differ by ~1e-7 per step; these runs (12 and
18 steps of an MLP) stay within 1e-5. Longer runs may not: a value that float noise moves
across a ReLU kink or a max-pool tie routes one gradient elsewhere, and SGD carries the
difference on (measured: 1e-4 after 8 steps of the tied MLP at batch 64).
"""
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from cli_checks import assert_one_line_error, run_cli
from memkern.rundir.atomic import read_jsonl
from memkern.training.checkpoints import load_checkpoint
from memkern.training.config import TrainConfig, config_from_options
from memkern.errors import ConfigError
from memkern.training.train import train
from torchrun_launch import start_torchrun, torchrun

TIED = dict(model="mlp", tied_dropout=True, batch_size=256, epochs=2)
TIED_OPTS = ["--model", "mlp", "--tied-dropout", "--batch-size", "256", "--epochs", "2"]


def _assert_same_state(got: Path, want: Path):
    a, b = load_checkpoint(got), load_checkpoint(want)
    assert a.epoch == b.epoch
    for part in ("model_state", "momentum"):  # model_state holds BatchNorm running statistics
        x, y = getattr(a, part), getattr(b, part)
        assert sorted(x) == sorted(y)
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-5, msg=k)


def _one_process(out, **fields):
    return train(TrainConfig(**fields), out=out, device="cpu", progress=False)


def test_two_ranks_equal_one_process(tmp_path):
    ref = _one_process(tmp_path / "one", **TIED)
    started = time.perf_counter()
    res = torchrun(["train", "--out", tmp_path / "two", "--device", "cpu", "--no-progress",
                    *TIED_OPTS])
    print(f"torchrun 2 ranks: {time.perf_counter() - started:.1f} s")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("run saved to") == 1  # rank 0 alone reports
    two = tmp_path / "two"
    assert sorted(p.name for p in two.rglob("*")) == sorted(p.name for p in ref.root.rglob("*"))
    for epoch in (0, 1, 2):
        _assert_same_state(two / "checkpoints" / f"epoch_{epoch:03d}.safetensors",
                           ref.checkpoint_path(epoch))
    assert (two / "noise.json").read_text() == ref.noise_path.read_text()
    config = load_checkpoint(two / "checkpoints" / "epoch_002.safetensors").config
    assert config.world_size == 2 and ref.load_config().world_size == 1
    got, want = read_jsonl(two / "metrics.jsonl"), read_jsonl(ref.metrics_path)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    assert [r["world_size"] for r in got] == [2, 2] and [r["world_size"] for r in want] == [1, 1]
    for g, w in zip(got, want):
        assert g["epoch"] == w["epoch"]
        assert abs(g["train_loss"] - w["train_loss"]) < 1e-5
        assert abs(g["noisy_acc_drop"] - w["noisy_acc_drop"]) < 1e-6  # the tied masks agree


# A text run: a 1-layer byte GPT, tied dropout keyed by canary id on its MLP neurons.
TEXT = dict(dataset="text:stdlib", model="gpt?layers=1&width=32&heads=2&mlp=64", seq_len=32,
            text_bytes=4000, canaries=4, canary_reps=(1, 8), epochs=2, batch_size=16,
            tied_dropout=True)
TEXT_OPTS = ["--dataset", "text:stdlib", "--model", "gpt?layers=1&width=32&heads=2&mlp=64",
             "--seq-len", "32", "--text-bytes", "4000", "--canaries", "4", "--canary-reps", "1,8",
             "--epochs", "2", "--batch-size", "16", "--tied-dropout"]


def test_two_ranks_equal_one_process_on_a_tied_text_run(tmp_path):
    # the CLI's defaults for a text dataset (TEXT_DEFAULTS), as torchrun gets
    ref = train(config_from_options(TEXT), out=tmp_path / "one", device="cpu", progress=False)
    res = torchrun(["train", "--out", tmp_path / "two", "--device", "cpu", "--no-progress",
                    *TEXT_OPTS])
    assert res.returncode == 0, res.stderr
    two = tmp_path / "two"
    assert (two / "canaries.json").read_bytes() == ref.canaries_path.read_bytes()
    for epoch in (0, 1, 2):
        _assert_same_state(two / "checkpoints" / f"epoch_{epoch:03d}.safetensors",
                           ref.checkpoint_path(epoch))
    got, want = read_jsonl(two / "metrics.jsonl"), read_jsonl(ref.metrics_path)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):  # canary measures under own, kept and dropped masks agree
        for key in w:
            if key.startswith(("exposure_", "extracted_", "heldout_bpb", "train_loss")):
                assert abs(g[key] - w[key]) < 1e-4, key


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun ``launcher_pid`` started."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != launcher_pid:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = int(stat.parent.name)
    return ranks


def test_a_killed_rank_stops_the_run_and_another_world_resumes_it(tmp_path):
    opts = dict(model="mlp", batch_size=256, epochs=3)
    ref = _one_process(tmp_path / "one", **opts)
    out = tmp_path / "two"
    launch = start_torchrun(["train", "--out", out, "--device", "cpu", "--no-progress",
                             "--model", "mlp", "--batch-size", "256", "--epochs", "3"])
    first = out / "checkpoints" / "epoch_001.safetensors"
    deadline = time.monotonic() + 120
    while not first.exists() and launch.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(_worker_pids(launch.pid)[1], signal.SIGKILL)  # rank 1, during epoch 2
    _, stderr = launch.communicate(timeout=120)
    assert launch.returncode != 0
    done = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "epoch_003.safetensors" not in done, "finished before the kill: make epochs longer"
    assert not [p for p in out.rglob("*") if ".memkern-tmp." in p.name]  # nothing half-written
    # rank 0 says why in one line, unless torchrun stopped it first (torchrun then reports)
    ours = [line for line in stderr.splitlines() if line.startswith("memkern:")]
    assert len(ours) <= 1 and all("rank 0 of 2: another rank stopped" in line for line in ours)
    train(None, out=out, resume=True, device="cpu", progress=False)  # a world of one
    _assert_same_state(out / "checkpoints" / "epoch_003.safetensors", ref.checkpoint_path(3))
    lines = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert lines[-1]["world_size"] == 1 and lines[0]["world_size"] == 2


def test_two_ranks_resume_a_one_process_run(tmp_path):
    ref = _one_process(tmp_path / "one", **TIED)
    out = tmp_path / "two"
    _one_process(out, **TIED)
    # What a kill during epoch 2 leaves: checkpoints 0 and 1, epoch 2's line already written.
    (out / "checkpoints" / "epoch_002.safetensors").unlink()
    res = torchrun(["train", "--out", out, "--resume", "--device", "cpu", "--no-progress"])
    assert res.returncode == 0, res.stderr
    _assert_same_state(out / "checkpoints" / "epoch_002.safetensors", ref.checkpoint_path(2))
    assert [(r["epoch"], r["world_size"]) for r in read_jsonl(out / "metrics.jsonl")] == \
        [(1, 1), (2, 2)]


@pytest.fixture
def world_of_two(monkeypatch):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("command", [["rewind", "--run", "r"], ["retrain", "--run", "r"],
                                     ["evaluate", "--ckpt", "c"], ["scores", "--run", "r"],
                                     ["report", "--run", "r"], ["demo"], ["env"]])
def test_one_process_commands_refuse_a_world_of_two(world_of_two, command, tmp_path):
    assert_one_line_error(run_cli(*command), "runs in one process", "WORLD_SIZE=2",
                          "train, grads, localize")


def test_bad_input_under_torchrun_fails_before_joining(world_of_two, tmp_path):
    with pytest.raises(ConfigError, match="--track-grads runs in one process"):
        train(TrainConfig(model="mlp"), out=tmp_path / "a", track_grads=True, progress=False)
    with pytest.raises(ConfigError, match="cannot give each of 2 ranks a row"):
        # 1437 training examples in batches of 718: the last batch has 1 row
        train(TrainConfig(model="mlp", batch_size=718), out=tmp_path / "b", progress=False)
    assert list(tmp_path.iterdir()) == []
