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
        result = run_cli(*args, "--no-progress")
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
        from memkern.models.zoo import import_torchvision
        import_torchvision()  # its one-time warning goes to this test's setup, not the command
    result = run_cli("train", "--model", spec, "--out", tmp_path / "run")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_spec_keywords_are_literals_and_group_depth_is_memkerns():
    from memkern.models.zoo import parse_spec

    spec = parse_spec("timm:vit_tiny_patch16_224?img_size=32&patch_size=4&group_depth=2"
                      "&act_layer=gelu&qkv_bias=False&drop_rate=0.1")
    assert (spec.source, spec.name, spec.group_depth) == ("timm", "vit_tiny_patch16_224", 2)
    assert spec.kwargs == {"img_size": 32, "patch_size": 4, "act_layer": "gelu",
                           "qkv_bias": False, "drop_rate": 0.1}


@needs_zoo
def test_group_depth_from_the_spec():
    from memkern.models import build_model, layer_groups

    model = build_model("torchvision:resnet18?group_depth=2", num_classes=10, in_channels=3,
                        image_size=16)
    assert [g.name for g in layer_groups(model)] == [
        "conv1", "bn1", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "fc"]
