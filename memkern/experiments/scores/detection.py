"""How well a score finds the flipped labels: AUROC, average precision, precision at k.

Scores are oriented so that higher means "more likely memorized / mislabeled". AUROC and average
precision are scikit-learn's (a tied (positive, negative) pair gets half credit; one threshold
per distinct score); both depend on the order of the scores alone, so scores are replaced by
their dense ranks first, which keeps ties (``inf == inf``) and makes infinities finite.
Precision at k breaks ties by the lower index.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

from memkern.errors import ConfigError


def _check(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ConfigError(f"scores {scores.shape} and labels {positive.shape} must be equal 1-d")
    if np.isnan(scores).any():
        raise ConfigError("scores hold NaN: drop the examples a signal does not cover first")
    return scores, positive


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve; NaN without both classes."""
    scores, positive = _check(scores, positive)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, rankdata(scores, method="dense")))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Sum over distinct thresholds of (recall step) x (precision there); NaN without positives."""
    scores, positive = _check(scores, positive)
    if not positive.any():
        return float("nan")
    return float(average_precision_score(positive, rankdata(scores, method="dense")))


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Share of flipped labels among the ``k`` highest scores."""
    scores, positive = _check(scores, positive)
    if not 1 <= k <= len(scores):
        raise ConfigError(f"k must be in 1..{len(scores)}, got {k}")
    top = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return float(positive[top].mean())
