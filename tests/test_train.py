import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from formats import random_mnist, write_mnist
from safetensors.torch import load_file

from memkern.rundir.atomic import read_jsonl
from memkern.training.checkpoints import load_checkpoint
from memkern.training.config import TrainConfig
from memkern.errors import ConfigError
from memkern.rundir.paths import RunDir
from memkern.training.step import learning_rate
from memkern.training.train import train

# Small batches make an epoch long (~90 steps): step 40 of epoch 2 is in its middle.
KILL_ARGS = ["--dataset", "digits", "--model", "mlp", "--noise", "0.1", "--epochs", "3",
             "--batch-size", "16", "--seed", "5", "--no-progress"]


def memkern(*args, **kw):
    return subprocess.run([sys.executable, "-m", "memkern.cli", *args], capture_output=True,
                          text=True, **kw)


def test_run_directory_contract(tmp_path):
    run = train(TrainConfig(model="mlp", epochs=2, seed=1), out=tmp_path / "r", progress=False)
    assert run.epochs() == [0, 1, 2]
    rows = read_jsonl(run.metrics_path)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "clean_acc", "noisy_acc", "test_acc"):
        assert all(0 <= r[key] for r in rows) and all(np.isfinite(r[key]) for r in rows)
    noise = json.loads(run.noise_path.read_text())
    assert len(noise["noisy_indices"]) == round(0.1 * 1437) == noise["num_train"] // 10 + 1
    assert all(a != b for a, b in zip(noise["original_labels"], noise["noisy_labels"]))
    ckpt = load_checkpoint(run.checkpoint_path(2))
    assert ckpt.epoch == 2 and ckpt.config == run.load_config() and ckpt.momentum
    assert not load_checkpoint(run.checkpoint_path(0)).momentum


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [learning_rate(s, total_steps=100, base_lr=0.1, warmup=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


# Runs `memkern` with a SIGKILL at a fixed step of epoch 2: the same point on any machine,
# however busy (a kill timed from outside may come after the run has finished).
KILL_AT_STEP = """
import os, signal, sys
import memkern.training.train
real, epochs = memkern.training.train.iterate_batches, []
def batches(*args, **kwargs):
    epochs.append(1)
    for step, batch in enumerate(real(*args, **kwargs)):
        if len(epochs) == 2 and step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
        yield batch
memkern.training.train.iterate_batches = batches
from memkern.cli.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("optimizer,lr,states", [
    ("sgd", 0.05, {"momentum"}), ("adamw", 0.003, {"exp_avg", "exp_avg_sq", "step"})])
def test_kill_mid_epoch_and_resume_is_bit_identical(tmp_path, optimizer, lr, states):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = [*KILL_ARGS, "--optimizer", optimizer, "--lr", str(lr)]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP, "train", *args,
                           "--out", str(killed)], capture_output=True, text=True,
                          env={**os.environ, "KILL_AT_STEP": "40"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert RunDir(killed).epochs() == [0, 1]
    resumed = memkern("train", "--out", str(killed), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    train(TrainConfig(model="mlp", noise=0.1, epochs=3, batch_size=16, seed=5,
                      optimizer=optimizer, lr=lr), out=clean, progress=False)
    a = load_file(RunDir(killed).checkpoint_path(3))
    b = load_file(RunDir(clean).checkpoint_path(3))
    assert a.keys() == b.keys()
    assert {k.split(".")[1] for k in a if k.startswith("optim.")} == states
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["epoch"] for r in read_jsonl(RunDir(killed).metrics_path)] == [1, 2, 3]
    a, b = (load_file(RunDir(r).root / "dynamics.safetensors") for r in (killed, clean))
    assert a["epochs"].tolist() == [1, 2, 3] and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_on_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(11)
    write_mnist(tmp_path / "data", random_mnist(rng, n_train=120, n_test=30), gz=True)
    out = tmp_path / "run"
    result = memkern("train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
                     "--model", "mlp", "--epochs", "1", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(RunDir(out).checkpoint_path(1))
    assert ckpt.config.dataset == "mnist" and ckpt.model_state["hidden1.linear.weight"].shape[1] == 784
    assert len(json.loads(RunDir(out).noise_path.read_text())["noisy_indices"]) == 12


def test_resume_refuses_a_config_that_differs_from_the_runs(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    saved = RunDir(run).load_config()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="differs in lr, seed"):
        train(dataclasses.replace(saved, lr=0.5, seed=3), out=run, resume=True, device="cpu",
              progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    train(saved, out=run, resume=True, device="cpu", progress=False)  # the same config resumes
