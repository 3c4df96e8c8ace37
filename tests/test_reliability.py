"""Regression tests of the hostile-user report: every case that lost data, mixed runs, ended in
a traceback or left files behind now gives one line and exit 2 (or the right result)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot
from formats import random_mnist, write_mnist
from safetensors.torch import load_file
from test_data_files import cifar_batch, py2_dumps, tar_folder, write_cifar

import memkern.rundir.atomic
from memkern.training.checkpoints import load_checkpoint
from memkern.rundir.paths import RunDir

LOCALIZE = ["--examples", "all", "--limit", "4", "--ref-batch", "16", "--max-channels", "5",
            "--no-progress", "--device", "cpu"]


def ckpt_of(run, epoch=3):
    return RunDir(run).checkpoint_path(epoch)


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------ 1. ownership before writing


@pytest.mark.parametrize("content", ["my notes\nline two\n", '{"index": 1}\nnot json\n',
                                     '{"epoch": 1, "train_loss": 0.5}\n'])
def test_localize_refuses_an_output_it_did_not_write(run, content):
    notes = run / "notes.txt"
    notes.write_text(content)
    before = snapshot(run)
    assert_one_line_error(run_cli("localize", "--ckpt", ckpt_of(run), "--out", notes, *LOCALIZE),
                          str(notes), "not a localize output", "untouched")
    assert_unchanged(before, run)


def test_localize_out_on_noise_json_leaves_the_run_whole(run):
    before = snapshot(run)
    assert_one_line_error(run_cli("localize", "--ckpt", ckpt_of(run), "--out",
                                  run / "noise.json", *LOCALIZE), "noise.json")
    assert_unchanged(before, run)
    assert run_cli("report", "--run", run).exit_code == 0


def test_torn_last_line_of_a_real_output_is_recovered(run):
    out = run / "loc.jsonl"
    assert run_cli("localize", "--ckpt", ckpt_of(run), "--out", out, *LOCALIZE[:3], "2",
                   *LOCALIZE[4:]).exit_code == 0
    with open(out, "a") as f:
        f.write('{"index": 7, "chan')  # a kill in the middle of an append
    result = run_cli("localize", "--ckpt", ckpt_of(run), "--out", out, *LOCALIZE)
    assert result.exit_code == 0, result.output
    indices = [strict_json(line)["index"] for line in out.read_text().splitlines()]
    assert len(indices) == len(set(indices)) == 4


@pytest.mark.parametrize("command", ["rewind", "retrain"])
def test_table_outputs_refuse_foreign_csv(run, command):
    table = run / f"{command}.csv"
    table.write_text("name,score\nalice,3\n")
    before = snapshot(run)
    args = ["--epochs", "1"] if command == "retrain" else ["--epochs", "0"]
    assert_one_line_error(run_cli(command, "--run", run, *args, "--no-progress",
                                  "--device", "cpu"), str(table), "untouched")
    assert_unchanged(before, run)


# ------------------------------------------------------------ 3. the NaN/inf guard


@pytest.mark.parametrize("option,value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"),
                                          ("--weight-decay", "nan"), ("--p-gen", "nan"),
                                          ("--noise", "nan"), ("--warmup", "inf")])
def test_non_finite_options_refused(tmp_path, option, value):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--out", out, option, value, "--no-progress"),
                          "finite")
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("--lr", "nan"), ("--lr", "inf")])
def test_non_finite_retrain_lr_refused(run, option, value):
    before = snapshot(run)
    assert_one_line_error(run_cli("retrain", "--run", run, option, value, "--no-progress"),
                          "finite")
    assert_unchanged(before, run)


def test_diverging_training_stops_with_the_epoch_and_step(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--out", out, "--model", "mlp", "--epochs", "3", "--lr", "1e6",
                     "--no-progress")
    assert_one_line_error(result, "diverged", "epoch 1", "step", "smaller --lr")
    run = RunDir(out)
    assert run.epochs() == [0]  # the last good checkpoint: the initialization
    for epoch in run.epochs():
        assert all(torch.isfinite(t).all() for t in load_file(run.checkpoint_path(epoch)).values())
    text = run.metrics_path.read_text() if run.metrics_path.exists() else ""
    [strict_json(line) for line in text.splitlines()]


def test_non_finite_checkpoint_refused(run, tmp_path):
    """A checkpoint written by an older memkern from a diverged run is not analysed."""
    from safetensors.torch import save_file
    ckpt = load_checkpoint(ckpt_of(run))
    bad = tmp_path / "nan.safetensors"
    tensors = {f"model.{k}": v for k, v in ckpt.model_state.items()}
    tensors["model.hidden1.linear.weight"] = torch.full_like(
        tensors["model.hidden1.linear.weight"], float("nan"))
    meta = {"format": "memkern-checkpoint", "version": "1", "epoch": "3",
            "config": ckpt.config.to_json()}
    save_file(tensors, str(bad), metadata=meta)
    assert_one_line_error(run_cli("evaluate", "--ckpt", bad), "NaN or inf")


# ------------------------------------------------------------ 4. one error path


@pytest.mark.parametrize("content,fragments", [
    ("[1, 2, 3]", ["JSON object", "[1, 2, 3]"]),
    ("null", ["JSON object", "null"]),
    ("{not json", ["not valid JSON"]),
    ('{"lr": "fast"}', ["field 'lr'", "a number"]),
    ('{"epochs": 2.5}', ["field 'epochs'", "an integer"]),
    ('{"augment": "yes"}', ["field 'augment'", "true or false"]),
    ('{"dropout_sites": "block1"}', ["field 'dropout_sites'"]),
    ('{"seed": -4}', ["seed must be in"]),
    ('{"lr": 1e400}', ["lr must be a finite number"]),
    (b"\xff\xfe{}", ["not a UTF-8"]),
])
@pytest.mark.parametrize("command", ["report", "rewind", "train-resume"])
def test_bad_config_json_names_the_field(run, content, fragments, command):
    config = run / "config.json"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(run)
    args = (["train", "--out", run, "--resume", "--no-progress"] if command == "train-resume"
            else [command, "--run", run] + (["--no-progress"] if command == "rewind" else []))
    assert_one_line_error(run_cli(*args), *fragments)
    assert_unchanged(before, run)


@pytest.mark.parametrize("args,fragments", [
    (["--weight-decay", "-1"], ["weight_decay"]),
    (["--seed", str(10**20)], ["seed must be in"]),
    (["--seed", "1e20"], ["seed", "not a valid integer"]),
    (["--seed", "-1"], ["seed must be in"]),
    (["--batch-size", "0"], ["batch_size"]),
])
def test_out_of_range_train_options(tmp_path, args, fragments):
    out = tmp_path / "deep" / "run"
    assert_one_line_error(run_cli("train", "--out", out, "--no-progress", *args), *fragments)
    assert not (tmp_path / "deep").exists()


def test_localize_seed_out_of_range(run):
    before = snapshot(run)
    assert_one_line_error(run_cli("localize", "--ckpt", ckpt_of(run), *LOCALIZE, "--seed",
                                  str(2**64)), "--seed must be in")
    assert_unchanged(before, run)


def test_empty_dataset_leaves_no_run(tmp_path):
    rng = np.random.default_rng(0)
    arrays = random_mnist(rng, n_train=0, n_test=3)
    write_mnist(tmp_path / "data", arrays, gz=False)
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "data",
                                  "--out", out, "--no-progress"), "no examples")
    assert not out.exists()


def test_directory_where_an_mnist_file_should_be(tmp_path):
    rng = np.random.default_rng(1)
    write_mnist(tmp_path / "data", random_mnist(rng), gz=False)
    (tmp_path / "data" / "train-labels-idx1-ubyte").unlink()
    (tmp_path / "data" / "train-labels-idx1-ubyte").mkdir()
    assert_one_line_error(run_cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "data",
                                  "--out", tmp_path / "run", "--no-progress"), "is a directory")
    assert not (tmp_path / "run").exists()


def test_cifar_label_beyond_int64(tmp_path):
    rng = np.random.default_rng(2)
    write_cifar(tmp_path / "data", rng)
    batch = cifar_batch(rng, 4)
    batch["labels"][1] = 2**70
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(py2_dumps(batch))
    assert_one_line_error(run_cli("train", "--dataset", "cifar10", "--data-dir",
                                  tmp_path / "data", "--out", tmp_path / "run", "--no-progress"),
                          "data_batch_3", str(2**70))
    assert not (tmp_path / "run").exists()


def test_mirror_that_is_not_a_url(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--download",
                     "--out", tmp_path / "run", "--no-progress",
                     env={"MEMKERN_DATA_MIRROR": "notaurl"})
    assert_one_line_error(result, "notaurl", "MEMKERN_DATA_MIRROR")
    assert not (tmp_path / "run").exists()
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file()]


@pytest.mark.parametrize("line", ['{"train_loss": 0.1}', '{"epoch": "one"}', '[1]',
                                  '{"epoch": 1, "clean_acc": "high"}'])
def test_hand_edited_metrics_on_resume(run, line):
    metrics = RunDir(run).metrics_path
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join([rows[0], line, *rows[1:]]) + "\n")
    (RunDir(run).checkpoint_path(3)).unlink()  # something left to resume
    before = snapshot(run)
    assert_one_line_error(run_cli("train", "--out", run, "--resume", "--no-progress"),
                          "metrics.jsonl")
    assert_unchanged(before, run)
    assert_one_line_error(run_cli("report", "--run", run), "metrics.jsonl")
    assert_unchanged(before, run)


def test_report_on_a_non_utf8_path(run, tmp_path):
    odd = tmp_path / os.fsdecode(b"run-\xff")
    run.rename(odd)
    result = run_cli("report", "--run", odd)
    assert result.exit_code == 0, result.output
    index = (odd / "report" / "index.html").read_text()  # valid UTF-8
    assert "run-\\xff" in index


def test_checkpoint_on_a_non_utf8_path_is_named_as_such(run, tmp_path):
    odd = tmp_path / os.fsdecode(b"ep\xff.safetensors")
    shutil.copy(ckpt_of(run), odd)
    assert_one_line_error(run_cli("evaluate", "--ckpt", odd), "not valid UTF-8", "rename")


# Faults a user cannot cause on purpose as root (this CI runs as root, so permission bits do
# not stop writes): the OSError is raised where the file would be written.
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
@pytest.mark.parametrize("command", ["train", "rewind", "report", "localize"])
def test_write_faults_are_one_line(run, tmp_path, monkeypatch, code, command):
    def fail(*_args, **_kw):
        raise OSError(code, os.strerror(code), "injected")
    monkeypatch.setattr(memkern.rundir.atomic.os, "replace", fail)
    before = snapshot(run)
    args = {"train": ["train", "--out", tmp_path / "new", "--model", "mlp", "--epochs", "1",
                      "--no-progress"],
            "rewind": ["rewind", "--run", run, "--epochs", "0", "--no-progress"],
            "report": ["report", "--run", run],
            "localize": ["localize", "--ckpt", ckpt_of(run), *LOCALIZE]}[command]
    assert_one_line_error(run_cli(*args), os.strerror(code))
    assert_unchanged(before, run)
    leftovers = [p for p in run.rglob(".memkern-tmp.*")]
    assert not leftovers, leftovers


@pytest.mark.parametrize("target", ["parent-is-a-file", "proc"])
def test_unwritable_out_is_one_line(tmp_path, target):
    if target == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out, words = tmp_path / "file" / "run", ["Not a directory"]
    else:
        out, words = "/proc/memkern-run", ["/proc/memkern-run"]
    assert_one_line_error(run_cli("train", "--out", out, "--model", "mlp", "--no-progress"),
                          *words)
    assert (tmp_path / "file").read_text() == "x" if target != "proc" else True


# ------------------------------------------------------------ 5. validate, then write


@pytest.mark.parametrize("args,fragments", [
    (["--groups", "nosuchgroup"], ["nosuchgroup"]),
    (["--from-epoch", "7"], ["epoch 7"]),
    (["--from-epoch", "-1"], ["epoch -1"]),
])
def test_rejected_retrain_writes_nothing(run, args, fragments):
    before = snapshot(run)
    assert_one_line_error(run_cli("retrain", "--run", run, "--epochs", "1", "--no-progress",
                                  *args), *fragments)
    assert_unchanged(before, run)
    assert not (run / "retrain.csv").exists() and not (run / "retrain.json").exists()


def test_retrain_overwrite_with_typo_keeps_the_table(run):
    ok = run_cli("retrain", "--run", run, "--epochs", "1", "--groups", "head", "--no-progress")
    assert ok.exit_code == 0, ok.output
    before = snapshot(run)
    assert_one_line_error(run_cli("retrain", "--run", run, "--epochs", "1", "--groups", "haed",
                                  "--overwrite", "--no-progress"), "haed")
    assert_unchanged(before, run)


# ------------------------------------------------------------ 6. interrupted saves, file modes


KILL_IN_SAVE = """
import os, signal, sys
import memkern.rundir.atomic as atomic
real = atomic.os.replace
def replace(src, dst):
    if str(dst).endswith("epoch_002.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)  # the temporary is complete, not yet renamed
    real(src, dst)
atomic.os.replace = replace
from memkern.cli.main import main
sys.exit(main())
"""


def test_kill_during_checkpoint_save_leaves_nothing_after_resume(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--model", "mlp", "--epochs", "2", "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args], capture_output=True)
    assert killed.returncode == -9
    assert [p.name for p in (out / "checkpoints").glob(".memkern-tmp.*")], "the kill left no temporary"
    resumed = run_cli("train", "--out", out, "--resume", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert not [p for p in out.rglob("*") if p.name.startswith(".memkern-tmp.")
                or p.name.endswith(".lock")]
    assert RunDir(out).epochs() == [0, 1, 2]
    mode = 0o666 & ~_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {mode}, modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_temporaries_of_live_writers_are_kept(run):
    """Only a dead process's temporaries are removed: a live writer's are its work."""
    live = run / "checkpoints" / f".memkern-tmp.{os.getpid()}.abcd1234.epoch_009.safetensors"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    dead = run / "checkpoints" / f".memkern-tmp.{dead_pid}.abcd1234.epoch_009.safetensors"
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    assert run_cli("report", "--run", run).exit_code == 0
    assert live.exists() and not dead.exists()


# ------------------------------------------------------------ 7. archives checked


def test_flipped_byte_in_a_hand_placed_archive(tmp_path):
    """Random pixels do not compress, so gzip stores them: a flipped byte inside a batch
    extracts cleanly unless the gzip CRC is read."""
    rng = np.random.default_rng(3)
    write_cifar(tmp_path / "src", rng, n=8)
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "cifar-10-python.tar.gz"
    tar_folder(tmp_path / "src" / "cifar-10-batches-py", archive)
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    archive.write_bytes(bytes(raw))
    import tarfile
    with tarfile.open(archive, "r:gz") as tar:  # tarfile alone does not notice
        assert len([m for m in tar.getmembers() if m.isfile()]) == 6
    result = run_cli("train", "--dataset", "cifar10", "--data-dir", data, "--out",
                     tmp_path / "run", "--no-progress")
    assert_one_line_error(result, str(archive), "download it again")
    assert not (data / "cifar-10-batches-py").exists() and not (tmp_path / "run").exists()


def test_gzip_mnist_with_flipped_byte(tmp_path):
    rng = np.random.default_rng(4)
    write_mnist(tmp_path / "data", random_mnist(rng), gz=True)
    path = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF  # the stored length/CRC trailer
    path.write_bytes(bytes(raw))
    assert_one_line_error(run_cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "data",
                                  "--out", tmp_path / "run", "--no-progress"), str(path))


# ------------------------------------------------------------ 8. lines independent of the cut

# The documented bound (README, "Localization"): trace values are float32 sums over the
# reference batch and may differ in their last digits with how the work was cut; every other
# field is identical. The torchrun test (test_localize_distributed.py) holds the same bound.
TRACE_RTOL, TRACE_ATOL = 1e-5, 1e-6


def assert_same_lines(got: list[dict], want: list[dict]) -> None:
    assert sorted(r["index"] for r in got) == sorted(r["index"] for r in want)
    want_by_index = {r["index"]: r for r in want}
    for g in got:
        w = want_by_index[g["index"]]
        assert {k: v for k, v in g.items() if k != "trace"} == \
            {k: v for k, v in w.items() if k != "trace"}, g["index"]
        torch.testing.assert_close(torch.tensor(g["trace"]), torch.tensor(w["trace"]),
                                   rtol=TRACE_RTOL, atol=TRACE_ATOL)


def test_localize_lines_do_not_depend_on_chunk_or_resume(run):
    opts = ["--ckpt", ckpt_of(run), "--examples", "all", "--ref-batch", "64", "--max-channels",
            "10", "--no-progress", "--device", "cpu"]

    def lines(name, *extra):
        for args in extra:
            result = run_cli("localize", *opts, "--out", run / name, *args)
            assert result.exit_code == 0, result.output
        return [strict_json(line) for line in (run / name).read_text().splitlines()]

    want = lines("whole.jsonl", ["--limit", "16", "--chunk", "16"])
    assert_same_lines(lines("one.jsonl", ["--limit", "16", "--chunk", "1"]), want)
    assert_same_lines(lines("five.jsonl", ["--limit", "16", "--chunk", "5"]), want)
    resumed = lines("resumed.jsonl", ["--limit", "5", "--chunk", "3"],
                    ["--limit", "16", "--chunk", "4"])
    assert_same_lines(resumed, want)


# ------------------------------------------------------------ 9. messages that say what is wrong


def test_checkpoint_of_another_run_names_both_models(run, tmp_path):
    other = tmp_path / "cnn"
    assert run_cli("train", "--out", other, "--model", "cnn", "--epochs", "1",
                   "--no-progress").exit_code == 0
    shutil.copy(RunDir(other).checkpoint_path(1), RunDir(run).checkpoint_path(1))
    for command in ("rewind", "retrain"):
        result = run_cli(command, "--run", run, "--epochs", "1", "--no-progress",
                         *(["--from-epoch", "1"] if command == "retrain" else []))
        assert_one_line_error(result, "epoch_001.safetensors", "manifest.json")
    (run / "manifest.json").unlink()  # a run written before manifests: the configs disagree
    for command in ("rewind", "retrain"):
        result = run_cli(command, "--run", run, "--epochs", "1", "--no-progress",
                         *(["--from-epoch", "1"] if command == "retrain" else []))
        assert_one_line_error(result, "epoch_001.safetensors", "model: 'mlp' vs 'cnn'")


@pytest.mark.parametrize("command,hint", [("localize", "rerun the same command"),
                                          ("train", "--resume"), ("report", "half-written")])
def test_ctrl_c_advice_fits_the_command(run, monkeypatch, command, hint):
    def interrupted(*_a, **_kw):
        raise KeyboardInterrupt
    import memkern.experiments.localize
    import memkern.report.page
    import memkern.training.train
    monkeypatch.setattr({"localize": memkern.experiments.localize, "train": memkern.training.train,
                         "report": memkern.report.page}[command],
                        {"localize": "localize", "train": "train", "report": "write_report"}[command],
                        interrupted)
    args = {"localize": ["localize", "--ckpt", ckpt_of(run), *LOCALIZE],
            "train": ["train", "--out", run, "--resume", "--no-progress"],
            "report": ["report", "--run", run]}[command]
    result = run_cli(*args)
    assert result.exit_code == 130
    assert hint in result.stderr and ("--resume" in result.stderr) == (command == "train")
