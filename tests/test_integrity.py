"""A run is one consistent, verified whole: every output owned, files checked against each
other and against the run manifest, nothing of the user's changed or deleted, no leftovers,
messages that name the real cause. One regression test per case of the hostile-user report."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot

import memkern.rundir.atomic
import memkern.rundir.locks
from memkern.errors import RunDirError
from memkern.rundir.manifest import MANIFEST, file_digest, verify
from memkern.rundir.paths import RunDir
from memkern.training.checkpoints import load_checkpoint

LOCALIZE = ["--examples", "all", "--limit", "4", "--ref-batch", "16", "--max-channels", "5",
            "--no-progress", "--device", "cpu"]
ROOT = os.geteuid() == 0  # root writes through any permission: read-only cases cannot fail


def ckpt(run, epoch=3):
    return RunDir(run).checkpoint_path(epoch)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def legacy(run):
    """The run as memkern wrote runs before the manifest."""
    (run / MANIFEST).unlink()
    return run


# ------------------------------------------------------------ 1. every output owned


@pytest.mark.parametrize("name,command", [
    ("evaluate_003_own.json", lambda r: ["evaluate", "--ckpt", ckpt(r), "--device", "cpu"]),
    ("report/index.html", lambda r: ["report", "--run", r]),
    ("grads/cosine.png", lambda r: ["grads", "--run", r, "--epochs", "3", "--no-progress",
                                    "--device", "cpu"]),
    ("rewind.png", lambda r: ["rewind", "--run", r, "--epochs", "0", "--no-progress",
                              "--device", "cpu"]),
    ("retrain.png", lambda r: ["retrain", "--run", r, "--epochs", "1", "--groups", "head",
                               "--no-progress", "--device", "cpu"]),
    ("scores.csv", lambda r: ["scores", "--run", r, "--no-progress", "--device", "cpu"]),
    ("localize.summary.json", lambda r: ["localize", "--run", r, *LOCALIZE]),
    ("localize.png", lambda r: ["localize", "--run", r, *LOCALIZE]),
])
def test_a_users_file_at_an_output_path_is_refused_untouched(run, name, command):
    user = run / name
    user.parent.mkdir(exist_ok=True)
    user.write_bytes(b"\x89PNG\r\n\x1a\nmy own figure" if name.endswith(".png") else
                     b"<html>my notes</html>" if name.endswith(".html") else b"my notes\n")
    before = snapshot(run)
    assert_one_line_error(run_cli(*command(run)), str(user), "untouched")
    assert_unchanged(before, run)
    for written in ("rewind.csv", "retrain.csv", "localize.jsonl", "grads/summary.csv"):
        assert not (run / written).exists(), f"{written} written before the refusal"


def test_memkerns_own_outputs_are_replaced(run):
    for _ in range(2):  # the second run replaces the figures and the page the first wrote
        assert run_cli("rewind", "--run", run, "--epochs", "0", "--no-progress",
                       "--device", "cpu").exit_code == 0
        assert run_cli("report", "--run", run).exit_code == 0
    assert b"tEXtSoftware\x00memkern" in (run / "rewind.png").read_bytes()[:4096]


def test_localize_names_its_summary_after_its_output(run, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "localize_summary.json").write_text("my summary")
    (notes / "localize.png").write_text("my figure")
    before = snapshot(notes)
    result = run_cli("localize", "--ckpt", ckpt(run), "--out", notes / "x.jsonl", *LOCALIZE)
    assert result.exit_code == 0, result.output
    assert_unchanged(before, notes)
    summary = json.loads((notes / "x.summary.json").read_text())
    assert summary["examples"] == 4 and (notes / "x.png").stat().st_size > 1000
    assert str(notes / "x.summary.json") in result.output


def test_the_runs_summary_changes_only_with_the_runs_output(run):
    assert run_cli("localize", "--run", run, *LOCALIZE).exit_code == 0
    before = snapshot(run)
    out = run / "clean.jsonl"
    assert run_cli("localize", "--run", run, "--out", out, "--examples", "clean", "--limit", "2",
                   *LOCALIZE[4:]).exit_code == 0
    assert_unchanged(before, run)  # localize.summary.json and localize.png as they were
    assert (run / "clean.summary.json").is_file()
    page = run_cli("report", "--run", run)
    assert page.exit_code == 0, page.output
    own = json.loads((run / "localize.summary.json").read_text())
    assert own["groups"]["noisy"]["count"] == 2  # the run's own 4 examples: 2 noisy, 2 clean


def test_a_legacy_runs_unmarked_figures_are_still_its_own(run):
    assert run_cli("rewind", "--run", run, "--epochs", "0", "--no-progress",
                   "--device", "cpu").exit_code == 0
    png = (run / "rewind.png").read_bytes()
    (run / "rewind.png").write_bytes(png.replace(b"Software\x00memkern", b"Software\x00Matplotlib"))
    assert_one_line_error(run_cli("rewind", "--run", run, "--epochs", "1", "--no-progress",
                                  "--device", "cpu"), "rewind.png", "no memkern mark")
    legacy(run)
    result = run_cli("rewind", "--run", run, "--epochs", "1", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------ 2. temporaries carry a mark


def test_the_cleaner_removes_only_memkerns_temporaries(run, tmp_path):
    pid = dead_pid()
    users = [run / f".thesis.tex.{pid}.bak.tmp", run / f".budget.xlsx.{pid}.sav.tmp",
             run / f".memkern-tmp.{pid}.notmine"]
    for p in users:
        p.write_text("user data")
    ours = run / f".memkern-tmp.{pid}.ab_12xyz.evaluate_003_own.json"
    ours.write_text("{")
    assert run_cli("evaluate", "--ckpt", ckpt(run), "--device", "cpu").exit_code == 0
    assert all(p.read_text() == "user data" for p in users)
    assert not ours.exists()


# ------------------------------------------------------------ 3. the run manifest


def test_the_manifest_records_every_file_the_run_is_rebuilt_from(run):
    files = json.loads((run / MANIFEST).read_text())["files"]
    expected = {"config.json", "noise.json",
                *(f"checkpoints/epoch_{e:03d}.safetensors" for e in range(4))}
    assert set(files) == expected
    for rel, digests in files.items():
        assert digests == [file_digest(run / rel)]


@pytest.mark.parametrize("command", ["grads", "rewind", "evaluate", "localize", "resume"])
def test_config_json_edited_to_another_seed_is_refused(run, command):
    edit_json(run / "config.json", lambda c: c.update(seed=5))
    args = {"grads": ["grads", "--run", run, "--epochs", "3", "--no-progress", "--device", "cpu"],
            "rewind": ["rewind", "--run", run, "--epochs", "0", "--no-progress"],
            "evaluate": ["evaluate", "--run", run, "--device", "cpu"],
            "localize": ["localize", "--run", run, *LOCALIZE],
            "resume": ["train", "--out", run, "--resume", "--epochs", "4", "--no-progress"]}
    before = snapshot(run)
    assert_one_line_error(run_cli(*args[command]), "config.json")
    assert_unchanged(before, run)


def test_config_and_checkpoint_disagreeing_is_refused_without_a_manifest(run):
    legacy(run)
    edit_json(run / "config.json", lambda c: c.update(seed=5))
    assert_one_line_error(run_cli("rewind", "--run", run, "--epochs", "0", "--no-progress"),
                          "config.json", "epoch_003.safetensors", "seed: 5 vs 0")
    edit_json(run / "config.json", lambda c: c.update(seed=0, epochs=10**30))
    assert_one_line_error(run_cli("train", "--out", run, "--resume", "--no-progress"),
                          "config.json", "epochs")


def test_zeroed_tensor_bytes_are_refused(run):
    path = ckpt(run)
    raw = bytearray(path.read_bytes())
    raw[-20_000:-1000] = bytes(19_000)  # inside the tensor data: the header still parses
    path.write_bytes(bytes(raw))
    assert_one_line_error(run_cli("evaluate", "--ckpt", path, "--device", "cpu"),
                          str(path), "manifest.json")
    assert not list(run.glob("evaluate_*"))


@pytest.mark.parametrize("manifest", [True, False])
def test_a_checkpoint_under_another_epochs_name_is_refused(run, manifest):
    if not manifest:
        legacy(run)
    shutil.copy(ckpt(run, 1), ckpt(run, 3))
    assert_one_line_error(run_cli("evaluate", "--ckpt", ckpt(run, 3), "--device", "cpu"),
                          "epoch_003.safetensors")
    assert not list(run.glob("evaluate_*"))


def test_a_checkpoint_not_in_the_manifest_is_refused(run):
    placed = run / "checkpoints" / "best.safetensors"
    shutil.copy(ckpt(run, 3), placed)
    assert_one_line_error(run_cli("evaluate", "--ckpt", placed, "--device", "cpu"),
                          str(placed), "not in")


def test_verifying_a_checkpoint_costs_little(run):
    """The figure for a 50-epoch resnet9 run is in bench/README.md; here: a bound on digits."""
    path = ckpt(run)
    started = time.perf_counter()
    for _ in range(10):
        verify(path)
    assert (time.perf_counter() - started) / 10 < 0.5


def test_noise_json_cut_is_refused(run):
    edit_json(run / "noise.json", lambda n: [n.update({k: n[k][:10]}) for k in
                                             ("noisy_indices", "original_labels", "noisy_labels")])
    assert_one_line_error(run_cli("report", "--run", run), "noise.json")
    legacy(run)
    assert_one_line_error(run_cli("rewind", "--run", run, "--epochs", "0", "--no-progress"),
                          "noise.json", "lists 10 noisy")


@pytest.mark.parametrize("edit", ["reversed", "huge", "string", "duplicate"])
def test_noise_json_with_bad_indices_is_refused(run, edit):
    legacy(run)

    def change(n):
        i = n["noisy_indices"]
        n["noisy_indices"] = {"reversed": i[::-1], "huge": i[:-1] + [10**30],
                              "string": ["1"] + i[1:], "duplicate": [i[0]] + i[:-1]}[edit]
    edit_json(run / "noise.json", change)
    assert_one_line_error(run_cli("report", "--run", run), "noise.json")
    assert_one_line_error(run_cli("grads", "--run", run, "--epochs", "1", "--no-progress"),
                          "noise.json")


# ------------------------------------------------------------ 4. outputs validated when read


@pytest.mark.parametrize("edit", ["delete", "duplicate", "reorder", "minus five", "huge"])
def test_edited_metrics_are_refused(run, edit):
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    if edit == "delete":
        lines = lines[:1] + lines[2:]
    elif edit == "duplicate":
        lines = lines + lines[-1:]
    elif edit == "reorder":
        lines = lines[::-1]
    else:
        row = json.loads(lines[0])
        row["clean_acc"] = -5 if edit == "minus five" else 1e308
        lines[0] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(run_cli("report", "--run", run), "metrics.jsonl")


def test_resume_that_finds_a_gap_refuses_with_the_fix(run):
    path = run / "metrics.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")  # epochs 2 and 3 deleted
    before = snapshot(run)
    assert_one_line_error(run_cli("train", "--out", run, "--resume", "--epochs", "3",
                                  "--no-progress"), "metrics.jsonl", "epochs 1..1", "restore the file")
    assert_unchanged(before, run)


def test_a_duplicated_localize_line_is_refused(run):
    assert run_cli("localize", "--run", run, *LOCALIZE).exit_code == 0
    out = run / "localize.jsonl"
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines + lines[:1]) + "\n")
    assert_one_line_error(run_cli("localize", "--run", run, *LOCALIZE), "localize.jsonl",
                          "second time")
    assert_one_line_error(run_cli("scores", "--run", run, "--no-progress"), "localize.jsonl")


@pytest.mark.parametrize("value", ["nan", "7.5", "-0.1", "inf"])
def test_impossible_accuracies_in_rewind_csv_are_refused(run, value):
    assert run_cli("rewind", "--run", run, "--epochs", "0", "--no-progress").exit_code == 0
    path = run / "rewind.csv"
    lines = path.read_text().splitlines()
    cells = lines[1].split(",")
    cells[2] = value  # clean_acc
    lines[1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(run_cli("report", "--run", run), "rewind.csv", "line 2")


def test_per_example_index_out_of_range_is_refused(run):
    assert run_cli("grads", "--run", run, "--epochs", "1", "--no-progress").exit_code == 0
    path = run / "grads" / "per_example_epoch_001.csv"
    lines = path.read_text().splitlines()
    lines[1] = "99999" + lines[1][lines[1].index(","):]
    path.write_text("\n".join(lines) + "\n")
    assert_one_line_error(run_cli("scores", "--run", run, "--no-progress"),
                          "per_example_epoch_001.csv")


# ------------------------------------------------------------ 5. silent wrong results


def test_retrain_that_diverges_is_refused_not_recorded(run):
    result = run_cli("retrain", "--run", run, "--epochs", "1", "--groups", "head", "--lr", "1e6",
                     "--no-progress")
    assert_one_line_error(result, "retraining head diverged", "smaller --lr")
    assert not [r for r in (run / "retrain.csv").read_text().splitlines()[1:]]


def test_resume_must_keep_tracking_gradients(tmp_path):
    out = tmp_path / "tracked"
    args = ["train", "--out", out, "--model", "mlp", "--epochs", "1", "--lr-schedule",
            "constant", "--warmup", "0", "--no-progress"]
    assert run_cli(*args, "--track-grads").exit_code == 0
    before = snapshot(out)
    assert_one_line_error(run_cli("train", "--out", out, "--resume", "--epochs", "2",
                                  "--no-progress"), "--track-grads")
    assert_unchanged(before, out)
    result = run_cli("train", "--out", out, "--resume", "--epochs", "2", "--track-grads",
                     "--no-progress")
    assert result.exit_code == 0, result.output
    live = (out / "grads/live.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["epoch"] for line in live}) == [1, 2]


@pytest.mark.parametrize("args,fragment", [
    (["--sites", "conv1"], "--tied-dropout"),
    (["--p-mem", "0.3"], "--p-mem"),
])
def test_options_that_do_nothing_are_refused(tmp_path, args, fragment):
    out = tmp_path / "r"
    assert_one_line_error(run_cli("train", "--out", out, "--epochs", "1", "--no-progress",
                                  *args), fragment)
    assert not out.exists()


def test_localize_noisy_on_a_run_without_noise_is_refused(tmp_path):
    out = tmp_path / "clean"
    assert run_cli("train", "--out", out, "--model", "mlp", "--epochs", "1", "--noise", "0",
                   "--no-progress").exit_code == 0
    before = snapshot(out)
    assert_one_line_error(run_cli("localize", "--run", out, "--examples", "noisy",
                                  *LOCALIZE[4:]), "no noisy examples")
    assert_unchanged(before, out)
    assert not (out / "localize.jsonl").exists()


# ------------------------------------------------------------ 6. no leftovers


def test_a_killed_imports_staging_folder_is_removed_by_the_next(tmp_path):
    from memkern.rundir.staging import remove_dead_staging

    out = tmp_path / "imported"
    dead = tmp_path / f".imported.importing-{dead_pid()}-0123abcd"
    live = tmp_path / f".imported.importing-{os.getpid()}-0123abcd"
    user = tmp_path / ".imported.importing-notes"
    for p in (dead, live, user):
        p.mkdir()
        (p / "x").write_text("x")
    remove_dead_staging(out)
    assert not dead.exists() and live.exists() and user.exists()


def test_stale_locks_are_removed_on_the_next_start(run):
    stale = run / ".localize.jsonl.lock"
    stale.write_text(f"{dead_pid()}\n")
    user = run / ".my.lock"
    user.write_text("my own lock file with words")
    assert run_cli("report", "--run", run).exit_code == 0
    assert not stale.exists() and user.read_text().startswith("my own")


def test_a_lock_whose_pid_cannot_be_written_is_removed(run, monkeypatch):
    real = os.write

    def full(fd, data):
        if data.strip().isdigit():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    monkeypatch.setattr(memkern.rundir.locks.os, "write", full)
    assert_one_line_error(run_cli("report", "--run", run), os.strerror(errno.ENOSPC))
    assert not list(run.glob(".*.lock"))


def test_grads_leaves_no_empty_folder_on_failure(run, monkeypatch):
    def full(*_a, **_kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(memkern.rundir.atomic.os, "replace", full)
    result = run_cli("grads", "--run", run, "--epochs", "1", "--no-progress")
    assert_one_line_error(result, "No space left", str(run / "grads"))
    assert not (run / "grads").exists()


# ------------------------------------------------------------ 7. messages name the real cause


def test_a_checkpoint_path_that_is_not_a_file_says_so(run, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    folder = tmp_path / "epoch_005.safetensors"
    folder.mkdir()
    for path, kind in (("/dev/null", "not a regular file (a character device)"),
                       (fifo, "not a regular file (a named pipe)"), (folder, "is a directory")):
        assert_one_line_error(run_cli("evaluate", "--ckpt", path, "--device", "cpu"),
                              str(path), kind)


def test_a_full_disk_names_the_path(run, monkeypatch):
    def full(*_a, **_kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real = memkern.rundir.atomic.os.fsync
    monkeypatch.setattr(memkern.rundir.atomic.os, "fsync", full)
    assert_one_line_error(run_cli("evaluate", "--ckpt", ckpt(run), "--device", "cpu"),
                          str(run / "evaluate_003_own.json"), "disk is full")
    monkeypatch.setattr(memkern.rundir.atomic.os, "fsync", real)


def test_empty_option_values_are_quoted(run, tmp_path, monkeypatch):
    assert_one_line_error(run_cli("localize", "--run", run, "--examples", "", *LOCALIZE[2:]),
                          "--examples ''")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli("demo", "--out", "", "--no-progress"), "--out", "empty ('')")
    assert list(tmp_path.iterdir()) == [run]


@pytest.mark.parametrize("option,value", [("--in-channels", "0"), ("--image-size", "-3"),
                                          ("--num-classes", "1")])
def test_sites_validates_sizes(option, value):
    assert_one_line_error(run_cli("sites", "--model", "cnn", option, value), option)


def test_train_refuses_a_non_utf8_out(tmp_path):
    out = tmp_path / os.fsdecode(b"run\xff")
    assert_one_line_error(run_cli("train", "--out", out, "--epochs", "1", "--no-progress"),
                          "UTF-8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(ROOT, reason="root writes through read-only permissions")
@pytest.mark.parametrize("target", ["localize.jsonl", "grads"])
def test_read_only_outputs_are_named_before_work(run, target):
    if target == "localize.jsonl":
        assert run_cli("localize", "--run", run, *LOCALIZE[:3], "2", *LOCALIZE[4:]).exit_code == 0
        args = ["localize", "--run", run, *LOCALIZE]
    else:
        (run / "grads").mkdir()
        args = ["grads", "--run", run, "--no-progress"]
    os.chmod(run / target, 0o444 if target.endswith("jsonl") else 0o555)
    try:
        started = time.perf_counter()
        assert_one_line_error(run_cli(*args), target, "read-only")
        assert time.perf_counter() - started < 10
    finally:
        os.chmod(run / target, 0o644 if target.endswith("jsonl") else 0o755)


def test_verify_names_a_missing_entry_and_a_changed_digest(run):
    with pytest.raises(RunDirError, match="not the file memkern wrote"):
        (run / "noise.json").write_text((run / "noise.json").read_text() + " ")
        verify(run / "noise.json")
    assert load_checkpoint(ckpt(run)).epoch == 3
