"""Layer retraining on a real digits run: frozen means bit-identical, clean data only, resumable."""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import memkern.experiments.retrain.run as retrain_module
from memkern.rundir.csv_tables import read_table
from memkern.training.checkpoints import load_checkpoint
from memkern.cli.main import main
from memkern.errors import ConfigError
from memkern.training.evaluate import split_accuracies
from memkern.rundir.context import load_trained
from memkern.network.models import layer_groups
from memkern.experiments.retrain.algorithm import retrain_group
from memkern.experiments.retrain.run import retrain
from memkern.experiments.rewind.algorithm import with_group_from
from memkern.rundir.paths import RunDir
from memkern.network.sites import current_example_indices


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy: retrain writes retrain.csv/json into the run directory."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def _reset(tiny_run, group_name):
    run = RunDir(tiny_run)
    trained = load_trained(run.final_checkpoint(), device="cpu")
    group = next(g for g in layer_groups(trained.model) if g.name == group_name)
    init = load_checkpoint(run.checkpoint_path(0)).model_state
    trained.model.load_state_dict(with_group_from(trained.model.state_dict(), init, [group]))
    return trained, group


def test_frozen_parameters_and_buffers_are_bit_identical(tiny_run):
    trained, group = _reset(tiny_run, "hidden2")
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    rows = retrain_group(trained.model, group, trained.data, epochs=1, lr=0.05,
                         weight_decay=5e-4, batch_size=64, seed=0)
    after = trained.model.state_dict()
    own = set(group.param_names + group.buffer_names)
    for name in before:
        if name not in own:
            assert torch.equal(before[name], after[name]), f"frozen {name} moved"
    for name in ("hidden2.linear.weight", "hidden2.norm.weight", "hidden2.norm.running_mean"):
        assert not torch.equal(before[name], after[name]), f"retrained {name} did not move"
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(p.requires_grad for p in trained.model.parameters())
    assert not trained.model.training


def test_epoch_zero_row_is_the_model_right_after_the_reset(tiny_run):
    trained, group = _reset(tiny_run, "hidden1")
    expected = split_accuracies(trained.model, trained.data)
    rows = retrain_group(trained.model, group, trained.data, epochs=1, lr=0.05,
                         weight_decay=5e-4, batch_size=64, seed=0)
    assert {k: rows[0][k] for k in expected} == expected
    assert rows[1]["clean_acc"] > rows[0]["clean_acc"]


def test_retraining_sees_only_clean_examples(run_copy, monkeypatch):
    seen = []
    build = retrain_module.open_run

    def instrumented(*args, **kwargs):
        ctx = build(*args, **kwargs)
        ctx.model.register_forward_pre_hook(
            lambda m, args: seen.append((current_example_indices().clone(), len(args[0])))
            if torch.is_grad_enabled() else None)
        return ctx

    monkeypatch.setattr(retrain_module, "open_run", instrumented)
    retrain(run=run_copy, groups=["hidden1"], epochs=2, device="cpu", progress=False)
    noisy = RunDir(run_copy).load_noise()["noisy_indices"]
    indices = torch.cat([idx for idx, _ in seen])
    assert sum(n for _, n in seen) == len(indices)
    num_train = RunDir(run_copy).load_noise()["num_train"]
    assert len(indices) == 2 * (num_train - len(noisy))
    assert not set(indices.tolist()) & set(noisy)
    assert len(set(indices.tolist())) == num_train - len(noisy)


