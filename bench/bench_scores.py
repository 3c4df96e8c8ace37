"""Finding mislabeled training examples: memkern's per-example signals from one training run
against cleanlab on 5-fold cross-validation (5 more trainings of the same model and config).

Full mode: digits, cnn, 10% label noise, 30 epochs (the issue's setting); quick mode (CI): the
mlp for 2 epochs, 2 localized candidates, grids of 8. The run is trained once per session;
the peer check trains the cross-validation folds (each fold records its wall time, which the
table reports); the timed call is ``memkern scores --compute --benchmark`` (gradient norms,
localization of the top candidates, every metric, the saved folds reused). The table lands in
the run's scores/benchmark.{csv,md} and in ``extra_info``.
"""
import numpy as np
import pytest
from conftest import QUICK
from sklearn.metrics import roc_auc_score

from memkern.rundir.atomic import read_jsonl
from memkern.training.config import TrainConfig
from memkern.rundir.context import load_data
from memkern.experiments.scores.benchmark import cleanlab_rows
from memkern.experiments.scores.crossval import cross_validate
from memkern.experiments.scores.run import score_run
from memkern.training.train import train

FOLDS = 5


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    config = (TrainConfig(model="mlp", epochs=2, noise=0.1) if QUICK
              else TrainConfig(model="cnn", epochs=30, noise=0.1))
    return train(config, out=tmp_path_factory.mktemp("bench-scores") / "run", progress=False)


def test_cleanlab_scores_what_memkern_measures(noisy_run):
    """Before any timing: the peer's ranking is the out-of-sample probability of the trained
    label (its self-confidence), and memkern's AUROC of that ranking equals scikit-learn's."""
    data = load_data(noisy_run.load_config())
    cv = cross_validate(run=noisy_run.root, folds=FOLDS, data=data, progress=False)
    labels = data.train_labels.numpy()
    assert np.allclose(cv.probabilities.sum(1), 1.0, atol=1e-9)
    row, scores = cleanlab_rows(labels, cv.probabilities, data.noisy_mask.numpy())
    own = cv.probabilities[np.arange(len(labels)), labels]
    np.testing.assert_allclose(-scores, own, rtol=0, atol=1e-12)
    assert row["auroc"] == pytest.approx(roc_auc_score(data.noisy_mask.numpy(), scores), abs=1e-12)


def test_mislabel_detection(benchmark, noisy_run, quick, context_info):
    localize_top, top = (2, 8) if quick else (64, 32)

    def score():
        return score_run(run=noisy_run.root, compute=True, benchmark=True,
                         localize_top=localize_top, top=top, folds=FOLDS, progress=False)

    result = benchmark.pedantic(score, rounds=1, warmup_rounds=0)
    rows = result.benchmark.rows
    peer = next(r for r in rows if r["method"].startswith("cleanlab"))
    ours = [r for r in rows if not r["method"].startswith("cleanlab")
            and r["covered"] == len(result.table.noisy)]
    best = max(ours, key=lambda r: r["auroc"])
    train_seconds = sum(r["seconds"] for r in read_jsonl(noisy_run.metrics_path))
    benchmark.group = "mislabel detection"
    benchmark.extra_info.update(
        context_info, run_training_seconds=round(train_seconds, 2), folds=FOLDS,
        best_signal=best["method"], best_auroc=best["auroc"], cleanlab_auroc=peer["auroc"],
        best_matches_cleanlab=best["auroc"] >= peer["auroc"],
        cleanlab_seconds=round(peer["seconds"], 2),
        table={r["method"]: {k: r[k] for k in ("auroc", "ap", "precision_at_k", "covered",
                                               "trainings", "seconds")} for r in rows})
    assert all(0.0 <= r["auroc"] <= 1.0 for r in ours)
