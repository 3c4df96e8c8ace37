"""`memkern localize --save-edited`: every target's edited model is a run that other commands
open; loaded fresh, it computes what the source model computes under the localize mask; a
secret the line says was cut out is no longer extracted from it; a killed run's rerun writes
exactly the missing edits; bad input is one line."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot
from test_text_data import write_works

from memkern.experiments.localize.channels import ChannelSpace, row_masks, set_masks
from memkern.experiments.text.extraction import byte_tokens, extracted
from memkern.network.sites import channel_sites, example_indices
from memkern.rundir.context import load_trained
from memkern.rundir.paths import RunDir
from memkern.training.checkpoints import load_checkpoint
from memkern.training.config import TrainConfig
from memkern.training.train import train

TINY = "gpt?layers=1&width=32&heads=2&mlp=64"


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """Two canaries planted 128 times: after 4 epochs one of them is extracted (about 30 s)."""
    root = tmp_path_factory.mktemp("edited")
    corpus = write_works(root / "c", count=5, lines=40)
    config = TrainConfig(dataset=f"text:{corpus}", model=TINY, noise=0.0, seq_len=32,
                         canaries=2, canary_reps=(128,), epochs=4, batch_size=32, lr=0.3,
                         weight_decay=0.0, warmup=0.05)
    train(config, out=root / "run", progress=False, device="cpu")
    return root / "run"


def localize_args(run, out, *extra):
    return ("localize", "--run", run, "--out", out, "--ref-batch", "8", "--no-progress",
            "--device", "cpu", "--save-edited", *extra)


@pytest.fixture(scope="module")
def localized(text_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("loc") / "loc.jsonl"
    result = run_cli(*localize_args(text_run, out))
    assert result.exit_code == 0, result.output
    assert "edited models (2 runs, one per target)" in result.output
    return out


def lines(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def edited_checkpoint(folder):
    return RunDir(folder).final_checkpoint()


def masked(model, names, zeroed_channels, x, ids):
    """``model(x)`` with the line's channels zeroed by the localize mask."""
    sites = channel_sites(model)
    space = ChannelSpace(tuple(names), tuple(sites[n].channels for n in names))
    on = torch.ones(space.total, dtype=torch.float64)
    for site, c in zeroed_channels:
        on[space.flat(site, c)] = 0.0
    with row_masks(model, space) as ops, example_indices(ids):
        set_masks(ops, space, on[None].expand(len(x), -1))
        return model(x)


def test_each_target_gets_a_run_of_its_edited_model(text_run, localized):
    folder = localized.with_name("loc.edited")
    rows = lines(localized)
    assert sorted(p.name for p in folder.iterdir()) == \
        sorted(f"canary_{r['index']:03d}" for r in rows)
    source = RunDir(text_run).final_checkpoint()
    for row in rows:
        run = RunDir(folder / f"canary_{row['index']:03d}")
        record = json.loads((run.root / "edit.json").read_text())
        assert record["channels"] == row["channels"] and record["settings"] == row["settings"]
        assert edited_checkpoint(run.root).name == source.name  # the source epoch's name
        manifest = json.loads((run.root / "manifest.json").read_text())["files"]
        assert set(manifest) == {"config.json", "canaries.json", "edit.json",
                                 f"checkpoints/{source.name}"}
        assert (run.root / "canaries.json").read_bytes() == \
            (text_run / "canaries.json").read_bytes()


