"""Point metrics of one labelled, scored row set, and the shape every metric value has.

Contract: pure functions of numpy arrays (labels as booleans, scores as floats, optional per-row weights);
no file, no configuration, no randomness. A metric value handed to metrics.json is the dict
``{"value": float | None, "ci": [low, high] | None, "reason": str | None}`` built by `metric` (a finite
number) or `not_available` (``value`` None and the reason why); nothing else builds that shape.

Every AUROC/AUPRC, point estimate or bootstrap resample, comes from one weighted rank computation
(`RankIndex`): a resample is a vector of multiplicities over the original rows, so 1,000 resamples are one
matrix pass instead of 1,000 sorts (the resampling itself is `nextvisit.evaluate.bootstrap`). AUROC and
average precision equal scikit-learn's ``roc_auc_score`` / ``average_precision_score`` (tested against it).
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------------------
# Metric values: {"value": float | None, "ci": [low, high] | None, "reason": str | None}


def metric(value: float, ci: tuple[float, float] | None = None) -> dict:
    if not np.isfinite(value):
        return not_available("undefined (not a finite number)")
    out = {"value": float(value), "ci": None, "reason": None}
    if ci is not None and all(np.isfinite(ci)):
        out["ci"] = [float(ci[0]), float(ci[1])]
    return out


def not_available(reason: str) -> dict:
    return {"value": None, "ci": None, "reason": reason}


# --------------------------------------------------------------------------------------------------------
# Rank metrics on weighted rows


class RankIndex:
    """Scores sorted once; then AUROC and average precision for any number of row weightings.

    A weighting gives every row a weight (1 for the plain metric; bootstrap multiplicities; subject weights;
    or their product). For each weighting, with tied scores counted half (AUROC) and grouped into one
    threshold (AP), exactly as scikit-learn's ``roc_auc_score`` / ``average_precision_score`` with
    ``sample_weight``:

        AUROC = sum over (positive i, negative j) of w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W+ W-)
        AP    = sum over positives i of w_i precision(s >= s_i) / W+

    Both need, per positive, only the negative weight below its score (a cumulative sum over the negatives
    in score order) and the positive weight at or above it, so R weightings cost O(R n) after one sort.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        labels = np.asarray(labels, dtype=bool)
        scores = np.asarray(scores, dtype=np.float64)
        self.positive_rows = np.flatnonzero(labels)
        self.negative_rows = np.flatnonzero(~labels)
        positive_scores, negative_scores = scores[self.positive_rows], scores[self.negative_rows]
        # Orders within each class (positions into positive_rows / negative_rows).
        self.negative_order = np.argsort(negative_scores, kind="stable")  # ascending
        self.positive_order = np.argsort(-positive_scores, kind="stable")  # descending
        negatives_ascending = negative_scores[self.negative_order]
        positives_descending = positive_scores[self.positive_order]
        # Per positive (descending): negatives strictly below, and at or below, its score.
        self.below = np.searchsorted(negatives_ascending, positives_descending, side="left")
        self.at_or_below = np.searchsorted(negatives_ascending, positives_descending, side="right")
        # Per positive: the last positive tied with it, so "positives at or above" counts the whole tie.
        self.tie_end = np.zeros(0, dtype=np.int64)
        if len(positives_descending):
            last_of_tie = np.r_[positives_descending[1:] != positives_descending[:-1], True]
            tie_group = np.cumsum(np.r_[0, last_of_tie[:-1]]).astype(np.int64)
            self.tie_end = np.flatnonzero(last_of_tie)[tie_group]

    def class_sums(self, positive_weights: np.ndarray, negative_weights: np.ndarray):
        """(concordant pair weight, total pair weight, average precision), each [R], for weights given per
        class: ``positive_weights`` [R, positives] in the order of ``positive_rows``, likewise negatives.
        AUROC = concordant / total; AP is NaN for a weighting with no positive weight."""
        positive_weights = np.atleast_2d(positive_weights)[:, self.positive_order]
        negative_weights = np.atleast_2d(negative_weights)[:, self.negative_order]
        n_weightings = positive_weights.shape[0]
        negative_cumulative = np.zeros((n_weightings, negative_weights.shape[1] + 1))
        np.cumsum(negative_weights, axis=1, out=negative_cumulative[:, 1:])
        total_negative = negative_cumulative[:, -1]
        below = negative_cumulative[:, self.below]
        concordant = np.sum(positive_weights * (below + negative_cumulative[:, self.at_or_below]), axis=1) * 0.5
        positive_cumulative = np.cumsum(positive_weights, axis=1, dtype=np.float64)
        total_positive = positive_cumulative[:, -1] if positive_cumulative.shape[1] else np.zeros(n_weightings)
        true_positive = positive_cumulative[:, self.tie_end]
        flagged = true_positive + (total_negative[:, None] - below)
        precision = np.divide(true_positive, flagged, out=np.zeros_like(true_positive), where=flagged > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            average_precision = np.sum(positive_weights * precision, axis=1) / total_positive
        return concordant, total_positive * total_negative, average_precision

    def pair_sums(self, weights: np.ndarray):
        """`class_sums` for weights given per row: ``weights`` [R, n] in the original row order."""
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        return self.class_sums(weights[:, self.positive_rows], weights[:, self.negative_rows])


def auroc(labels, scores, sample_weight=None) -> float:
    """Area under the ROC curve (ties count half); NaN with a single class.

    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    labels = np.asarray(labels, dtype=bool)
    weights = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    concordant, pairs, _ = RankIndex(labels, scores).pair_sums(weights[None, :])
    return float(concordant[0] / pairs[0]) if pairs[0] > 0 else float("nan")


def average_precision(labels, scores, sample_weight=None) -> float:
    """Average precision (area under the step precision-recall curve), as scikit-learn defines it."""
    labels = np.asarray(labels, dtype=bool)
    weights = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return float(RankIndex(labels, scores).pair_sums(weights[None, :])[2][0])


def stratified_auroc(labels, scores, strata) -> float:
    """AUROC over the (positive, negative) pairs within the same stratum only; NaN when no stratum holds
    both classes. Equals the stratum AUROCs averaged with weights (positives x negatives) per stratum."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    strata = np.asarray(strata)
    concordant = pairs = 0.0
    for stratum in np.unique(strata):
        rows = strata == stratum
        c, p, _ = RankIndex(labels[rows], scores[rows]).pair_sums(np.ones((1, int(rows.sum()))))
        concordant += c[0]
        pairs += p[0]
    return concordant / pairs if pairs > 0 else float("nan")


# --------------------------------------------------------------------------------------------------------
# Threshold, classification and calibration metrics


def best_f1_threshold(labels, scores) -> tuple[float, float]:
    """(threshold, F1) maximising F1 of the rule ``score >= threshold``; the highest such threshold on ties.
    NaN threshold when there is no positive."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.sum() == 0:
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_group = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_pos = np.cumsum(sorted_labels)[last_of_group]
    false_pos = np.cumsum(~sorted_labels)[last_of_group]
    f1 = 2 * true_pos / (2 * true_pos + false_pos + (labels.sum() - true_pos))
    best = int(np.argmax(f1))
    return float(sorted_scores[last_of_group][best]), float(f1[best])


def classification_at(labels, scores, threshold: float) -> dict:
    """Precision, recall and F1 of ``score >= threshold``; n/a with the reason where undefined."""
    labels = np.asarray(labels, dtype=bool)
    predicted = np.asarray(scores) >= threshold
    true_pos = int(np.sum(predicted & labels))
    n_predicted, n_positive = int(predicted.sum()), int(labels.sum())
    precision = (metric(true_pos / n_predicted) if n_predicted
                 else not_available("no row scores at or above the tuning threshold"))
    recall = metric(true_pos / n_positive) if n_positive else not_available("0 positives")
    if n_predicted + n_positive == 0:
        f1 = not_available("0 positives and no predicted positives")
    else:
        f1 = metric(2 * true_pos / (n_predicted + n_positive))
    return {"precision": precision, "recall": recall, "f1": f1, "predicted_positive": n_predicted}


def calibration_bins(labels, probabilities, n_bins: int) -> list[dict]:
    """Equal-count bins of predicted risk (tied edges merge bins): per bin its range, row and positive
    counts, mean predicted risk, observed rate and a 95% Wilson interval for the observed rate."""
    labels = np.asarray(labels, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    edges = np.unique(np.quantile(probabilities, np.linspace(0, 1, n_bins + 1)))
    which = np.searchsorted(edges[1:-1], probabilities, side="right")
    out = []
    for b in range(len(edges) - 1 if len(edges) > 1 else 1):
        rows = which == b
        n = int(rows.sum())
        if n == 0:
            continue
        positives = int(labels[rows].sum())
        low, high = wilson_interval(positives, n)
        out.append({
            "lower": float(edges[b]), "upper": float(edges[min(b + 1, len(edges) - 1)]),
            "rows": n, "positives": positives,
            "mean_predicted": float(probabilities[rows].mean()),
            "observed_rate": positives / n, "observed_ci": [low, high],
        })
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (z for 95%)."""
    if n == 0:
        return float("nan"), float("nan")
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval always holds the observed rate (at 0 or 1 rounding could put a bound past it)
    return max(0.0, min(rate, centre - half)), min(1.0, max(rate, centre + half))


# --------------------------------------------------------------------------------------------------------
# Row weights and plot curves


def subject_weights(subject_ids: np.ndarray) -> np.ndarray:
    """1 / (rows of the subject) per row, so each subject weighs 1 in total."""
    _, inverse, rows_per_subject = np.unique(subject_ids, return_inverse=True, return_counts=True)
    return 1.0 / rows_per_subject[inverse]


def roc_pr_curves(labels: np.ndarray, scores: np.ndarray, max_points: int) -> dict:
    """ROC and precision-recall curves at every distinct threshold, thinned to about ``max_points``."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_group = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_pos = np.cumsum(sorted_labels)[last_of_group].astype(float)
    false_pos = np.cumsum(~sorted_labels)[last_of_group].astype(float)
    keep = np.unique(np.linspace(0, len(true_pos) - 1, min(len(true_pos), max_points)).round().astype(int))
    tpr = true_pos / true_pos[-1]
    fpr = false_pos / false_pos[-1]
    precision = true_pos / (true_pos + false_pos)
    return {
        "roc": {"fpr": [0.0, *fpr[keep].tolist()], "tpr": [0.0, *tpr[keep].tolist()]},
        "pr": {"recall": [0.0, *tpr[keep].tolist()], "precision": [float(precision[keep][0]), *precision[keep].tolist()]},
    }
