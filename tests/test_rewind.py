"""Layer rewinding on a real digits run: the functional_call path against deep-copied models."""
import copy

import pytest
import torch
from click.testing import CliRunner

from memkern.rundir.csv_tables import COLUMNS, read_table
from memkern.training.checkpoints import load_checkpoint
from memkern.cli.main import main
from memkern.errors import ConfigError, RunDirError
from memkern.training.evaluate import split_accuracies
from memkern.rundir.context import load_trained
from memkern.network.models import layer_groups
from memkern.experiments.rewind.algorithm import default_epochs, with_group_from
from memkern.experiments.rewind.run import rewind
from memkern.rundir.paths import RunDir


def _acc(row):
    return {k: row[k] for k in COLUMNS[2:]}


def test_rewind_to_the_final_epoch_changes_nothing(run):
    # a copy: rewind writes rewind.csv, which the session's shared run must not gain
    final = load_trained(RunDir(run).final_checkpoint(), device="cpu")
    expected = split_accuracies(final.model, final.data)
    rows = rewind(run=run, epochs=[3], device="cpu", progress=False)
    assert rows[0]["group"] == "final" and rows[0]["epoch"] == 3
    assert len(rows) == 1 + len(layer_groups(final.model))
    for row in rows:
        assert _acc(row) == expected


def test_rewinding_every_group_to_init_is_the_initial_model(tiny_run):
    run = RunDir(tiny_run)
    final = load_trained(run.final_checkpoint(), device="cpu")
    init = load_trained(run.checkpoint_path(0), device="cpu")
    init_state = init.model.state_dict()
    state = with_group_from(final.model.state_dict(), init_state, layer_groups(final.model))
    assert state.keys() == init_state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, init_state[name]), name
    got = split_accuracies(final.model, final.data, state=state)
    assert got == split_accuracies(init.model, init.data)
    assert got != split_accuracies(final.model, final.data)


def test_functional_rewind_equals_deep_copy_and_load(run):
    """Every configuration, weights and BatchNorm statistics, against a naive model copy (of a
    copy of the run: rewind writes into it)."""
    rows = rewind(run=run, epochs=[0, 1, 2], device="cpu", progress=False)
    run = RunDir(run)
    final = load_trained(run.final_checkpoint(), device="cpu")
    groups = {g.name: g for g in layer_groups(final.model)}
    assert any(g.buffer_names for g in groups.values())
    assert [(r["group"], r["epoch"]) for r in rows[1:]] == [
        (g, e) for e in (0, 1, 2) for g in groups]
    for row in rows[1:]:
        source = load_checkpoint(run.checkpoint_path(row["epoch"])).model_state
        naive = copy.deepcopy(final.model)
        state = naive.state_dict()
        group = groups[row["group"]]
        for name in group.param_names + group.buffer_names:
            state[name] = source[name].clone()
        naive.load_state_dict(state)
        assert _acc(row) == split_accuracies(naive, final.data), (row["group"], row["epoch"])
    # rewinding changed something: epoch-0 configurations are not all the final model
    assert any(_acc(r) != _acc(rows[0]) for r in rows[1:])


def test_rewound_state_carries_batchnorm_statistics(tiny_run):
    run = RunDir(tiny_run)
    final = load_checkpoint(run.final_checkpoint()).model_state
    init = load_checkpoint(run.checkpoint_path(0)).model_state
    model = load_trained(run.final_checkpoint(), device="cpu").model
    group = next(g for g in layer_groups(model) if g.buffer_names)
    state = with_group_from(final, init, [group])
    for name in group.buffer_names:
        assert torch.equal(state[name], init[name])
    assert not torch.equal(init[group.buffer_names[0]], final[group.buffer_names[0]])
    others = set(final) - set(group.param_names + group.buffer_names)
    assert all(state[n] is final[n] for n in others)


def test_default_epochs_spread_over_the_run():
    assert default_epochs(list(range(31))) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert default_epochs([0, 1, 2, 3]) == [0, 1, 2]
    assert default_epochs([0, 5]) == [0]
    assert default_epochs([4]) == []


def test_missing_epoch_names_the_epochs_that_exist(tiny_run):
    with pytest.raises(RunDirError, match=r"no checkpoint for epoch 7 .*0, 1, 2, 3"):
        rewind(run=tiny_run, epochs=[0, 7], device="cpu", progress=False)


def test_unknown_group_names_the_known_ones(tiny_run):
    with pytest.raises(ConfigError, match="hidden1, hidden2, head"):
        rewind(run=tiny_run, epochs=[0], groups=["block9"], device="cpu", progress=False)


def test_cli_writes_csv_and_png(run, tmp_path):
    # a copy of the session's run: its rewind.csv must not reach the tests that copy it later
    result = CliRunner().invoke(main, ["rewind", "--run", str(run), "--epochs", "0,2",
                                       "--groups", "hidden1,head", "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = read_table(run / "rewind.csv")
    assert [(r["group"], r["epoch"]) for r in rows] == [
        ("final", 3), ("hidden1", 0), ("head", 0), ("hidden1", 2), ("head", 2)]
    assert (run / "rewind.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_missing_epoch_is_one_line_and_exit_2(tiny_run):
    result = CliRunner().invoke(main, ["rewind", "--run", str(tiny_run), "--epochs", "9",
                                       "--no-progress"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "epochs with checkpoints: 0, 1, 2, 3" in result.output


def test_cli_bad_epochs_option(tiny_run):
    result = CliRunner().invoke(main, ["rewind", "--run", str(tiny_run), "--epochs", "0,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
