from click.testing import CliRunner

from memkern.cli.main import main
from memkern.config import TrainConfig
from memkern.train import train


def test_every_command_help_has_an_example():
    runner = CliRunner()
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, name


def test_sites_lists_resnet9_sites_and_groups():
    result = CliRunner().invoke(main, ["sites", "--model", "resnet9", "--in-channels", "3",
                                       "--image-size", "32"])
    assert result.exit_code == 0
    assert "res1.body.0.pre" in result.output and "pre-norm" in result.output
    assert "conv4" in result.output and "head" in result.output


def test_env_reports_torch_and_kernel_path():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0 and "torch" in result.output and "kernel path" in result.output


def test_report_writes_curves_and_index(tmp_path):
    run = train(TrainConfig(model="mlp", epochs=2), out=tmp_path / "run", progress=False)
    result = CliRunner().invoke(main, ["report", "--run", str(run.root)])
    assert result.exit_code == 0, result.output
    index = (run.root / "report" / "index.md").read_text()
    assert "training.png" in index and "noisy_acc" in index
    png = (run.root / "report" / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
