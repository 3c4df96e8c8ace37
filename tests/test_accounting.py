"""Clean/noisy subset gradients, live tracking in training, and the ``memkern grads`` command."""
from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from memkern.experiments.gradients.run import gradient_accounting
from memkern.cli.options import parse_epochs
from memkern.rundir.atomic import read_jsonl
from memkern.training.checkpoints import load_checkpoint
from memkern.cli.main import main
from memkern.training.config import TrainConfig
from memkern.errors import ConfigError
from memkern.experiments.gradients.norms import per_example_grad_norms
from memkern.network.models import build_model, layer_groups
from memkern.rundir.paths import RunDir
from memkern.experiments.gradients.live import LiveSubsetTracker
from memkern.experiments.gradients.subset import subset_gradients, subset_stats
from memkern.training.train import train


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory):
    """A tiny digits run (mlp, 2 epochs) trained with live gradient tracking."""
    root = tmp_path_factory.mktemp("grads") / "run"
    train(TrainConfig(model="mlp", epochs=2), out=root, device="cpu", progress=False,
          track_grads=True)
    return RunDir(root)


def _model_and_batch():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=8).double().train()
    x = torch.randn(9, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (9,))
    noisy = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    return model, x, y, noisy


def test_clean_and_noisy_sums_add_up_to_the_batch_gradient():
    model, x, y, noisy = _model_and_batch()
    logits = model(x)  # train mode: BatchNorm couples the examples, the split still adds up
    parts = [subset_gradients(model, logits, y, m, 1.0 / len(y), retain_graph=True)
             for m in (noisy, ~noisy)]
    full = torch.autograd.grad(F.cross_entropy(logits, y), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), full):
        torch.testing.assert_close(parts[0][name] + parts[1][name], g, rtol=1e-10, atol=1e-12)
    rows = subset_stats(parts[1], parts[0], layer_groups(model))
    assert [r["group"] for r in rows] == ["hidden1", "hidden2", "head", "total"]
    assert all(-1 <= r["cosine"] <= 1 and r["clean_norm"] > 0 for r in rows)
    total = math.sqrt(sum(r["noisy_norm"] ** 2 for r in rows[:-1]))
    assert abs(rows[-1]["noisy_norm"] - total) <= 1e-9 * total


def test_live_tracker_splits_the_real_step(tmp_path):
    model, x, y, noisy = _model_and_batch()
    tracker = LiveSubsetTracker(model, tmp_path / "live.jsonl", noisy, first_epoch=1)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    clean = subset_gradients(model, logits, y, ~noisy, 1.0 / len(y), retain_graph=True)
    loss.backward(retain_graph=True)
    tracker.add_step(logits, y, torch.arange(len(y)))
    for name, p in model.named_parameters():
        torch.testing.assert_close(tracker.step_sum[name] - tracker.noisy_sum[name], clean[name])
        torch.testing.assert_close(tracker.step_sum[name], p.grad, rtol=0, atol=0)
    tracker.finish_epoch(1)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "live.jsonl")] == [1] * 4


def test_tracked_training_is_bit_identical_and_logs_every_epoch(tracked_run, tmp_path):
    plain = train(TrainConfig(model="mlp", epochs=2), out=tmp_path / "plain", device="cpu",
                  progress=False)
    a = load_checkpoint(plain.checkpoint_path(2))
    b = load_checkpoint(tracked_run.checkpoint_path(2))
    assert set(a.model_state) == set(b.model_state)
    for key, value in a.model_state.items():
        assert torch.equal(value, b.model_state[key]), key  # bit-identical weights
    rows = read_jsonl(tracked_run.grads / "live.jsonl")
    assert [(r["epoch"], r["group"]) for r in rows] == [
        (e, g) for e in (1, 2) for g in ("hidden1", "hidden2", "head", "total")]
    assert all(r["noisy_norm"] > 0 and r["clean_norm"] > 0 for r in rows)


def test_grads_command_writes_its_files_and_resumes(tracked_run):
    result = CliRunner().invoke(main, ["grads", "--run", str(tracked_run.root), "--epochs",
                                       "0,2", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = tracked_run.grads
    for name in ("summary.csv", "per_example_epoch_000.csv", "per_example_epoch_002.csv",
                 "summed_norms.png", "cosine.png", "live_summed_norms.png", "live_cosine.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "per_example_epoch_001.csv").exists()
    with open(out / "per_example_epoch_002.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "noisy", "label", "hidden1", "hidden2", "head", "total"]
    noise = tracked_run.load_noise()
    assert len(rows) == noise["num_train"]
    assert sorted(int(r["index"]) for r in rows if r["noisy"] == "1") == noise["noisy_indices"]
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(r["epoch"], r["group"]) for r in summary] == [
        (e, g) for e in ("0", "2") for g in ("hidden1", "hidden2", "head", "total")]
    # The CSV's norms are those of per_example_grad_norms on the checkpoint.
    from memkern.rundir.context import load_trained
    trained = load_trained(tracked_run.checkpoint_path(2), device="cpu")
    data = trained.data
    direct = per_example_grad_norms(trained.model, data.train_images[:4], data.train_labels[:4],
                                    mode="loop")
    got = torch.tensor([[float(r[g]) for g in ("hidden1", "hidden2", "head")] for r in rows[:4]])
    torch.testing.assert_close(got, direct.float(), rtol=1e-4, atol=1e-7)
    before = (out / "per_example_epoch_002.csv").stat().st_mtime_ns
    gradient_accounting(run=tracked_run.root, epochs=[2], device="cpu", progress=False)
    assert (out / "per_example_epoch_002.csv").stat().st_mtime_ns == before


@pytest.mark.parametrize("args,message", [
    (["--run", "{missing}"], "not a memkern run directory"),
    (["--run", "{run}", "--epochs", "7"], "no checkpoint for epoch 7 (epochs with checkpoints: 0, 1, 2)"),
    (["--run", "{run}", "--epochs", "one"], "comma-separated integers"),
])
def test_grads_command_bad_input(tracked_run, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "nope", run=tracked_run.root) for a in args]
    result = CliRunner().invoke(main, ["grads", *args, "--no-progress"])
    assert result.exit_code == 2
    assert message in result.output


def test_parse_epochs():
    assert parse_epochs("10, 0,5,5") == [0, 5, 10]
    assert parse_epochs(None) is None
    with pytest.raises(ConfigError):
        parse_epochs("1-3")
