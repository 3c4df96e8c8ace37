"""Per-example memorization scores: each signal against an independent computation."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import average_precision_score, roc_auc_score

from memkern.rundir.atomic import read_jsonl, rewrite_jsonl
from memkern.training.checkpoints import load_checkpoint, load_model_state
from memkern.errors import ConfigError
from memkern.training.config import TrainConfig
from memkern.training.dynamics import Dynamics, dynamics_path, example_stats
from memkern.rundir.context import load_data, model_for
from memkern.rundir.paths import RunDir
from memkern.experiments.scores import signals
from memkern.experiments.scores.benchmark import run_benchmark
from memkern.experiments.scores.crossval import cross_validate, fold_assignment, fold_data
from memkern.experiments.scores.detection import auroc, average_precision, precision_at_k
from memkern.experiments.scores.signals import channels_to_flip, tied_gap
from memkern.experiments.scores.table import collect_scores
from memkern.network.sites import example_indices
from memkern.rundir.csv_tables import read_csv
from memkern.network.tied_dropout import tied_dropout_mode
from memkern.training.train import train

TINY = TrainConfig(model="mlp", epochs=3, seed=2)


def memkern(*args):
    return subprocess.run([sys.executable, "-m", "memkern.cli", *args], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train(TINY, out=tmp_path_factory.mktemp("scores") / "run", progress=False)


def copy_run(run: RunDir, dest) -> RunDir:
    shutil.copytree(run.root, dest)
    return RunDir(dest)


def margin_by_hand(logits: torch.Tensor, label: int) -> float:
    others = [float(v) for c, v in enumerate(logits) if c != label]
    return float(logits[label]) - max(others)


def test_example_stats_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 7, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (37,), generator=gen)
    stats = example_stats(logits, labels)
    for i in range(37):
        assert stats["margin"][i] == pytest.approx(margin_by_hand(logits[i], int(labels[i])),
                                                   abs=1e-5)
        p = torch.softmax(logits[i], 0)[labels[i]]
        assert stats["loss"][i] == pytest.approx(-float(torch.log(p)), abs=1e-5)
        assert bool(stats["correct"][i]) == (int(logits[i].argmax()) == int(labels[i]))


def test_recorded_margins_equal_the_checkpoints_reevaluated(tiny_run):
    dyn = Dynamics.load(dynamics_path(tiny_run))
    assert dyn.epochs.tolist() == [1, 2, 3] and dyn.margin.dtype == torch.float16
    data = load_data(TINY)
    model = model_for(TINY, data)
    for row, epoch in enumerate(dyn.epochs.tolist()):
        load_model_state(model, load_checkpoint(tiny_run.checkpoint_path(epoch)))
        with torch.no_grad():
            logits = model.eval()(data.train_images).double()
        top2 = logits.topk(2, 1).values
        own = logits.gather(1, data.train_labels[:, None]).squeeze(1)
        margin = torch.where(own == top2[:, 0], own - top2[:, 1], own - top2[:, 0])
        torch.testing.assert_close(dyn.margin[row].double(), margin.half().double(),
                                   atol=2e-3, rtol=2e-3)
        assert torch.equal(dyn.correct[row], logits.argmax(1) == data.train_labels)
        loss = torch.nn.functional.cross_entropy(logits, data.train_labels, reduction="none")
        torch.testing.assert_close(dyn.loss[row].double(), loss, atol=2e-3, rtol=2e-3)


def test_dynamics_signals_by_hand(tiny_run):
    dyn = Dynamics.load(dynamics_path(tiny_run))
    got = signals.dynamics_signals(dyn)
    margin, correct = dyn.margin.double().tolist(), dyn.correct.tolist()
    prob = np.exp(-dyn.loss.double().numpy())
    epochs = dyn.epochs.tolist()
    for i in range(0, dyn.margin.shape[1], 7):
        column = [margin[e][i] for e in range(len(epochs))]
        assert got["aum"][i] == pytest.approx(sum(column) / len(column))
        seq = [correct[e][i] for e in range(len(epochs))]
        assert got["forgetting_events"][i] == sum(a and not b for a, b in zip(seq, seq[1:]))
        learned = np.inf
        for e in reversed(range(len(epochs))):
            if not seq[e]:
                break
            learned = epochs[e]
        assert got["learned_epoch"][i] == learned
        assert got["confidence"][i] == pytest.approx(prob[:, i].mean())
        assert got["variability"][i] == pytest.approx(prob[:, i].std())
        assert got["final_loss"][i] == pytest.approx(float(dyn.loss[-1, i]))


def test_signals_on_a_constructed_history():
    # Example 0 learned at 2, forgotten at 3, relearned at 4; example 1 never right at the end.
    correct = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 0]], dtype=torch.bool)
    epochs = torch.tensor([1, 2, 3, 4])
    assert signals.forgetting_events(correct).tolist() == [1, 1]
    assert signals.learned_epoch(correct, epochs).tolist() == [4, np.inf]


def test_combined_score_is_the_mean_percentile_rank():
    columns = {"aum": np.array([3.0, -1.0, 0.5, 0.5]), "final_loss": np.array([0.1, 2, 0.2, 0.3])}
    got = signals.combined_score(columns, ["aum", "final_loss"])
    # aum: low is suspicious -> ranks of -aum: [1, 4, 2.5, 2.5]; final loss ranks: [1, 4, 2, 3].
    assert got.tolist() == pytest.approx([(1 / 4 + 1 / 4) / 2, 1.0, (2.5 / 4 + 2 / 4) / 2,
                                          (2.5 / 4 + 3 / 4) / 2])


def _pairwise_auroc(scores, positive) -> float:
    """The definition: share of (positive, negative) pairs ranked right, ties counting half."""
    pos, neg = scores[positive][:, None], scores[~positive][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _thresholds_ap(scores, positive) -> float:
    """The definition: over each distinct score t, high to low, (recall gained) x precision."""
    ap, recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= t
        new_recall = positive[chosen].sum() / positive.sum()
        ap += (new_recall - recall) * positive[chosen].mean()
        recall = new_recall
    return ap


def test_detection_metrics_by_hand_with_ties_and_infinities():
    scores = np.array([np.inf, 1.0, 1.0, -np.inf, np.inf])
    positive = np.array([True, False, True, False, False])
    # pairs (pos, neg): inf beats 1 and -inf, ties inf; 1 ties 1, beats -inf, loses to inf
    assert auroc(scores, positive) == pytest.approx((1 + 1 + 0.5 + 0.5 + 1 + 0) / 6)
    # thresholds inf (1 of 2 right, recall 1/2) and 1 (2 of 4 right, recall 1)
    assert average_precision(scores, positive) == pytest.approx(0.5 * 1 / 2 + 0.5 * 2 / 4)
    assert np.isnan(auroc(scores, np.ones(5, bool))) and np.isnan(auroc(scores, np.zeros(5, bool)))
    assert np.isnan(average_precision(scores, np.zeros(5, bool)))
    with pytest.raises(ConfigError, match="NaN"):
        auroc(np.array([0.0, np.nan]), np.array([True, False]))


@pytest.mark.parametrize("n", [2, 7, 1023])
def test_detection_metrics_match_their_definitions(n):
    rng = np.random.default_rng(n)
    for ties in (False, True):
        scores = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
        if ties:
            scores[rng.random(n) < 0.1] = np.inf
            scores[rng.random(n) < 0.1] = -np.inf
        positive = np.zeros(n, bool)
        positive[rng.choice(n, max(1, n // 5), replace=False)] = True
        positive[0], positive[-1] = True, False
        assert auroc(scores, positive) == pytest.approx(_pairwise_auroc(scores, positive),
                                                        abs=1e-12)
        assert average_precision(scores, positive) == pytest.approx(
            _thresholds_ap(scores, positive), abs=1e-12)
    k = int(positive.sum())
    top = sorted(range(n), key=lambda i: (-scores[i], i))[:k]
    assert precision_at_k(scores, positive, k) == pytest.approx(positive[top].mean())


def test_benchmark_auroc_equals_scikit_learns_on_the_scores_file(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    table = collect_scores(run.root)
    bench = run_benchmark(run=run.root, table=table, data=load_data(TINY), folds=0)
    rows = {r["method"]: r for r in bench.rows}
    written = read_csv(run.root / "scores" / "benchmark.csv")
    assert {r["method"] for r in written} == set(rows) == set(table.signals)
    flipped = table.noisy
    for name, values in table.signals.items():
        oriented = signals.oriented(name, values)
        oriented = np.where(np.isinf(oriented), np.sign(oriented) * 1e300, oriented)  # for sklearn
        assert rows[name]["auroc"] == pytest.approx(roc_auc_score(flipped, oriented), abs=1e-12)
        assert rows[name]["ap"] == pytest.approx(average_precision_score(flipped, oriented),
                                                 abs=1e-12)
    assert bench.figure.stat().st_size > 0 and "| aum |" in bench.markdown.read_text()


def test_resume_drops_dynamics_rows_of_a_killed_epoch(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    reference = load_file(dynamics_path(run))
    # A kill after epoch 3's dynamics row but before its checkpoint: the row holds other values.
    run.checkpoint_path(3).unlink()
    torn = dict(reference)
    torn["margin"] = reference["margin"].clone()
    torn["margin"][2] += 1.0
    save_file(torn, dynamics_path(run))
    rewrite_jsonl(run.metrics_path, read_jsonl(run.metrics_path)[:2])
    train(None, out=run.root, resume=True, progress=False)
    resumed = load_file(dynamics_path(run))
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_run_without_dynamics_lists_them_and_compute_rebuilds_them(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    reference = load_file(dynamics_path(run))
    dynamics_path(run).unlink()
    table = collect_scores(run.root)
    assert "aum" not in table.signals and "forgetting_events" in table.missing
    assert "--compute" in table.missing["aum"] and "before memkern recorded" in table.missing["aum"]
    shown = memkern("scores", "--run", str(run.root), "--no-progress", "--top", "4")
    assert shown.returncode == 0, shown.stderr
    assert "missing aum, forgetting_events, learned_epoch, confidence, variability, final_loss:" \
        in shown.stdout
    rebuilt = memkern("scores", "--run", str(run.root), "--compute", "--localize-top", "3",
                      "--grad-epochs", "1,3", "--top", "4", "--no-progress")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt the training dynamics" in rebuilt.stdout
    again = load_file(dynamics_path(run))
    for key in reference:
        assert torch.equal(again[key], reference[key]), key
    rows = read_csv(run.root / "scores.csv")
    assert len(rows) == 1437 and "grad_total_e001" in rows[0] and "grad_total_e003" in rows[0]
    localized = read_jsonl(run.root / "localize.jsonl")
    assert len(localized) == 3
    for line in localized:
        value = rows[line["index"]]["channels_to_flip"]
        assert float(value) == (line["n_channels"] if line["flipped"] else np.inf)
    assert sum(r["channels_to_flip"] != "" for r in rows) == 3


def test_scores_csv_rows_and_grids(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    result = memkern("scores", "--run", str(run.root), "--top", "5", "--no-progress")
    assert result.returncode == 0, result.stderr
    rows = read_csv(run.root / "scores.csv")
    noise = run.load_noise()
    assert [int(r["index"]) for r in rows] == list(range(noise["num_train"]))
    for i, original, noisy_label in zip(noise["noisy_indices"], noise["original_labels"],
                                        noise["noisy_labels"]):
        assert rows[i]["noisy"] == "1" and int(rows[i]["label"]) == noisy_label
        assert int(rows[i]["original_label"]) == original
    assert sum(r["noisy"] == "1" for r in rows) == len(noise["noisy_indices"])
    assert all(r["label"] == r["original_label"] for r in rows if r["noisy"] == "0")
    assert list(rows[0])[:4] == ["index", "label", "original_label", "noisy"]
    assert list(rows[0])[-1] == "memorization_score"
    for name in ("memorization_score", "aum", "forgetting_events"):
        assert (run.root / "scores" / f"top_{name}.png").stat().st_size > 0


def test_tied_gap_by_hand():
    config = TrainConfig(tied_dropout=True, seed=3)
    data = load_data(config)
    torch.manual_seed(0)
    model = model_for(config, data).eval()
    got = tied_gap(model, data)
    some = torch.arange(0, len(data.train_labels), 97)
    with torch.no_grad():
        with tied_dropout_mode(model, "own"), example_indices(some):
            own = model(data.train_images[some])
        with tied_dropout_mode(model, "keep"):
            keep = model(data.train_images[some])
    for row, i in enumerate(some.tolist()):
        label = int(data.train_labels[i])
        expected = margin_by_hand(own[row], label) - margin_by_hand(keep[row], label)
        assert got[i] == pytest.approx(expected, abs=1e-4)
    assert np.abs(got).max() > 0  # own masks differ from keep mode


def test_channels_to_flip_reads_localize_lines(tmp_path):
    path = tmp_path / "localize.jsonl"
    rewrite_jsonl(path, [{"index": 4, "n_channels": 3, "flipped": True},
                         {"index": 1, "n_channels": 50, "flipped": False}])
    got = channels_to_flip(read_jsonl(path), 6)
    assert got[4] == 3 and got[1] == np.inf and np.isnan(got[[0, 2, 3, 5]]).all()


def test_cross_validation_folds_partition_and_hold_out():
    labels = np.repeat(np.arange(4), [10, 12, 9, 11])
    held = fold_assignment(labels, folds=3, seed=0)
    for k in range(3):
        counts = np.bincount(labels[held == k], minlength=4)
        assert (counts >= 3).all() and (counts <= 4).all()  # stratified
    data = load_data(TrainConfig())
    keep = torch.from_numpy(np.nonzero(fold_assignment(data.train_labels.numpy(), folds=5,
                                                       seed=0) != 0)[0])
    fold = fold_data(data, keep)
    assert torch.equal(fold.train_images, data.train_images[keep])
    assert torch.equal(fold.noisy_mask, data.noisy_mask[keep])
    original = fold.train_labels.clone()
    original[fold.noise.noisy_indices] = fold.noise.original_labels
    full_original = data.train_labels.clone()
    full_original[data.noise.noisy_indices] = data.noise.original_labels
    assert torch.equal(original, full_original[keep])


def test_cross_validation_reuses_saved_folds_of_the_same_settings_only(tiny_run, tmp_path,
                                                                      monkeypatch):
    import memkern.training.train

    run = copy_run(tiny_run, tmp_path / "run")
    data = load_data(TINY)
    first = cross_validate(run=run.root, folds=2, epochs=1, data=data, progress=False)
    assert first.probabilities.shape == (1437, 10) and first.trainings == 2
    np.testing.assert_allclose(first.probabilities.sum(1), 1.0, atol=1e-9)
    folder = run.root / "scores" / "crossval" / "2-fold_1-epochs"
    assert sorted(p.name for p in folder.iterdir()) == ["fold_0.safetensors", "fold_1.safetensors"]

    def no_training(*args, **kwargs):
        raise AssertionError("a saved fold was trained again")

    monkeypatch.setattr(memkern.training.train, "train", no_training)
    again = cross_validate(run=run.root, folds=2, epochs=1, data=data, progress=False)
    assert np.array_equal(again.probabilities, first.probabilities)
    with pytest.raises(AssertionError, match="trained again"):  # other settings: their own folds
        cross_validate(run=run.root, folds=3, epochs=1, data=data, progress=False)


def test_compute_lists_gradient_norms_it_cannot_take_and_goes_on(tiny_run, tmp_path,
                                                               monkeypatch):
    import memkern.experiments.gradients.run
    from memkern.errors import UnsupportedLayerError
    from memkern.experiments.scores.compute import compute_missing

    def refuse(**kwargs):
        raise UnsupportedLayerError("layer 'x' has no per-example rule")

    monkeypatch.setattr(memkern.experiments.gradients.run, "gradient_accounting", refuse)
    run = copy_run(tiny_run, tmp_path / "run")
    done = compute_missing(run=run.root, localize_top=0, progress=False)
    assert done == ["skipped per-example gradient norms at epochs [1, 3]: layer 'x' has no "
                    "per-example rule"]
    assert "grad_*" in collect_scores(run.root).missing


@pytest.mark.parametrize("args, message", [
    (["--run", "{missing}"], "not a memkern run directory"),
    (["--run", "{run}", "--top", "0"], "--top must be at least 1"),
    (["--run", "{run}", "--folds", "1", "--benchmark"], "--folds must be 0"),
    (["--run", "{run}", "--grad-epochs", "x", "--compute"], "--grad-epochs takes"),
    (["--run", "{clean}", "--benchmark", "--folds", "0"], "has no flipped labels"),
    pytest.param(["--run", "{run}", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA")),
])
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path_factory, args, message):
    clean = tmp_path_factory.getbasetemp() / "clean-run"
    if "{clean}" in args and not clean.exists():
        train(TrainConfig(model="mlp", epochs=1, noise=0.0), out=clean, progress=False)
    filled = [a.format(run=tiny_run.root, missing=tiny_run.root / "nope", clean=clean)
              for a in args]
    result = memkern("scores", *filled, "--no-progress")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("memkern: error:") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for written in (tiny_run.root / "scores.csv", clean / "scores.csv"):
        assert not written.exists()  # nothing written


def test_benchmark_without_cleanlab_refuses_before_training_or_writing(tiny_run, tmp_path,
                                                                       monkeypatch):
    """cleanlab missing: one line, exit 2, and no scores.csv, grid or crossval/ folder."""
    from click.testing import CliRunner

    from memkern.cli.main import main

    run = copy_run(tiny_run, tmp_path / "run")
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab... raises ImportError
    result = CliRunner().invoke(main, ["scores", "--run", str(run.root), "--benchmark",
                                       "--no-progress", "--device", "cpu"])
    assert result.exit_code == 2 and "cleanlab is not installed" in result.output, result.output
    assert result.output.startswith("memkern: error:") and result.output.count("\n") == 1
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before


def test_scores_prints_the_top_examples_and_the_benchmark_best_first(tiny_run, tmp_path):
    from click.testing import CliRunner

    from memkern.cli.main import main

    run = copy_run(tiny_run, tmp_path / "run")
    result = CliRunner().invoke(main, ["scores", "--run", str(run.root), "--benchmark",
                                       "--folds", "0", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    top = next(i for i, line in enumerate(lines) if "examples ranked most memorized" in line)
    flipped = int(lines[top].split("; ")[1].split()[0])
    table = lines[top + 2:top + 12]
    assert len(table) == 10 and sum(line.split()[3] == "yes" for line in table) == flipped
    head = next(i for i, line in enumerate(lines) if line.startswith("how well each signal"))
    header = lines[head + 1]
    k = round(TINY.noise * 1437)
    assert f"precision@k (k = flipped among them: {k} for all)" in header
    assert "flagged" not in header  # no cleanlab row: its columns are left out, not empty
    rows = read_csv(run.root / "scores" / "benchmark.csv")
    full = [r for r in rows if r["covered"] == "1437"]
    assert [float(r["auroc"]) for r in full] == sorted((float(r["auroc"]) for r in full),
                                                      reverse=True)
    shown = [line.split()[0] for line in lines[head + 2:head + 2 + len(rows)]]
    assert shown == [r["method"] for r in rows]
