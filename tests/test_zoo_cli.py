"""Models by spec from the command line: a user's factory through train, grads, rewind,
retrain and localize; torchvision/timm sites; bad specs get one line and exit 2."""
import json

import pytest
from click.testing import CliRunner

from cli_checks import assert_one_line_error, run_cli
from memkern.cli.main import main
from zoo_checks import needs_zoo

SPEC = "zoo_models:tiny_net?width=6"


def test_user_factory_through_every_command(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--model", SPEC, "--dataset", "digits", "--epochs", "2",
                     "--out", run, "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["model"] == SPEC
    for args in (["grads", "--run", run, "--epochs", "2"],
                 ["rewind", "--run", run, "--epochs", "0"],
                 ["retrain", "--run", run, "--groups", "fc2", "--epochs", "1"],
                 ["localize", "--ckpt", run / "checkpoints" / "epoch_002.safetensors",
                  "--examples", "noisy", "--limit", "2", "--max-channels", "3"]):
        result = run_cli(*args, "--no-progress")  # the run's spec is code: refused unless trusted
        assert result.exit_code == 2 and "--trust-model-code" in result.output, result.output
        result = run_cli(*args, "--no-progress", "--trust-model-code")
        assert result.exit_code == 0, (args[0], result.output)
    header = (run / "grads" / "per_example_epoch_002.csv").read_text().splitlines()[0]
    assert header.split(",")[3:] == ["conv", "bn", "fc1", "fc2", "total"]
    assert {line.split(",")[0] for line in (run / "rewind.csv").read_text().splitlines()[2:]} \
        == {"conv", "bn", "fc1", "fc2"}
    rows = [json.loads(line) for line in (run / "localize.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(set(s for s, _ in r["channels"]) <= {"conv", "fc1", "fc2:in"}
                                  for r in rows if "channels" in r), rows


def test_sites_of_a_user_factory_say_what_has_no_site():
    result = CliRunner().invoke(main, ["sites", "--model", SPEC])
    assert result.exit_code == 0, result.output
    assert "fc2:in" in result.output and "post-activation" in result.output
    assert "no site: relu output" in result.output  # read by flatten, not by one module


@needs_zoo
def test_sites_of_torchvision_and_timm_models():
    result = CliRunner().invoke(main, ["sites", "--model", "torchvision:resnet18",
                                       "--in-channels", "3", "--image-size", "16"])
    assert result.exit_code == 0, result.output
    assert "*" in result.output.split("layer4.1 ")[0].splitlines()[-1]  # default dropout site
    assert "layer1.0.conv2:in" in result.output and "layer4" in result.output
    result = CliRunner().invoke(main, ["sites", "--model",
                                       "timm:vit_tiny_patch16_224?img_size=8&patch_size=2",
                                       "--image-size", "8"])
    assert result.exit_code == 0, result.output
    assert "blocks.11.mlp.act" in result.output and "channels last" in result.output


@pytest.mark.parametrize("spec,fragment", [
    ("no_such_package_xyz.models:build", "cannot import 'no_such_package_xyz.models'"),
    ("zoo_models:missing", "has no callable 'missing'"),
    ("zoo_models:not_a_model", "built a str, not an nn.Module"),
    ("zoo_models:tiny_net?width", "is not key=value"),
    ("zoo_models:tiny_net?depth=2", "unexpected keyword argument 'depth'"),
    ("cnnx", "neither one of"),
    pytest.param("torchvision:no_such_net", "cannot build model", marks=needs_zoo),
    pytest.param("timm:vit_tiny_patch16_224", "failed on an example input", marks=needs_zoo),
])
def test_bad_spec_is_one_line(tmp_path, spec, fragment):
    if spec.startswith(("torchvision", "timm")):
        from memkern.network.models.zoo import import_torchvision
        import_torchvision()  # its one-time warning goes to this test's setup, not the command
    result = run_cli("train", "--model", spec, "--out", tmp_path / "run")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_spec_keywords_are_literals_and_group_depth_is_memkerns():
    from memkern.network.models.zoo import parse_spec

    spec = parse_spec("timm:vit_tiny_patch16_224?img_size=32&patch_size=4&group_depth=2"
                      "&act_layer=gelu&qkv_bias=False&drop_rate=0.1")
    assert (spec.source, spec.name, spec.group_depth) == ("timm", "vit_tiny_patch16_224", 2)
    assert spec.kwargs == {"img_size": 32, "patch_size": 4, "act_layer": "gelu",
                           "qkv_bias": False, "drop_rate": 0.1}


@needs_zoo
def test_group_depth_from_the_spec():
    from memkern.network.models import build_model, layer_groups

    model = build_model("torchvision:resnet18?group_depth=2", num_classes=10, in_channels=3,
                        image_size=16)
    assert [g.name for g in layer_groups(model)] == [
        "conv1", "bn1", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "fc"]


@needs_zoo
def test_timm_vit_trained_elsewhere_imports_and_localizes(tmp_path):
    """A timm ViT built and trained by plain timm/torch (no memkern) on digits with flipped
    labels: imported by spec, evaluated as it was directly, its noisy examples localized."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from memkern.network.models.zoo import import_torchvision

    import_torchvision()  # on this machine torchvision (imported by timm) needs the workaround
    import timm

    n_train, n_test = 200, 50
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    np.savez(tmp_path / "digits.npz", x_train=images[:n_train], y_train=labels[:n_train],
             x_test=images[n_train:n_train + n_test], y_test=labels[n_train:n_train + n_test])
    rng = np.random.default_rng(5)
    flipped = np.sort(rng.choice(n_train, 20, replace=False))
    train_labels = labels[:n_train].copy()
    train_labels[flipped] = (train_labels[flipped] + rng.integers(1, 10, 20)) % 10
    np.save(tmp_path / "labels.npy", train_labels)
    x = torch.tensor(images[:n_train + n_test], dtype=torch.float32)[:, None]
    x = (x - x[:n_train].mean()) / x[:n_train].std()
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=8,
                            patch_size=2, depth=2)
    opt = torch.optim.Adam(vit.parameters(), lr=1e-3)
    for _ in range(6):
        for idx in torch.randperm(n_train).split(25):
            opt.zero_grad()
            F.cross_entropy(vit(x[idx]), torch.tensor(train_labels)[idx]).backward()
            opt.step()
    vit.eval()
    with torch.no_grad():
        pred = vit(x).argmax(1).numpy()
    noisy = np.isin(np.arange(n_train), flipped)
    hits = pred[:n_train] == train_labels
    torch.save(vit.state_dict(), tmp_path / "vit.pt")

    spec = "timm:vit_tiny_patch16_224?img_size=8&patch_size=2&depth=2"
    run = tmp_path / "run"
    result = run_cli("import", "--weights", tmp_path / "vit.pt", "--model", spec, "--dataset",
                     f"npz:{tmp_path / 'digits.npz'}", "--train-labels",
                     tmp_path / "labels.npy", "--out", run)
    assert result.exit_code == 0, result.output
    result = run_cli("evaluate", "--run", run, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["clean_acc"] == pytest.approx(hits[~noisy].mean(), abs=1e-6)
    assert record["noisy_acc"] == pytest.approx(hits[noisy].mean(), abs=1e-6)
    assert record["test_acc"] == pytest.approx(
        (pred[n_train:] == labels[n_train:n_train + n_test]).mean(), abs=1e-6)
    result = run_cli("localize", "--run", run, "--examples", "all", "--limit", "4",
                     "--max-channels", "5", "--sites", "blocks.0.mlp.act,blocks.1.mlp.act",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run / "localize.jsonl").read_text().splitlines()]
    assert len(rows) == 4
