"""`memkern rewind` and `memkern retrain` on a text run: rewinding is exact against the
checkpoints, retraining touches one group and only clean windows, the CLI writes measure tables
and figures, reruns are idempotent, bad input is one line (docs/text.md)."""
import json
import math
import shutil

import pytest
import torch
from cli_checks import assert_one_line_error, assert_unchanged, run_cli, snapshot
from test_text_data import write_works
from test_text_train import tiny_args

import memkern.experiments.retrain.algorithm as retrain_algorithm
import memkern.experiments.retrain.run as retrain_run
import memkern.experiments.rewind.run as rewind_run
from memkern.errors import RunDirError
from memkern.experiments.retrain.algorithm import retrain_group
from memkern.experiments.rewind.algorithm import with_group_from
from memkern.experiments.rewind.text import rewind_text_measures
from memkern.network.models.groups import LayerGroup, layer_groups
from memkern.rundir.context import open_run
from memkern.rundir.csv_tables import read_measure_table, write_measure_table
from memkern.training.text_evaluate import text_epoch_metrics


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_rr")
    corpus = write_works(root / "c", count=5, lines=40)
    result = run_cli(*tiny_args(corpus, root / "run", "--epochs", "2"))
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def run_copy(text_run, tmp_path):
    return shutil.copytree(text_run, tmp_path / "run")


def _measures(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("group", "epoch")}


def _all_groups(model) -> LayerGroup:
    groups = layer_groups(model)
    return LayerGroup("all", sum((g.param_names for g in groups), ()),
                      sum((g.buffer_names for g in groups), ()))


def test_rewinding_to_the_final_epoch_reproduces_the_final_model(text_run):
    ctx = open_run(text_run, device="cpu", text_ok=True)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    groups = layer_groups(ctx.model)
    rows = rewind_text_measures(ctx.model, ctx.data, states=[(2, ctx.state(2)), (0, ctx.state(0))],
                                groups=groups, final_epoch=2)
    assert [(r["group"], r["epoch"]) for r in rows] == (
        [("final", 2)] + [(g.name, e) for e in (2, 0) for g in groups])
    base = _measures(rows[0])
    assert set(base) == {"heldout_bpb", "extracted_r1", "extracted_r8", "exposure_r1",
                         "exposure_r8"}
    assert base == text_epoch_metrics(open_run(text_run, device="cpu", text_ok=True).model,
                                      ctx.data)
    for r in rows[1:1 + len(groups)]:
        assert _measures(r) == base, r["group"]
    # Rewinding to the initialization is not a no-op: the check above can fail.
    assert all(r["heldout_bpb"] != base["heldout_bpb"] for r in rows[1 + len(groups):])
    for k, v in ctx.model.state_dict().items():  # the final weights are back
        assert torch.equal(v, before[k]), k


def test_rewinding_every_group_to_epoch_k_is_checkpoint_k(text_run):
    ctx = open_run(text_run, device="cpu", text_ok=True)
    history = [json.loads(line) for line in (text_run / "metrics.jsonl").read_text().splitlines()]
    rows = rewind_text_measures(ctx.model, ctx.data, states=[(1, ctx.state(1))],
                                groups=[_all_groups(ctx.model)], final_epoch=2)
    epoch1 = open_run(text_run, epoch=1, device="cpu", text_ok=True)
    assert _measures(rows[1]) == text_epoch_metrics(epoch1.model, epoch1.data)
    for key, value in _measures(rows[1]).items():  # what training measured at that epoch
        assert value == pytest.approx(history[0][key], rel=1e-6, abs=1e-9), key


def test_retraining_touches_one_group_and_only_clean_windows(text_run, monkeypatch):
    ctx = open_run(text_run, device="cpu", text_ok=True)
    model, data = ctx.model, ctx.data
    final = {k: v.clone() for k, v in model.state_dict().items()}
    group = next(g for g in layer_groups(model) if g.name == "blocks.0")
    model.load_state_dict(with_group_from(final, ctx.state(0), [group]))
    seen = []
    batches = retrain_algorithm.iterate_batches

    def recording(*args, **kwargs):
        for x, y, idx in batches(*args, **kwargs):
            seen.append(idx.clone())
            assert torch.equal(x, data.train_images[idx]), "rows are not the windows named"
            yield x, y, idx

    monkeypatch.setattr(retrain_algorithm, "iterate_batches", recording)
    rows = retrain_group(model, group, data, epochs=2, lr=0.05, weight_decay=0.0,
                         batch_size=16, seed=0)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    trained = torch.cat(seen)
    assert data.noisy_mask.any() and not data.noisy_mask[trained].any()
    clean = torch.nonzero(~data.noisy_mask).flatten()
    for epoch in range(2):  # every clean window once per epoch
        half = trained[epoch * len(clean):(epoch + 1) * len(clean)]
        assert torch.equal(half.sort().values, clean)
    assert len(trained) == 2 * len(clean)
    owned = set(group.param_names) | set(group.buffer_names)
    for k, v in model.state_dict().items():
        if k not in owned:
            assert torch.equal(v, final[k]), k
    assert any(not torch.equal(model.state_dict()[k], final[k]) for k in group.param_names)
    # Epoch 0 is the reset model: the same row as rewinding that group to epoch 0.
    ctx2 = open_run(text_run, device="cpu", text_ok=True)
    rewound = rewind_text_measures(ctx2.model, ctx2.data, states=[(0, ctx2.state(0))],
                                   groups=[group], final_epoch=2)
    assert _measures(rows[0]) == _measures(rewound[1])
    assert rows[-1]["heldout_bpb"] < rows[0]["heldout_bpb"]


