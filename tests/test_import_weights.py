"""`memkern import`: weights trained outside memkern become a run every analysis reads; the
labels they were trained with define the noisy set; bad weights or labels get one line."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_checks import assert_one_line_error, run_cli
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from memkern.training.checkpoints import load_checkpoint
from memkern.network.models import build_model

N_TRAIN, N_TEST = 240, 60


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Real digits as an .npz, and a cnn trained on them in a plain torch loop with 10% of its
    training labels flipped by this fixture (memkern's training code is not used)."""
    root = tmp_path_factory.mktemp("foreign")
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    np.savez(root / "digits.npz", x_train=images[:N_TRAIN], y_train=labels[:N_TRAIN],
             x_test=images[N_TRAIN:N_TRAIN + N_TEST], y_test=labels[N_TRAIN:N_TRAIN + N_TEST])
    rng = np.random.default_rng(7)
    flipped = np.sort(rng.choice(N_TRAIN, N_TRAIN // 10, replace=False))
    train_labels = labels[:N_TRAIN].copy()
    train_labels[flipped] = (train_labels[flipped] + rng.integers(1, 10, len(flipped))) % 10

    x = torch.tensor(images[:N_TRAIN + N_TEST], dtype=torch.float32)[:, None]
    mean, std = x[:N_TRAIN].mean(), x[:N_TRAIN].std()  # the train split's, one channel
    x = (x - mean) / std
    y = torch.tensor(train_labels)
    torch.manual_seed(3)
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(8):
        for idx in torch.randperm(N_TRAIN).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    noisy = np.isin(np.arange(N_TRAIN), flipped)
    hits = pred[:N_TRAIN] == train_labels
    direct = {"clean_acc": hits[~noisy].mean(), "noisy_acc": hits[noisy].mean(),
              "test_acc": (pred[N_TRAIN:] == labels[N_TRAIN:N_TRAIN + N_TEST]).mean()}
    np.save(root / "labels.npy", train_labels)
    return {"root": root, "dataset": f"npz:{root / 'digits.npz'}", "state": model.state_dict(),
            "flipped": flipped.tolist(), "direct": direct, "labels": train_labels}


def _import(foreign, tmp_path, weights, *extra):
    out = tmp_path / "run"
    result = run_cli("import", "--weights", weights, "--model", "cnn", "--dataset",
                     foreign["dataset"], "--out", out, *extra)
    return result, out


def _evaluate(out):
    result = run_cli("evaluate", "--ckpt", out / "checkpoints/epoch_001.safetensors", "--json",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_wrapped_torch_state_dict_round_trips(foreign, tmp_path):
    """A {"state_dict": ...} wrapper with DataParallel's module. prefix, as training scripts
    save them; evaluate gives the accuracies of the model evaluated directly."""
    wrapped = {"epoch": 8, "state_dict": {"module." + k: v for k, v in foreign["state"].items()}}
    torch.save(wrapped, tmp_path / "model.pt")
    result, out = _import(foreign, tmp_path, tmp_path / "model.pt", "--train-labels",
                          foreign["root"] / "labels.npy")
    assert result.exit_code == 0, result.output
    assert f"{len(foreign['flipped'])} of {N_TRAIN} training labels differ" in result.output
    record = _evaluate(out)
    for key, value in foreign["direct"].items():
        assert record[key] == pytest.approx(value, abs=1e-6), key
    noise = json.loads((out / "noise.json").read_text())
    assert noise["noisy_indices"] == foreign["flipped"]
    assert noise["noisy_labels"] == foreign["labels"][foreign["flipped"]].tolist()
    ckpt = load_checkpoint(out / "checkpoints/epoch_001.safetensors")
    assert ckpt.config.imported and ckpt.config.train_labels == "train_labels.npy"
    for k, v in foreign["state"].items():
        assert torch.equal(ckpt.model_state[k], v), k
    (out / "train_labels.npy").rename(tmp_path / "moved.npy")
    assert_one_line_error(run_cli("evaluate", "--ckpt", out / "checkpoints/epoch_001.safetensors"),
                          "train_labels.npy is missing")


def test_safetensors_with_csv_labels(foreign, tmp_path):
    state = {k: v for k, v in foreign["state"].items() if not k.endswith("num_batches_tracked")}
    save_file(state, tmp_path / "model.safetensors")  # as older torch versions save BatchNorm
    order = np.random.default_rng(0).permutation(N_TRAIN)  # rows in any order
    rows = ["index,label"] + [f"{i},{foreign['labels'][i]}" for i in order]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    result, out = _import(foreign, tmp_path, tmp_path / "model.safetensors", "--train-labels",
                          tmp_path / "labels.csv")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "noise.json").read_text())["noisy_indices"] == foreign["flipped"]
    assert _evaluate(out)["noisy_acc"] == pytest.approx(foreign["direct"]["noisy_acc"], abs=1e-6)


def test_analyses_of_an_imported_run(foreign, tmp_path):
    """grads and localize run on an imported run; rewind and retrain, which need a training
    history, say so in one line."""
    torch.save(foreign["state"], tmp_path / "model.pt")
    result, out = _import(foreign, tmp_path, tmp_path / "model.pt", "--train-labels",
                          foreign["root"] / "labels.npy")
    assert result.exit_code == 0, result.output
    result = run_cli("grads", "--run", out, "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    per_example = (out / "grads/per_example_epoch_001.csv").read_text().splitlines()
    assert len(per_example) == N_TRAIN + 1
    result = run_cli("localize", "--ckpt", out / "checkpoints/epoch_001.safetensors",
                     "--limit", "2", "--max-channels", "3", "--ref-batch", "64", "--no-progress",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "localize.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == foreign["flipped"][:2] and all(r["noisy"] for r in rows)
    result = run_cli("scores", "--run", out, "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert "grad_" in header and "channels_to_flip" in header
    result = run_cli("report", "--run", out)
    assert result.exit_code == 0, result.output
    page = (out / "report/index.html").read_text()
    assert (f"Weights imported (trained outside memkern), so no training history; "
            f"{len(foreign['flipped'])} of {N_TRAIN} training labels differ") in page
    assert "Missing: accuracies: memkern evaluate" in page
    assert run_cli("evaluate", "--run", out, "--device", "cpu").exit_code == 0
    assert run_cli("report", "--run", out).exit_code == 0
    assert "accuracy of the imported weights" in (out / "report/index.html").read_text()
    for command in ("rewind", "retrain"):
        assert_one_line_error(run_cli(command, "--run", out, "--no-progress"), command,
                              "imported")
    assert_one_line_error(run_cli("train", "--out", out, "--resume", "--no-progress"),
                          "resuming training", "imported")


def test_without_train_labels_the_split_analyses_say_so(foreign, tmp_path):
    torch.save(foreign["state"], tmp_path / "model.pt")
    result, out = _import(foreign, tmp_path, tmp_path / "model.pt")
    assert result.exit_code == 0, result.output
    assert "no --train-labels" in result.output
    record = _evaluate(out)  # no noisy set: its accuracy is undefined (NaN on stdout)
    assert math.isnan(record["noisy_acc"])
    assert record["test_acc"] == pytest.approx(foreign["direct"]["test_acc"], abs=1e-6)
    ckpt = out / "checkpoints/epoch_001.safetensors"
    for examples in ("noisy", "clean"):
        assert_one_line_error(run_cli("localize", "--ckpt", ckpt, "--examples", examples,
                                      "--no-progress"), "--train-labels")
    assert_one_line_error(run_cli("scores", "--run", out, "--benchmark", "--no-progress"),
                          "--train-labels")
    (tmp_path / "some.txt").write_text("3 5")
    result = run_cli("localize", "--ckpt", ckpt, "--examples", tmp_path / "some.txt",
                     "--max-channels", "2", "--ref-batch", "32", "--no-progress")
    assert result.exit_code == 0, result.output


def _pickled_code(path, marker):
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weight": Payload()}, path)


@pytest.mark.parametrize("case,fragments", [
    ("other architecture", ["does not fit", "missing", "unexpected"]),
    ("other shape", ["does not fit", "head.weight [7, 256] vs [10, 256]"]),
    ("pickled code", ["never unpickles"]),
    ("not a state dict", ["not a tensor"]),
    ("garbage", ["not a readable torch file"]),
    ("labels too short", ["239 labels", "240 examples"]),
    ("label out of range", ["label 10", "index 0"]),
    ("out exists", ["already exists"]),
])
def test_bad_import_is_one_line(foreign, tmp_path, case, fragments):
    weights, labels = tmp_path / "w.pt", foreign["root"] / "labels.npy"
    marker = tmp_path / "code-ran"
    state = foreign["state"]
    if case == "other architecture":
        state = build_model("mlp", num_classes=10, in_channels=1, image_size=8).state_dict()
    elif case == "other shape":
        state = build_model("cnn", num_classes=7, in_channels=1, image_size=8).state_dict()
    torch.save(state, weights)
    if case == "pickled code":
        _pickled_code(weights, marker)
    elif case == "not a state dict":
        torch.save({"conv": {"weight": 3}}, weights)
    elif case == "garbage":
        weights.write_bytes(b"\x00not a torch file")
    elif case.startswith("label"):
        bad = foreign["labels"].copy()
        bad = bad[:-1] if case == "labels too short" else np.where(np.arange(N_TRAIN) == 0, 10, bad)
        labels = tmp_path / "labels.npy"
        np.save(labels, bad)
    elif case == "out exists":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "mine.txt").write_text("keep")
    result, out = _import(foreign, tmp_path, weights, "--train-labels", labels)
    assert_one_line_error(result, *fragments)
    assert not marker.exists(), "loading weights must never run code from them"
    assert (out / "mine.txt").read_text() == "keep" if case == "out exists" else not out.exists()
    assert not list(tmp_path.glob(".run.importing-*")), "no staging folder left behind"
