import base64
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, run_cli
from click.testing import CliRunner

from memkern.cli.main import main
from memkern.training.config import TrainConfig
from memkern.training.train import train


def test_every_command_help_has_an_example():
    import shlex

    runner = CliRunner()
    for name in main.list_commands(None):
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, name
        # every example line pastes into a shell as written: ? & ; | only inside quotes
        for line in result.output.split("Example:")[1].split("Options:")[0].splitlines():
            for word in shlex.split(line.replace("\\", "")):
                if any(c in word for c in "?&;|*"):
                    assert f"'{word}'" in line or f'"{word}"' in line, line


def test_the_command_list_matches_each_commands_own_help():
    """`memkern --help` lists the commands without importing them (memkern.cli.main.COMMANDS):
    its texts are the commands' own, and listing them loads no torch."""
    from memkern.cli.main import COMMANDS

    for name, (_, short) in COMMANDS.items():
        assert main.get_command(None, name).get_short_help_str(limit=1000) == short, name
    probe = ("import sys; from click.testing import CliRunner; from memkern.cli.main import "
             "main; r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output;"
             " print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_sites_lists_resnet9_sites_and_groups():
    result = CliRunner().invoke(main, ["sites", "--model", "resnet9", "--in-channels", "3",
                                       "--image-size", "32"])
    assert result.exit_code == 0
    assert "res1.body.0.pre" in result.output and "pre-norm" in result.output
    assert "conv4" in result.output and "head" in result.output


def test_sites_of_a_run_lists_its_own_model(tiny_run):
    result = run_cli("sites", "--run", tiny_run)
    assert result.exit_code == 0, result.output
    assert "channel sites of mlp" in result.output and "hidden1.pre" in result.output
    assert "hidden2" in result.output and "head" in result.output
    assert_one_line_error(run_cli("sites", "--run", tiny_run, "--model", "cnn"), "drop --model")
    assert_one_line_error(run_cli("sites", "--run", tiny_run / "nothing"), "not a memkern run")


def test_a_reader_that_stops_early_is_not_an_error():
    """``memkern ... | head``: the closed pipe ends the command quietly (status 141, as SIGPIPE
    would), not with an error line."""
    memkern = Path(sys.executable).parent / "memkern"
    done = subprocess.run(f"'{memkern}' sites --model resnet9 --in-channels 3 --image-size 32 "
                          "| true; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (141, "")


def test_env_reports_torch_and_kernel_path():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0 and "torch" in result.output and "kernel path" in result.output


def test_report_writes_one_self_contained_page(tmp_path):
    run = train(TrainConfig(model="mlp", epochs=2), out=tmp_path / "run", progress=False)
    result = CliRunner().invoke(main, ["report", "--run", str(run.root)])
    assert result.exit_code == 0, result.output
    page = (run.root / "report" / "index.html").read_text()
    assert "Headline numbers" in page and "Missing: no gradient accounting" in page
    png = base64.b64decode(page.split('src="data:image/png;base64,')[1].split('"')[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="the allocator setting is for glibc")
def test_cli_keeps_freed_memory_on_glibc(monkeypatch):
    """glibc takes both thresholds, and every command sets them before it runs."""
    import memkern.cli.main as cli_main
    from memkern.cli.allocator import keep_freed_memory

    assert keep_freed_memory()
    monkeypatch.setenv("MEMKERN_KEEP_FREED_MEMORY", "0")
    assert not keep_freed_memory()
    calls = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append(1))
    result = run_cli("sites", "--model", "mlp")
    assert result.exit_code == 0, result.output
    assert calls == [1]