def test_cli_writes_tables_and_figures_and_reruns_idempotently(run_copy, monkeypatch):
    result = run_cli("rewind", "--run", run_copy, "--no-progress", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "held-out bits/byte" in result.output and "extracted r8" in result.output
    table = read_measure_table(run_copy / "rewind.csv")
    assert len(table) == 1 + 2 * 3 and table[0]["group"] == "final"
    assert (run_copy / "rewind.png").read_bytes()[:4] == b"\x89PNG"
    written = (run_copy / "rewind.csv").read_bytes()

    def refuse(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(rewind_run, "rewind_text_measures", refuse)
    again = run_cli("rewind", "--run", run_copy, "--no-progress", "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert (run_copy / "rewind.csv").read_bytes() == written

    calls = []
    real = retrain_run.retrain_group
    monkeypatch.setattr(retrain_run, "retrain_group",
                        lambda model, group, *a, **k: calls.append(group.name)
                        or real(model, group, *a, **k))
    args = ["retrain", "--run", run_copy, "--no-progress", "--device", "cpu", "--epochs", "1"]
    result = run_cli(*args, "--groups", "blocks.0")
    assert result.exit_code == 0, result.output
    assert "clean windows" in result.output and calls == ["blocks.0"]
    result = run_cli(*args)  # resumes: only the groups not yet retrained
    assert result.exit_code == 0, result.output
    assert calls == ["blocks.0", "tok_embed", "norm"]
    rows = read_measure_table(run_copy / "retrain.csv")
    assert sorted({r["group"] for r in rows}) == ["blocks.0", "norm", "tok_embed"]
    assert all(len(rows) == 6 and "exposure_r8" in r and math.isfinite(r["heldout_bpb"])
               for r in rows)
    assert (run_copy / "retrain.png").read_bytes()[:4] == b"\x89PNG"
    written = (run_copy / "retrain.csv").read_bytes()
    assert run_cli(*args).exit_code == 0 and calls == ["blocks.0", "tok_embed", "norm"]
    assert (run_copy / "retrain.csv").read_bytes() == written
    # the report shows both tables and figures
    assert run_cli("report", "--run", run_copy).exit_code == 0
    page = (run_copy / "report" / "index.html").read_text()
    assert "each group rewound to an earlier epoch" in page
    assert "each group reset and retrained on clean windows" in page
    assert "no rewinding" not in page and "no retraining" not in page


def test_bad_input_is_one_line(run_copy):
    before = snapshot(run_copy)
    for args, fragment in ((["rewind", "--epochs", "7"], "7"),
                           (["rewind", "--groups", "blocks.5"], "blocks.5"),
                           (["retrain", "--groups", "nope"], "nope"),
                           (["retrain", "--from-epoch", "9"], "9")):
        assert_one_line_error(run_cli(*args, "--run", run_copy, "--no-progress", "--device",
                                      "cpu"), fragment)
    assert_unchanged(before, run_copy)
    args = ["retrain", "--run", run_copy, "--no-progress", "--device", "cpu", "--epochs", "1",
            "--groups", "norm"]
    assert run_cli(*args).exit_code == 0
    path = run_copy / "retrain.csv"
    path.write_text(path.read_text().replace(",1,", ",x,", 1))  # a hand-edited epoch
    assert_one_line_error(run_cli(*args), "retrain.csv")


def test_measure_table_round_trips_and_refuses_foreign_files(tmp_path):
    path = tmp_path / "t.csv"
    rows = [{"group": "final", "epoch": 2, "heldout_bpb": 3.25, "suffix_acc": math.nan},
            {"group": "blocks.0", "epoch": 0, "heldout_bpb": 0.1 + 0.2, "suffix_acc": 0.5}]
    write_measure_table(path, rows)
    back = read_measure_table(path)
    assert back[1] == rows[1] and math.isnan(back[0]["suffix_acc"])
    assert read_measure_table(tmp_path / "absent.csv") == []
    for text in ("epoch,group,x\n2,final,1\n", "group,epoch,x\nfinal,2,1\nfinal,2,3\n",
                 "group,epoch,x\nfinal,2,1,9\n", "group,epoch,x\nfinal,2,abc\n"):
        path.write_text(text)
        with pytest.raises(RunDirError):
            read_measure_table(path)
    with pytest.raises(ValueError):
        write_measure_table(tmp_path / "u.csv", [rows[0], {"group": "a", "epoch": 1}])