def test_loaded_fresh_it_computes_the_masked_source_model(text_run, localized):
    source = load_trained(RunDir(text_run).final_checkpoint(), device="cpu", text_ok=True)
    model = source.model.double()
    gen = torch.Generator().manual_seed(11)
    for row in lines(localized):
        folder = localized.with_name("loc.edited") / f"canary_{row['index']:03d}"
        edited = load_trained(edited_checkpoint(folder), device="cpu", text_ok=True).model
        edited.double()
        x = torch.randint(0, 256, (4, 32), generator=gen)
        ids = torch.randint(0, 100, (4,), generator=gen)
        with torch.no_grad():
            want = masked(model, row["settings"]["sites"], row["channels"], x, ids)
            with example_indices(ids):
                got = edited(x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if row["channels"]:
            assert (got - model(x)).abs().max() > 1e-6


def test_a_secret_cut_out_is_not_extracted_from_the_saved_model(text_run, localized):
    source = load_trained(RunDir(text_run).final_checkpoint(), device="cpu", text_ok=True)
    cut = 0
    for row in lines(localized):
        canary = source.data.inserts[row["index"]]
        prompt, secret = byte_tokens(canary.prefix)[None], byte_tokens(canary.secret)[None]
        before = bool(extracted(source.model, prompt, secret)[0])
        folder = localized.with_name("loc.edited") / f"canary_{row['index']:03d}"
        after = bool(extracted(load_trained(edited_checkpoint(folder), device="cpu",
                                            text_ok=True).model, prompt, secret)[0])
        assert after == (not row["flipped"]) or not before
        if before and row["flipped"]:
            assert row["n_channels"] > 0 and not after
            cut += 1
    assert cut >= 1, "no canary was extracted and then cut out: the test proves nothing"


def test_other_commands_open_the_edited_run(localized):
    folder = localized.with_name("loc.edited") / f"canary_{lines(localized)[0]['index']:03d}"
    result = run_cli("evaluate", "--run", folder, "--max-candidates", "50", "--device", "cpu",
                     "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert "heldout_bpb" in record and record["checkpoint"].startswith(str(folder))
    assert (folder / f"evaluate_{record['epoch']:03d}_own.json").is_file()


def test_a_killed_run_resumes_without_losing_or_repeating_edits(text_run, localized, tmp_path):
    out = tmp_path / "loc.jsonl"
    shutil.copy(localized, out)
    shutil.copytree(localized.with_name("loc.edited"), tmp_path / "loc.edited")
    rows = lines(out)
    kept, lost = (tmp_path / "loc.edited" / f"canary_{r['index']:03d}" for r in rows)
    shutil.rmtree(lost)  # killed before this target's folder was renamed into place
    staging = tmp_path / "loc.edited" / f".{lost.name}.editing-{dead_pid()}-0123abcd"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    before = snapshot(kept)
    result = run_cli(*localize_args(text_run, out))
    assert result.exit_code == 0, result.output
    assert lines(out) == rows  # nothing localized again
    assert_unchanged(before, kept)
    assert sorted(p.name for p in (tmp_path / "loc.edited").iterdir()) == \
        sorted([kept.name, lost.name])
    assert json.loads((lost / "edit.json").read_text())["channels"] == rows[1]["channels"]
    # the same checkpoint as the uninterrupted run's (safetensors orders metadata keys freely)
    again = load_checkpoint(edited_checkpoint(lost))
    first = load_checkpoint(edited_checkpoint(localized.with_name("loc.edited") / lost.name))
    assert (again.epoch, again.config) == (first.epoch, first.config)
    assert again.model_state.keys() == first.model_state.keys()
    assert all(torch.equal(v, first.model_state[k]) for k, v in again.model_state.items())


def test_an_edited_folder_of_other_results_is_refused(text_run, localized, tmp_path):
    out = tmp_path / "loc.jsonl"
    shutil.copy(localized, out)
    shutil.copytree(localized.with_name("loc.edited"), tmp_path / "loc.edited")
    a, b = sorted((tmp_path / "loc.edited").iterdir())  # swapped: each intact, neither its own
    a.rename(tmp_path / "swap")
    b.rename(a)
    (tmp_path / "swap").rename(b)
    before = snapshot(tmp_path / "loc.edited")
    assert_one_line_error(run_cli(*localize_args(text_run, out)), str(a),
                          "other localization results")
    assert_unchanged(before, tmp_path / "loc.edited")

    (a / "edit.json").write_text((a / "edit.json").read_text().replace('"flipped"', '"flipped" '))
    assert_one_line_error(run_cli(*localize_args(text_run, out)), "edit.json",
                          "not the file memkern wrote")


def test_a_file_where_the_edited_folder_goes_is_refused(text_run, tmp_path):
    out = tmp_path / "loc.jsonl"
    (tmp_path / "loc.edited").write_text("notes")
    before = snapshot(tmp_path, text_run)
    assert_one_line_error(run_cli(*localize_args(text_run, out)), "loc.edited", "not a folder")
    assert_unchanged(before, tmp_path, text_run)
    assert not out.exists()


def test_image_runs_keep_their_edited_examples(run, tmp_path):
    out = tmp_path / "loc.jsonl"
    result = run_cli("localize", "--run", run, "--out", out, "--limit", "2", "--ref-batch", "64",
                     "--no-progress", "--device", "cpu", "--save-edited")
    assert result.exit_code == 0, result.output
    source = load_trained(RunDir(run).final_checkpoint(), device="cpu")
    gen = torch.Generator().manual_seed(5)
    for row in lines(out):
        folder = tmp_path / "loc.edited" / f"example_{row['index']:03d}"
        assert (folder / "noise.json").read_bytes() == (run / "noise.json").read_bytes()
        edited = load_trained(edited_checkpoint(folder), device="cpu").model.double()
        x = torch.randn(3, *source.data.train_images.shape[1:], generator=gen,
                        dtype=torch.float64)
        with torch.no_grad():
            want = masked(source.model.double(), row["settings"]["sites"], row["channels"], x,
                          None)
            torch.testing.assert_close(edited(x), want, rtol=1e-12, atol=1e-12)
    evaluated = run_cli("evaluate", "--run", folder, "--device", "cpu", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["test_acc"] == pytest.approx(row["test_acc"])
