"""Example-tied dropout end to end on digits (docs/method.md, Experiment 5): training, per-epoch
own/keep/drop metrics, ``memkern evaluate`` rebuilding the exact masks from a checkpoint."""
import dataclasses
import json

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from memkern.rundir.atomic import read_jsonl
from memkern.cli.main import main
from memkern.training.config import TrainConfig
from memkern.training.train import train

TIED_KEYS = {f"{split}_acc_{mode}" for split in ("clean", "noisy", "test")
             for mode in ("keep", "drop")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The "cnn-digits-tied" preset and the same run without tied dropout (10 epochs each)."""
    root = tmp_path_factory.mktemp("tied")
    tied = TrainConfig.from_name("cnn-digits-tied")
    plain = dataclasses.replace(tied, tied_dropout=False)
    return (train(tied, out=root / "tied", progress=False),
            train(plain, out=root / "plain", progress=False))


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_headline_memorized_with_own_masks_forgotten_without(runs):
    tied, plain = (read_jsonl(r.metrics_path)[-1] for r in runs)
    print({k: round(v, 4) for k, v in tied.items()}, "plain test_acc", plain["test_acc"])
    assert tied["noisy_acc"] >= 0.95
    assert tied["noisy_acc_keep"] <= 0.05 and tied["noisy_acc_drop"] <= 0.05
    assert tied["test_acc_keep"] >= plain["test_acc"]


def test_metrics_keys_only_for_tied_runs(runs):
    tied, plain = runs
    for row in read_jsonl(tied.metrics_path):
        assert TIED_KEYS <= set(row)
        assert row["test_acc"] == row["test_acc_keep"]  # test rows have no own mask: keep mode
    for row in read_jsonl(plain.metrics_path):
        assert not TIED_KEYS & set(row) and {"clean_acc", "noisy_acc", "test_acc"} <= set(row)


@pytest.mark.parametrize("epoch", [3, 10])
def test_evaluate_rebuilds_the_exact_masks(runs, epoch):
    run = runs[0]
    line = next(r for r in read_jsonl(run.metrics_path) if r["epoch"] == epoch)
    for mode, suffix in (("own", ""), ("keep", "_keep"), ("drop", "_drop")):
        result = cli("evaluate", "--ckpt", run.checkpoint_path(epoch), "--mode", mode, "--json")
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        for split in ("clean_acc", "noisy_acc", "test_acc"):
            assert record[split] == line[split + suffix], (mode, split)
        saved = json.loads(run.evaluation_path(epoch, mode).read_text())
        assert saved == record and saved["epoch"] == epoch and saved["tied_dropout"]


def test_plain_run_evaluates_own_and_refuses_keep_drop(runs):
    run = runs[1]
    result = cli("evaluate", "--ckpt", run.checkpoint_path(10))
    assert result.exit_code == 0 and "noisy_acc" in result.stdout
    line = read_jsonl(run.metrics_path)[-1]
    saved = json.loads(run.evaluation_path(10, "own").read_text())
    assert {k: saved[k] for k in ("clean_acc", "noisy_acc", "test_acc")} == {
        k: line[k] for k in ("clean_acc", "noisy_acc", "test_acc")}
    for mode in ("keep", "drop"):
        result = cli("evaluate", "--ckpt", run.checkpoint_path(10), "--mode", mode)
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and "--tied-dropout" in result.stderr
        assert not run.evaluation_path(10, mode).exists()


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    foreign = tmp_path / "foreign.safetensors"
    save_file({}, foreign)
    for path, words in ((tmp_path / "missing.safetensors", "does not exist"),
                        (garbage, "not a checkpoint"), (foreign, "not a memkern checkpoint")):
        result = cli("evaluate", "--ckpt", path)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert words in result.stderr and str(path) in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.safetensors", "garbage.safetensors"]


def test_unknown_site_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = cli("train", "--tied-dropout", "--sites", "bogus", "--epochs", "1", "--out", out,
                 "--no-progress")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "bogus" in result.stderr and "block3.post" in result.stderr
    assert not out.exists()
