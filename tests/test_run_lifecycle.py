"""A run's life after the first training: extending it, naming it by --run, reusing finished
analyses, and what the commands print when they end."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot
from memkern.training.config import TrainConfig
from memkern.errors import CheckpointError, ConfigError, RunDirError
from memkern.training.train import train

FLAT = TrainConfig(model="mlp", epochs=2, lr_schedule="constant", warmup=0.0)


def test_extending_a_constant_schedule_run_equals_training_it_longer(tmp_path):
    train(FLAT, out=tmp_path / "extended", device="cpu", progress=False)
    run = train(dataclasses.replace(FLAT, epochs=3), out=tmp_path / "extended", resume=True,
                device="cpu", progress=False)
    straight = train(dataclasses.replace(FLAT, epochs=3), out=tmp_path / "straight",
                     device="cpu", progress=False)
    a = load_file(run.checkpoint_path(3))
    b = load_file(straight.checkpoint_path(3))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical, momentum included
    assert [m["epoch"] for m in run.load_metrics()] == [1, 2, 3]
    assert run.load_config().epochs == 3
    # extended: resuming it again (no config) is a no-op
    again = train(None, out=tmp_path / "extended", resume=True, device="cpu", progress=False)
    assert again.epochs() == [0, 1, 2, 3]


def test_extending_a_cosine_run_is_refused_with_the_reason(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    before = snapshot(tiny_run)
    with pytest.raises(ConfigError, match="cosine decay spans all epochs"):
        train(dataclasses.replace(TrainConfig.from_json(json.dumps(config)), epochs=6),
              out=tiny_run, resume=True, device="cpu", progress=False)
    assert_one_line_error(run_cli("train", "--out", tiny_run, "--resume", "--epochs", "6",
                                  "--no-progress"), "cannot extend", "cosine")
    assert_unchanged(before, tiny_run)


def test_fewer_epochs_or_other_options_on_resume_are_refused(tiny_run):
    before = snapshot(tiny_run)
    assert_one_line_error(run_cli("train", "--out", tiny_run, "--resume", "--epochs", "2",
                                  "--no-progress"), "extending takes more epochs")
    assert_one_line_error(run_cli("train", "--out", tiny_run, "--resume", "--epochs", "6",
                                  "--lr", "0.5", "--no-progress"), "differ", "lr")
    assert_unchanged(before, tiny_run)


def test_an_existing_run_error_names_function_arguments_in_the_library(tiny_run):
    with pytest.raises(RunDirError) as error:
        train(TrainConfig(model="mlp", epochs=3), out=tiny_run, device="cpu", progress=False)
    assert "resume=True" in str(error.value) and "out=" in str(error.value)
    assert "--" not in str(error.value)
    assert_one_line_error(run_cli("train", "--out", tiny_run, "--no-progress"), "--resume",
                          "--out")


def test_train_prints_one_line_per_epoch_and_its_final_accuracies(tmp_path):
    result = run_cli("train", "--out", tmp_path / "r", "--model", "mlp", "--epochs", "2",
                     "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(": ")[1].split()[:2] for line in lines[:2]] == [["epoch", "1/2"],
                                                                       ["epoch", "2/2"]]
    final = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    row = next(line for line in lines if line.startswith("model"))
    assert row.split()[1:] == [f"{final[k]:.3f}" for k in ("clean_acc", "noisy_acc", "test_acc")]


def test_run_names_the_final_checkpoint(tiny_run):
    by_run = run_cli("evaluate", "--run", tiny_run, "--json", "--device", "cpu")
    by_ckpt = run_cli("evaluate", "--ckpt", tiny_run / "checkpoints" / "epoch_003.safetensors",
                      "--json", "--device", "cpu")
    assert by_run.exit_code == 0, by_run.output
    assert json.loads(by_run.stdout) == json.loads(by_ckpt.stdout)
    for command in ("evaluate", "localize"):
        assert_one_line_error(run_cli(command, "--device", "cpu"), "one of --ckpt", "--run")
        assert_one_line_error(run_cli(command, "--run", tiny_run, "--ckpt",
                                      tiny_run / "checkpoints" / "epoch_001.safetensors",
                                      "--device", "cpu"), "only one of --ckpt")


def test_rewind_reuses_its_table_while_the_inputs_are_unchanged(tiny_run, tmp_path, monkeypatch):
    import shutil

    from memkern.experiments.rewind import algorithm
    from memkern.experiments.rewind import run as rewind_module
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    first = rewind_module.rewind(run=run, device="cpu", progress=False)
    calls = []
    real = algorithm.split_accuracies
    monkeypatch.setattr(algorithm, "split_accuracies",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = rewind_module.rewind(run=run, device="cpu", progress=False)
    assert calls == [] and again == first
    rewind_module.rewind(run=run, groups=["head"], device="cpu", progress=False)
    assert len(calls) == 1 + 3  # other groups: evaluated anew (final + one per epoch)
    calls.clear()
    rewind_module.rewind(run=run, groups=["head"], device="cpu", progress=False)
    assert calls == []
    # a checkpoint that changed is refused, and the table is neither reused nor rewritten
    table = (run / "rewind.csv").read_bytes()
    ckpt = run / "checkpoints" / "epoch_001.safetensors"
    shutil.copy(run / "checkpoints" / "epoch_002.safetensors", ckpt)
    with pytest.raises(CheckpointError, match="epoch_001.safetensors holds epoch 2"):
        rewind_module.rewind(run=run, groups=["head"], device="cpu", progress=False)
    assert (run / "rewind.csv").read_bytes() == table


def test_grads_rewind_retrain_end_with_their_numbers(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    grads = run_cli("grads", "--run", run, "--epochs", "3", "--no-progress", "--device", "cpu")
    assert grads.exit_code == 0, grads.output
    assert "grads run: epoch 3 accounted (1/1)" in grads.stdout
    header = next(line for line in grads.stdout.splitlines() if line.startswith("group"))
    assert header.split() == ["group", "clean", "norm", "noisy", "norm", "noisy/clean", "cosine"]
    rewind = run_cli("rewind", "--run", run, "--no-progress", "--device", "cpu")
    assert rewind.exit_code == 0, rewind.output
    assert "Rewinding " in rewind.stdout and "final (epoch 3)" in rewind.stdout
    retrain = run_cli("retrain", "--run", run, "--groups", "head", "--epochs", "1",
                      "--no-progress", "--device", "cpu")
    assert retrain.exit_code == 0, retrain.output
    assert "retrain run: head epoch 1/1" in retrain.stdout
    row = retrain.stdout.splitlines()[-2].split()
    assert row[0] == "head" and row[2] == "1"


@pytest.mark.parametrize("command, target, advice", [
    (["demo", "--out", "OUT"], "memkern.demo.run_demo", "rerun the same command to continue"),
    (["train", "--out", "OUT"], "memkern.training.train.train_from_options", "rerun with --resume"),
    (["grads", "--run", "OUT"], "memkern.experiments.gradients.run.gradient_accounting", "rerun the same command"),
    (["rewind", "--run", "OUT"], "memkern.experiments.rewind.run.rewind", "nothing was left half-written"),
])
def test_ctrl_c_advice_fits_the_command(command, target, advice, monkeypatch, tmp_path):
    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    result = run_cli(*[str(tmp_path) if a == "OUT" else a for a in command])
    assert result.exit_code == 130
    assert advice in result.stderr
    if command[0] != "train":
        assert "--resume" not in result.stderr