def test_resume_keeps_completed_groups_and_skips_them(run_copy, monkeypatch):
    calls = []
    real = retrain_module.retrain_group

    def killed_on_second(model, group, *args, **kwargs):
        calls.append(group.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, group, *args, **kwargs)

    monkeypatch.setattr(retrain_module, "retrain_group", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        retrain(run=run_copy, epochs=1, device="cpu", progress=False)
    partial = read_table(run_copy / "retrain.csv")
    assert [(r["group"], r["epoch"]) for r in partial] == [("hidden1", 0), ("hidden1", 1)]
    assert not (run_copy / "retrain.png").exists()

    calls.clear()
    monkeypatch.setattr(retrain_module, "retrain_group",
                        lambda *a, **k: (calls.append(a[1].name), real(*a, **k))[1])
    rows = retrain(run=run_copy, epochs=1, device="cpu", progress=False)
    assert calls == ["hidden2", "head"]
    assert rows[:2] == partial
    assert [(r["group"], r["epoch"]) for r in read_table(run_copy / "retrain.csv")] == [
        (g, e) for g in ("hidden1", "hidden2", "head") for e in (0, 1)]
    assert (run_copy / "retrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_settings_refuse_to_resume_unless_overwrite(run_copy):
    retrain(run=run_copy, groups=["head"], epochs=1, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="epochs=1.*--overwrite"):
        retrain(run=run_copy, groups=["head"], epochs=2, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="lr=0.05.*--overwrite"):
        retrain(run=run_copy, groups=["head"], epochs=1, lr=0.01, device="cpu", progress=False)
    rows = retrain(run=run_copy, groups=["head"], epochs=1, lr=0.01, overwrite=True,
                   device="cpu", progress=False)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert '"lr": 0.01' in (run_copy / "retrain.json").read_text()


def test_bad_options_are_typed_errors(run_copy):
    with pytest.raises(ConfigError, match="--epochs must be at least 1"):
        retrain(run=run_copy, epochs=0, progress=False)
    with pytest.raises(ConfigError, match="unknown layer group"):
        retrain(run=run_copy, groups=["block1"], epochs=1, device="cpu", progress=False)


def test_cli_writes_csv_and_png(run_copy):
    result = CliRunner().invoke(main, ["retrain", "--run", str(run_copy), "--groups", "head",
                                       "--from-epoch", "1", "--epochs", "1", "--device", "cpu",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = read_table(run_copy / "retrain.csv")
    assert [(r["group"], r["epoch"]) for r in rows] == [("head", 0), ("head", 1)]
    assert (run_copy / "retrain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_missing_reset_epoch_is_one_line_and_exit_2(run_copy):
    result = CliRunner().invoke(main, ["retrain", "--run", str(run_copy), "--from-epoch", "5",
                                       "--no-progress"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "no checkpoint for epoch 5" in result.output and "0, 1, 2, 3" in result.output
    assert not (run_copy / "retrain.csv").exists()


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """A real 2-epoch digits MLP run trained with AdamW (checkpoints 0..2)."""
    from memkern.training.config import TrainConfig
    from memkern.training.train import train

    out = tmp_path_factory.mktemp("runs") / "adamw"
    train(TrainConfig(model="mlp", epochs=2, noise=0.1, optimizer="adamw", lr=0.003), out=out,
          device="cpu", progress=False)
    return out


def _counting_steps(monkeypatch) -> dict[str, int]:
    """Counts every optimizer step by the optimizer's class name."""
    steps = {"SGD": 0, "AdamW": 0}
    for cls in (torch.optim.SGD, torch.optim.AdamW):
        real = cls.step

        def counted(self, *args, _real=real, _name=cls.__name__, **kwargs):
            steps[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", counted)
    return steps


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_retraining_steps_the_runs_own_optimizer(kind, run_copy, adamw_run, tmp_path,
                                                 monkeypatch):
    run = run_copy if kind == "sgd" else shutil.copytree(adamw_run, tmp_path / "adamw")
    steps = _counting_steps(monkeypatch)
    retrain(run=run, groups=["head"], epochs=1, device="cpu", progress=False)
    used, unused = ("SGD", "AdamW") if kind == "sgd" else ("AdamW", "SGD")
    assert steps[used] > 0 and steps[unused] == 0
    assert f'"optimizer": "{kind}"' in (run / "retrain.json").read_text()


def test_settings_without_an_optimizer_were_sgd(run_copy, adamw_run, tmp_path):
    """retrain.json files written before the optimizer was recorded: an SGD run resumes them,
    an AdamW run refuses them (they were retrained with SGD)."""
    adamw = shutil.copytree(adamw_run, tmp_path / "adamw")
    for run in (run_copy, adamw):
        retrain(run=run, groups=["head"], epochs=1, device="cpu", progress=False)
        settings = json.loads((run / "retrain.json").read_text())
        del settings["optimizer"]
        (run / "retrain.json").write_text(json.dumps(settings))
    assert [r["epoch"] for r in retrain(run=run_copy, groups=["head"], epochs=1, device="cpu",
                                        progress=False)] == [0, 1]
    with pytest.raises(ConfigError, match="optimizer=sgd.*--overwrite"):
        retrain(run=adamw, groups=["head"], epochs=1, device="cpu", progress=False)
