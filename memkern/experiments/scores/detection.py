"""How well a score finds the flipped labels: AUROC, average precision, precision at k.

Scores are oriented so that higher means "more likely memorized / mislabeled". Ties count as in
scikit-learn: AUROC gives half credit to a tied (positive, negative) pair; average precision
takes one threshold per distinct score. Precision at k breaks ties by the lower index.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

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
    """Area under the ROC curve (the Mann-Whitney statistic); NaN without both classes."""
    scores, positive = _check(scores, positive)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks: a tie between classes counts half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Sum over distinct thresholds of (recall step) x (precision there); NaN without positives."""
    scores, positive = _check(scores, positive)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    tp = np.cumsum(hits)
    # The last position of each run of equal scores is where its threshold lands.
    ranked = scores[order]
    ends = np.r_[np.nonzero(ranked[1:] != ranked[:-1])[0], len(order) - 1]  # inf == inf: tied
    precision = tp[ends] / (ends + 1)
    recall = tp[ends] / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Share of flipped labels among the ``k`` highest scores."""
    scores, positive = _check(scores, positive)
    if not 1 <= k <= len(scores):
        raise ConfigError(f"k must be in 1..{len(scores)}, got {k}")
    top = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return float(positive[top].mean())
