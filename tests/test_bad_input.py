"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing half-written."""
import os
import struct

import pytest
import torch
from cli_checks import assert_one_line_error, run_cli
from safetensors.torch import save_file

from memkern.training.checkpoints import load_checkpoint, load_model_state
from memkern.errors import CheckpointError
from memkern.network.models import build_model
from memkern.rundir.paths import RunDir


@pytest.mark.parametrize("args,fragments", [
    (["--dataset", "imagenet"], ["imagenet"]),
    (["--model", "resnet7"], ["resnet7"]),
    (["--noise", "1.5"], ["noise", "1.5"]),
    (["--noise", "-0.2"], ["noise", "-0.2"]),
    (["--epochs", "0"], ["epochs", "0"]),
    (["--dataset", "mnist"], ["--data-dir"]),
])
def test_bad_train_options(tmp_path, args, fragments):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--out", str(out), "--no-progress", *args), *fragments)
    assert not out.exists(), "nothing may be written on bad input"


def test_missing_dataset_files(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    result = run_cli("train", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"),
                     "--out", str(out), "--no-progress")
    assert_one_line_error(result, "train-images-idx3-ubyte")
    assert not out.exists()


def test_wrong_format_dataset_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (data / name).write_bytes(struct.pack(">I", 0x12345678) + os.urandom(64))
    result = run_cli("train", "--dataset", "mnist", "--data-dir", str(data), "--out",
                     str(tmp_path / "run"), "--no-progress")
    assert_one_line_error(result, "magic")
    assert not (tmp_path / "run").exists()


def test_existing_run_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("mine")
    assert_one_line_error(run_cli("train", "--out", str(out)), "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["something"]


def test_resume_of_a_non_run(tmp_path):
    assert_one_line_error(run_cli("train", "--out", str(tmp_path), "--resume"), "not a memkern run")


def test_checkpoint_round_trip(tiny_run):
    ckpt = load_checkpoint(RunDir(tiny_run).checkpoint_path(1))
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    load_model_state(model, ckpt)
    assert all(torch.equal(v, ckpt.model_state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign", "pickle"])
def test_corrupt_or_foreign_checkpoint(tiny_run, tmp_path, damage):
    path = tmp_path / "bad.safetensors"
    good = RunDir(tiny_run).checkpoint_path(1).read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        save_file({"weight": torch.randn(3, 3)}, str(path), metadata={"format": "pt"})
    else:  # a torch.save pickle: must be refused, never unpickled
        torch.save({"model": torch.randn(2)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_checkpoint_of_another_architecture(tiny_run):
    ckpt = load_checkpoint(RunDir(tiny_run).checkpoint_path(1))
    with pytest.raises(CheckpointError, match="another architecture"):
        load_model_state(build_model("cnn", num_classes=10, in_channels=1, image_size=8), ckpt)


def test_missing_checkpoint():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint("/nonexistent/epoch_001.safetensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("command", ["evaluate", "localize", "grads", "rewind", "retrain", "train"])
def test_cuda_device_without_cuda_is_one_line(tiny_run, tmp_path, command):
    where = (["--ckpt", str(RunDir(tiny_run).final_checkpoint())]
             if command in ("evaluate", "localize") else
             ["--out", str(tmp_path / "new"), "--epochs", "1"] if command == "train" else
             ["--run", str(tiny_run)])
    before = sorted(p.name for p in tiny_run.iterdir())
    assert_one_line_error(run_cli(command, *where, "--device", "cuda", "--no-progress"),
                          "--device cuda", "no CUDA device")
    assert sorted(p.name for p in tiny_run.iterdir()) == before
    assert not (tmp_path / "new").exists()
