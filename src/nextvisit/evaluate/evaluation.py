"""`nextvisit evaluate`: honest metrics for one or more prediction folders (docs/interfaces.md §6).

Per task and horizon, one table row per model, on the ``held_out`` split:

- AUROC and AUPRC with 95% CIs from stratified bootstrap resamples (positives and negatives resampled
  separately, so every resample keeps the evaluation set's class counts);
- F1, precision and recall at the threshold that maximises F1 on the ``tuning`` split;
- Brier score and a binned calibration curve with counts;
- age-sex-stratified AUROC: AUROC over the (positive, negative) pairs that share an age band and sex;
- sample-weighted (every row counts once) and subject-weighted (a subject's rows share weight 1) AUROC/AUPRC;
- positives, negatives and censored counts;
- with an ``oracle`` model for the same task and horizon: each model's share of the oracle's margin over
  chance, (AUROC - 0.5) / (oracle AUROC - 0.5).

Tasks named ``<task>_next_visit`` with a ``prior_occurrence`` column also get the inflation analysis: AUROC on
all rows ("all occurrences", recurrences included) beside AUROC on ``prior_occurrence == False`` rows ("new
onsets"). A metric that cannot be computed is ``null`` with a ``reason`` (shown as "n/a (reason)"), never a
crash. The method is written down in docs/evaluation.md.

Every AUROC/AUPRC here, point estimate or resample, comes from one weighted rank computation
(`RankIndex`): a bootstrap resample is a vector of multiplicities over the original rows, so 1,000 resamples
are one matrix pass instead of 1,000 sorts.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from nextvisit.artifacts.predictions import (
    LABEL, ORACLE, PROBABILITY, ModelPredictions, find_prediction_files,
    read_predictions,
)
from nextvisit.errors import UserError

PRIOR_OCCURRENCE = "prior_occurrence"
NEXT_VISIT_SUFFIX = "_next_visit"


@dataclass
class EvaluationConfig:
    """Every number with meaning in the evaluation."""

    n_bootstrap: int = 1000  # the paper's 1,000 stratified resamples
    seed: int = 0
    confidence: float = 0.95  # percentile bootstrap interval
    report_split: str = "held_out"
    threshold_split: str = "tuning"  # only used to pick the F1 threshold
    # Age bands for the stratified AUROC: 5-year bands where incidence of the demo's conditions climbs
    # steeply (dementia, knee OA), wider bands below 50. Upper edges are exclusive.
    age_band_edges: tuple[float, ...] = (0, 18, 30, 40, 50, 55, 60, 65, 70, 75, 80, 85, 90, 200)
    calibration_bins: int = 10  # equal-count (quantile) bins of predicted risk
    # Below this many positives a bootstrap interval says little (a handful of cases are resampled); warn.
    min_positives_for_ci: int = 10
    max_curve_points: int = 400  # ROC / PR curves are thinned to this many points for the plots
    # Bootstrap work is done in blocks of at most this many resample x row cells (memory bound, ~16 MB each).
    bootstrap_block_cells: int = 2_000_000


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


def format_metric(m: dict | None, digits: int = 3, with_ci: bool = True) -> str:
    """The one way a metric is shown, in the report and on stdout.

    >>> format_metric({"value": 0.81234, "ci": [0.8, 0.83], "reason": None})
    '0.812 [0.800, 0.830]'
    >>> format_metric({"value": None, "ci": None, "reason": "0 positives"})
    'n/a (0 positives)'
    """
    if m is None:
        return "n/a"
    if m.get("value") is None:
        return f"n/a ({m['reason']})" if m.get("reason") else "n/a"
    text = f"{m['value']:.{digits}f}"
    if with_ci and m.get("ci"):
        text += f" [{m['ci'][0]:.{digits}f}, {m['ci'][1]:.{digits}f}]"
    return text


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


def class_multiplicities(n_positive: int, n_negative: int, n_resamples: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """How often each positive ([n_resamples, n_positive]) and each negative ([n_resamples, n_negative]) is
    drawn in a stratified bootstrap resample: positives resampled with replacement among themselves, and
    negatives among themselves, so every resample keeps the class counts."""
    out = []
    for n in (n_positive, n_negative):
        drawn = rng.integers(0, max(n, 1), size=(n_resamples, n))
        flat = (drawn + np.arange(n_resamples)[:, None] * n).ravel()
        out.append(np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64))
    return out[0], out[1]


def bootstrap_multiplicities(labels: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n]: `class_multiplicities` placed back in row order."""
    labels = np.asarray(labels, dtype=bool)
    positive, negative = class_multiplicities(int(labels.sum()), int((~labels).sum()), n_resamples, rng)
    counts = np.zeros((n_resamples, len(labels)))
    counts[:, labels], counts[:, ~labels] = positive, negative
    return counts


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


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
# Inputs


def repeat_setting(config: dict) -> str:
    """The repeat-regularization setting recorded in a model's config, for the tables: every key whose name
    mentions 'repeat', as ``key=value``; 'not recorded' when none does.

    >>> repeat_setting({"loss": {"repeat_decay": 0.5, "repeat_floor": 0.1, "gamma": 2}})
    'repeat_decay=0.5, repeat_floor=0.1'
    """
    found = [(k, v) for k, v in _flatten(config) if "repeat" in k.split(".")[-1].lower()]
    if not found:
        return "not recorded"
    text = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in found)
    # A decay of 1 keeps every repeated positive at full weight: no repeat regularization.
    off = any(k.split(".")[-1] == "repeat_decay" and v == 1 for k, v in found)
    return f"off ({text})" if off else text


def _flatten(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def censored_count(label_counts: dict, task: str, horizon: int, split: str) -> tuple[int | None, str]:
    """Censored label rows for (task, horizon, split) from an info.json ``label_counts`` in the shape every
    predictions writer records (``nextvisit.tasks.label_counts``: ``{"task@H": {split: {"censored": n}}}``):
    (count, split), or (None, reason) when it records none."""
    if not isinstance(label_counts, dict) or not label_counts:
        return None, "info.json has no label_counts"
    node = label_counts.get(f"{task}@{horizon}", {}).get(split, {})
    if not isinstance(node, dict) or not isinstance(node.get("censored"), int):
        return None, "info.json label_counts records no censored count for this task, horizon and split"
    return int(node["censored"]), split


# --------------------------------------------------------------------------------------------------------
# Evaluation of one model on one task and horizon


@dataclass
class _Prepared:
    """Clean held-out and tuning arrays for one ModelPredictions, with what was excluded."""

    labels: np.ndarray
    scores: np.ndarray
    subject_ids: np.ndarray
    keys: np.ndarray | None  # (subject_id, prediction_time) per held-out row, for "same cohort" checks
    ages: np.ndarray | None
    sexes: np.ndarray | None
    prior: np.ndarray | None
    tuning_labels: np.ndarray
    tuning_scores: np.ndarray
    counts: dict
    no_labels: str | None


def _prepare(pred: ModelPredictions, config: EvaluationConfig, warnings: list[str]) -> _Prepared:
    frame = pred.frame
    where = f"{pred.source} ({pred.task}, {pred.horizon_days} days)"
    counts = {"rows": frame.height}
    no_labels = None
    if LABEL not in frame.columns:
        no_labels = "no labels: column boolean_value is missing"
        frame = frame.with_columns(pl.lit(None, dtype=pl.Boolean).alias(LABEL))
    for column, dtype in ((LABEL, pl.Boolean), (PROBABILITY, pl.Float64)):
        try:
            frame = frame.with_columns(pl.col(column).cast(dtype))
        except pl.exceptions.PolarsError:
            raise UserError(f"{pred.source}: column {column} has type {frame.schema[column]}, expected "
                            f"{dtype}; rewrite the predictions (docs/interfaces.md §6)") from None
    unlabelled = frame.filter(pl.col(LABEL).is_null())
    counts["unlabelled_rows_excluded"] = unlabelled.height
    if "reason" in frame.columns:
        counts["censored_rows_in_file"] = unlabelled.filter(pl.col("reason").cast(pl.Utf8).str.starts_with("censored")).height
    if unlabelled.height and no_labels is None:
        if unlabelled.height == frame.height:
            no_labels = "no labels: boolean_value is null in every row"
        warnings.append(f"{where}: {unlabelled.height} row(s) with null boolean_value excluded (no label)")
    bad_score = frame.filter(pl.col(LABEL).is_not_null()
                             & (pl.col(PROBABILITY).is_null() | pl.col(PROBABILITY).is_nan()))
    counts["missing_score_rows_excluded"] = bad_score.height
    if bad_score.height:
        warnings.append(f"{where}: {bad_score.height} labelled row(s) with a null/NaN {PROBABILITY} excluded")
    frame = frame.filter(pl.col(LABEL).is_not_null() & pl.col(PROBABILITY).is_not_null()
                         & pl.col(PROBABILITY).is_not_nan())
    splits = frame["split"].value_counts()
    counts["other_split_rows_ignored"] = int(
        splits.filter(~pl.col("split").is_in([config.report_split, config.threshold_split]))["count"].sum() or 0)

    sort_keys = ["subject_id"] + (["prediction_time"] if "prediction_time" in frame.columns else [])
    held = frame.filter(pl.col("split") == config.report_split).sort(sort_keys, maintain_order=True)
    tuning = frame.filter(pl.col("split") == config.threshold_split)
    keys = None
    if "prediction_time" in held.columns:
        keys = np.column_stack([held["subject_id"].cast(pl.Int64).to_numpy(),
                                held["prediction_time"].cast(pl.Int64).fill_null(-1).to_numpy()])
    ages = held["age_years"].cast(pl.Float64).to_numpy() if "age_years" in held.columns else None
    sexes = held["sex"].cast(pl.Utf8).to_numpy() if "sex" in held.columns else None
    prior = None
    if PRIOR_OCCURRENCE in held.columns:
        prior = held[PRIOR_OCCURRENCE].cast(pl.Boolean).to_numpy()
    return _Prepared(
        labels=held[LABEL].to_numpy().astype(bool), scores=held[PROBABILITY].to_numpy(),
        subject_ids=held["subject_id"].to_numpy(), keys=keys, ages=ages, sexes=sexes, prior=prior,
        tuning_labels=tuning[LABEL].to_numpy().astype(bool), tuning_scores=tuning[PROBABILITY].to_numpy(),
        counts=counts, no_labels=no_labels,
    )


def _class_problem(labels: np.ndarray, split: str) -> str | None:
    n_pos = int(labels.sum())
    if len(labels) == 0:
        return f"no labelled {split} rows"
    if n_pos == 0:
        return f"{split} has 0 positives among {len(labels)} rows"
    if n_pos == len(labels):
        return f"{split} has 0 negatives among {len(labels)} rows"
    return None


def _age_sex_strata(p: _Prepared, config: EvaluationConfig) -> tuple[np.ndarray | None, str | None]:
    """Stratum label per held-out row ('' = excluded for a missing age or sex), or (None, reason)."""
    if p.ages is None or p.sexes is None:
        return None, "no age_years/sex columns"
    known = np.isfinite(p.ages) & np.array([s is not None for s in p.sexes], dtype=bool)
    band = np.searchsorted(np.asarray(config.age_band_edges), np.nan_to_num(p.ages), side="right")
    strata = np.array([f"{b}|{s}" if k else "" for b, s, k in zip(band, p.sexes, known)], dtype=object)
    return strata, None


class _Resampled:
    """Collects per-resample values of several rank metrics over blocks of bootstrap resamples."""

    def __init__(self):
        self.values: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        self.values.setdefault(name, []).append(values)

    def get(self, name: str) -> np.ndarray:
        return np.concatenate(self.values[name]) if name in self.values else np.array([])


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _rng_for(config: EvaluationConfig, task: str, horizon: int, subset: str) -> np.random.Generator:
    """The same stream for every model of one (task, horizon): identical cohorts get identical resamples,
    so paired comparisons (oracle share) are possible."""
    return np.random.default_rng([config.seed, zlib.crc32(task.encode()), horizon, zlib.crc32(subset.encode())])


def _bootstrap(labels, scores, config: EvaluationConfig, rng, weightings: dict[str, np.ndarray | None],
               strata: np.ndarray | None, subsets: dict[str, np.ndarray]) -> _Resampled:
    """Stratified bootstrap of AUROC/AP: ``weightings`` maps a name to per-row weights (multiplied by the
    resample multiplicities; None = 1 per row), ``strata`` adds the within-stratum AUROC, ``subsets`` adds
    AUROC on a row subset of the same resamples (for paired differences)."""
    index = RankIndex(labels, scores)
    n_positive, n_negative = len(index.positive_rows), len(index.negative_rows)
    # Row -> its position among the rows of its class, to cut strata and subsets out of the class matrices.
    class_position = np.empty(len(labels), dtype=np.int64)
    class_position[index.positive_rows] = np.arange(n_positive)
    class_position[index.negative_rows] = np.arange(n_negative)

    def part(rows: np.ndarray):
        positive = rows[labels[rows]]
        return class_position[positive], class_position[rows[~labels[rows]]], RankIndex(labels[rows], scores[rows])

    parts = {}
    if strata is not None:
        for s in np.unique(strata):
            rows = np.flatnonzero(strata == s)
            if s != "" and labels[rows].any() and not labels[rows].all():
                parts[("stratum", s)] = part(rows)
    for name, mask in subsets.items():
        parts[("subset", name)] = part(np.flatnonzero(mask))
    class_weights = {name: None if w is None else (w[index.positive_rows], w[index.negative_rows])
                     for name, w in weightings.items()}

    out = _Resampled()
    block = max(1, min(config.n_bootstrap, config.bootstrap_block_cells // max(1, len(labels))))
    done = 0
    while done < config.n_bootstrap:
        size = min(block, config.n_bootstrap - done)
        positive, negative = class_multiplicities(n_positive, n_negative, size, rng)
        for name, weights in class_weights.items():
            if weights is None:
                concordant, pairs, ap = index.class_sums(positive, negative)
            else:
                concordant, pairs, ap = index.class_sums(positive * weights[0], negative * weights[1])
            out.add(f"{name}.auroc", _ratio(concordant, pairs))
            out.add(f"{name}.auprc", ap)
        stratified = np.zeros((2, size))
        for (kind, name), (positions_pos, positions_neg, sub) in parts.items():
            concordant, pairs, _ = sub.class_sums(positive[:, positions_pos], negative[:, positions_neg])
            if kind == "stratum":
                stratified += (concordant, pairs)
            else:
                out.add(f"{name}.auroc", _ratio(concordant, pairs))
        if any(kind == "stratum" for kind, _ in parts):
            out.add("stratified.auroc", _ratio(stratified[0], stratified[1]))
        done += size
    return out


def _evaluate_model(pred: ModelPredictions, config: EvaluationConfig, warnings: list[str]) -> tuple[dict, dict]:
    """(table row, plot data) for one model on one task and horizon."""
    p = _prepare(pred, config, warnings)
    split = config.report_split
    n_pos, n_neg = int(p.labels.sum()), int((~p.labels).sum())
    censored, censored_scope = censored_count(pred.label_counts, pred.task, pred.horizon_days, split)
    if censored is None and p.counts.get("censored_rows_in_file"):
        censored, censored_scope = p.counts["censored_rows_in_file"], "rows in the predictions file"
    if censored is None and pred.task.endswith(NEXT_VISIT_SUFFIX):
        censored_scope = "not applicable: every scored visit boundary has an observed next visit"
    if 0 < n_pos < config.min_positives_for_ci:
        warnings.append(f"{pred.name} on {pred.task} at {pred.horizon_days} days: only {n_pos} {split} positives; "
                        "its intervals rest on very few cases")
    row = {
        "model": pred.name, "kind": pred.kind, "source": pred.source, "is_oracle": pred.kind == ORACLE,
        "repeat_regularization": repeat_setting(pred.config),
        "counts": {
            "positives": n_pos, "negatives": n_neg, "rows": len(p.labels),
            "subjects": int(len(np.unique(p.subject_ids))),
            "censored": ({"value": int(censored), "ci": None, "reason": None} if censored is not None
                         else not_available(censored_scope)),
            "censored_scope": censored_scope if censored is not None else None,
            "tuning_rows": len(p.tuning_labels), "tuning_positives": int(p.tuning_labels.sum()),
            **{k: v for k, v in p.counts.items() if k != "rows"},
            "rows_in_file": p.counts["rows"],
        },
    }
    plot = {"model": pred.name, "kind": pred.kind}
    problem = p.no_labels or _class_problem(p.labels, split)
    rank_names = ("auroc", "auprc", "auroc_subject_weighted", "auprc_subject_weighted", "auroc_age_sex_stratified")
    if problem:
        for name in rank_names:
            row[name] = not_available(problem)
    else:
        subject_weights = _subject_weights(p.subject_ids)
        strata, strata_problem = _age_sex_strata(p, config)
        ones = np.ones(len(p.labels))
        concordant, pairs, ap = RankIndex(p.labels, p.scores).pair_sums(np.vstack([ones, subject_weights]))
        # Next-visit tasks: new-onset AUROC on the same resamples, for the paired inflation difference.
        subsets = {"new_onsets": ~p.prior} if pred.task.endswith(NEXT_VISIT_SUFFIX) and p.prior is not None else {}
        boot = _bootstrap(p.labels, p.scores, config, _rng_for(config, pred.task, pred.horizon_days, "all"),
                          {"sample": None, "subject": subject_weights}, strata, subsets)
        row["auroc"] = metric(concordant[0] / pairs[0], percentile_interval(boot.get("sample.auroc"), config.confidence))
        row["auprc"] = metric(ap[0], percentile_interval(boot.get("sample.auprc"), config.confidence))
        row["auroc_subject_weighted"] = metric(concordant[1] / pairs[1],
                                               percentile_interval(boot.get("subject.auroc"), config.confidence))
        row["auprc_subject_weighted"] = metric(ap[1], percentile_interval(boot.get("subject.auprc"), config.confidence))
        row["_boot_auroc"] = boot.get("sample.auroc")
        row["_boot_new_onset_auroc"] = boot.get("new_onsets.auroc")
        if strata is None:
            row["auroc_age_sex_stratified"] = not_available(strata_problem)
        else:
            known = strata != ""
            value = stratified_auroc(p.labels[known], p.scores[known], strata[known])
            if np.isfinite(value):
                row["auroc_age_sex_stratified"] = metric(value, percentile_interval(boot.get("stratified.auroc"),
                                                                                    config.confidence))
            else:
                row["auroc_age_sex_stratified"] = not_available("no age-sex stratum holds both classes")
            row["counts"]["age_sex_rows_excluded"] = int((~known).sum())
            row["counts"]["age_sex_strata_used"] = int(sum(
                1 for s in np.unique(strata[known]) if 0 < p.labels[strata == s].sum() < (strata == s).sum()))
        plot.update(_curves(p.labels, p.scores, config.max_curve_points))
        plot["auroc"], plot["auprc"], plot["prevalence"] = row["auroc"]["value"], row["auprc"]["value"], n_pos / len(p.labels)

    # Calibration and Brier need labels and scores that are probabilities, not both classes.
    if p.no_labels or len(p.labels) == 0:
        reason = p.no_labels or f"no labelled {split} rows"
        row["brier"] = not_available(reason)
        row["calibration"] = not_available(reason)
    elif p.scores.min() < 0 or p.scores.max() > 1:
        reason = f"scores outside [0, 1] ({p.scores.min():.3g} to {p.scores.max():.3g}) are not probabilities"
        row["brier"] = not_available(reason)
        row["calibration"] = not_available(reason)
    else:
        row["brier"] = metric(np.mean((p.scores - p.labels) ** 2))
        bins = calibration_bins(p.labels, p.scores, config.calibration_bins)
        row["calibration"] = {"value": None, "ci": None, "reason": None, "bins": bins,
                              "strategy": f"{config.calibration_bins} equal-count bins of predicted risk"}
        row["mean_predicted"] = metric(np.mean(p.scores))
        row["observed_rate"] = metric(np.mean(p.labels))
        plot["calibration"] = bins

    # F1 at the tuning split's best threshold, applied to held_out.
    if p.no_labels:
        tuning_problem = p.no_labels
    elif len(p.tuning_labels) == 0:
        tuning_problem = f"no labelled {config.threshold_split} rows to pick the threshold"
    elif not p.tuning_labels.any():
        tuning_problem = f"{config.threshold_split} has 0 positives, so no F1 threshold"
    else:
        tuning_problem = None
    if tuning_problem:
        for name in ("threshold", "f1", "precision", "recall"):
            row[name] = not_available(tuning_problem)
    else:
        threshold, tuning_f1 = best_f1_threshold(p.tuning_labels, p.tuning_scores)
        row["threshold"] = metric(threshold)
        row["threshold"]["tuning_f1"] = tuning_f1
        if len(p.labels) == 0:
            for name in ("f1", "precision", "recall"):
                row[name] = not_available(f"no labelled {split} rows")
        else:
            at = classification_at(p.labels, p.scores, threshold)
            row.update(precision=at["precision"], recall=at["recall"], f1=at["f1"])
            row["counts"]["predicted_positive"] = at["predicted_positive"]

    row["_keys"] = p.keys
    row["_prepared"] = p
    return row, plot


def _subject_weights(subject_ids: np.ndarray) -> np.ndarray:
    """1 / (rows of the subject) per row, so each subject weighs 1 in total."""
    _, inverse, rows_per_subject = np.unique(subject_ids, return_inverse=True, return_counts=True)
    return 1.0 / rows_per_subject[inverse]


def _curves(labels: np.ndarray, scores: np.ndarray, max_points: int) -> dict:
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


# --------------------------------------------------------------------------------------------------------
# All models, all tasks


def _same_cohort(a: dict, b: dict) -> bool:
    ka, kb = a.get("_keys"), b.get("_keys")
    pa, pb = a["_prepared"], b["_prepared"]
    if ka is None or kb is None or len(ka) != len(kb):
        return False
    return bool(np.array_equal(ka, kb) and np.array_equal(pa.labels, pb.labels))


def _oracle_shares(rows: list[dict], config: EvaluationConfig, warnings: list[str], where: str) -> str | None:
    oracles = [r for r in rows if r["is_oracle"]]
    if not oracles:
        for r in rows:
            r["oracle_share"] = not_available("no oracle model for this task and horizon")
        return None
    oracle = oracles[0]
    if len(oracles) > 1:
        warnings.append(f"{where}: {len(oracles)} oracle models; shares are relative to {oracle['model']!r}")
    oracle_auroc = oracle["auroc"]["value"]
    for r in rows:
        if r is oracle:
            r["oracle_share"] = not_available("this is the oracle (reference)")
            continue
        if r["auroc"]["value"] is None:
            r["oracle_share"] = not_available(f"AUROC is n/a: {r['auroc']['reason']}")
        elif oracle_auroc is None:
            r["oracle_share"] = not_available(f"oracle AUROC is n/a: {oracle['auroc']['reason']}")
        elif oracle_auroc <= 0.5:
            r["oracle_share"] = not_available(f"oracle AUROC {oracle_auroc:.3f} is not above chance")
        else:
            share = (r["auroc"]["value"] - 0.5) / (oracle_auroc - 0.5)
            ci = None
            if _same_cohort(r, oracle):
                with np.errstate(invalid="ignore", divide="ignore"):
                    margin = oracle["_boot_auroc"] - 0.5
                    paired = np.where(margin > 0, (r["_boot_auroc"] - 0.5) / np.where(margin > 0, margin, 1), np.nan)
                ci = percentile_interval(paired, config.confidence)
            else:
                warnings.append(f"{where}: {r['model']!r} and the oracle were evaluated on different rows; "
                                "its oracle share has no confidence interval")
            r["oracle_share"] = metric(share, ci)
    return oracle["model"]


def _inflation(task: str, horizon: int, rows: list[dict], config: EvaluationConfig, warnings: list[str]) -> dict:
    """AUROC on all occurrences vs new onsets (prior_occurrence == False), per model."""
    models = []
    for r in rows:
        p: _Prepared = r["_prepared"]
        entry = {"model": r["model"], "kind": r["kind"], "repeat_regularization": r["repeat_regularization"],
                 "all_occurrences": {"auroc": r["auroc"], "positives": int(p.labels.sum()),
                                     "negatives": int((~p.labels).sum())}}
        if p.prior is None:
            reason = f"no {PRIOR_OCCURRENCE} column"
            entry["new_onsets"] = {"auroc": not_available(reason)}
            entry["difference"] = not_available(reason)
            models.append(entry)
            continue
        new = ~p.prior
        labels, scores = p.labels[new], p.scores[new]
        entry["new_onsets"] = {"positives": int(labels.sum()), "negatives": int((~labels).sum())}
        if 0 < labels.sum() < config.min_positives_for_ci:
            warnings.append(f"{r['model']} on {task}: only {int(labels.sum())} new-onset {config.report_split} "
                            "positives; the new-onset interval rests on very few cases")
        entry["recurrence_share_of_positives"] = (
            metric(float(p.labels[p.prior].sum()) / p.labels.sum()) if p.labels.sum() else not_available("0 positives"))
        problem = p.no_labels or _class_problem(labels, f"{config.report_split} new-onset")
        if problem:
            entry["new_onsets"]["auroc"] = not_available(problem)
            entry["difference"] = not_available(problem)
        else:
            rng = _rng_for(config, task, horizon, "new_onsets")
            boot = _bootstrap(labels, scores, config, rng, {"sample": None}, None, {})
            value = auroc(labels, scores)
            entry["new_onsets"]["auroc"] = metric(value, percentile_interval(boot.get("sample.auroc"), config.confidence))
            if r["auroc"]["value"] is None:
                entry["difference"] = not_available(r["auroc"]["reason"])
            else:
                # Paired: AUROC on all rows minus AUROC on the new-onset rows of the same resamples.
                diff = r["_boot_auroc"] - r["_boot_new_onset_auroc"]
                entry["difference"] = metric(r["auroc"]["value"] - value, percentile_interval(diff, config.confidence))
        models.append(entry)
    return {"task": task, "models": models}


def _disambiguate(entries: list[ModelPredictions], warnings: list[str]) -> None:
    """The same model name twice for one task and horizon: both are kept, renamed after their folders."""
    by_group: dict[tuple, list[ModelPredictions]] = {}
    for e in entries:
        by_group.setdefault((e.task, e.horizon_days, e.name), []).append(e)
    for (task, horizon, name), same in by_group.items():
        if len(same) < 2:
            continue
        sources = [e.source for e in same]
        warnings.append(f"model {name!r} appears {len(same)} times for {task} at {horizon} days ({', '.join(sources)}); "
                        "kept apart as '<name> [<folder>]'")
        used = set()
        for i, e in enumerate(same):
            label = f"{name} [{Path(e.source).name}]"
            if label in used:
                label = f"{name} [{i + 1}]"
            used.add(label)
            e.name = label


def evaluate(prediction_paths, out_dir, n_bootstrap: int = 1000, seed: int = 0,
             config: EvaluationConfig | None = None, progress: bool = True) -> dict:
    """Evaluate prediction folders/files and write ``out_dir/metrics.json``, ``report.html`` and its plots.
    Returns the metrics (the content of metrics.json)."""
    from tqdm import tqdm

    from nextvisit import __version__
    from nextvisit.evaluate.report import write_report

    config = config or EvaluationConfig(n_bootstrap=n_bootstrap, seed=seed)
    if isinstance(prediction_paths, (str, Path)):
        prediction_paths = [prediction_paths]
    if not prediction_paths:
        raise UserError("no predictions given; pass one or more prediction folders")
    warnings: list[str] = []
    files: list[Path] = []
    for path in prediction_paths:
        for file in find_prediction_files(Path(path)):
            if file.resolve() not in {f.resolve() for f in files}:
                files.append(file)
    entries: list[ModelPredictions] = []
    inputs = []
    for file in files:
        loaded = read_predictions(file, warnings)
        entries += loaded
        inputs.append({"file": str(file), "model": loaded[0].name if loaded else None,
                       "kind": loaded[0].kind if loaded else None,
                       "task_horizons": [[e.task, e.horizon_days] for e in loaded]})
    _disambiguate(entries, warnings)

    groups: dict[tuple[str, int], list[ModelPredictions]] = {}
    for e in entries:
        groups.setdefault((e.task, e.horizon_days), []).append(e)
    for key in groups:  # the oracle first, then models in the order given
        groups[key].sort(key=lambda e: e.kind != ORACLE)

    tasks, inflation, plots, models = [], [], [], {}
    bar = tqdm(total=len(entries), desc="evaluate", unit="model", file=sys.stderr, disable=not progress)
    for (task, horizon), group in sorted(groups.items()):
        where = f"{task} at {horizon} days"
        rows, curves = [], []
        for e in group:
            bar.set_postfix_str(f"{task}@{horizon} {e.name}")
            row, curve = _evaluate_model(e, config, warnings)
            rows.append(row)
            curves.append(curve)
            model = models.setdefault(e.name, {"kind": e.kind, "repeat_regularization": row["repeat_regularization"],
                                               "sources": [], "configs": []})
            if e.source not in model["sources"]:
                model["sources"].append(e.source)
            if e.config not in model["configs"]:
                model["configs"].append(e.config)
            bar.update(1)
        oracle = _oracle_shares(rows, config, warnings, where)
        if any(not _same_cohort(r, rows[0]) for r in rows[1:]):
            sizes = ", ".join(f"{r['model']} {r['counts']['rows']}" for r in rows)
            warnings.append(f"{where}: models were not evaluated on the same {config.report_split} rows "
                            f"(rows or labels differ; row counts: {sizes}); compare them with care")
        if task.endswith(NEXT_VISIT_SUFFIX):
            inflation.append({"horizon_days": horizon, **_inflation(task, horizon, rows, config, warnings)})
        for r in rows:
            for private in [k for k in r if k.startswith("_")]:
                del r[private]
        tasks.append({"task": task, "horizon_days": horizon, "oracle": oracle, "rows": rows})
        plots.append(curves)
    bar.close()

    metrics = {
        "nextvisit_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "inputs": inputs,
        "warnings": warnings,
        "tasks": tasks,
        "inflation": inflation,
        "models": models,
    }
    metrics = _finite(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics["figures"] = write_report(metrics, plots, out_dir)
    _write_json(out_dir / "metrics.json", metrics)
    return metrics


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(payload), indent=2, default=_json_default, allow_nan=False))
    os.replace(tmp, path)


def _finite(node):
    """NaN and infinities become null: metrics.json is strict JSON."""
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite(v) for v in node]
    if isinstance(node, (float, np.floating)) and not np.isfinite(node):
        return None
    return node


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return str(value)


# --------------------------------------------------------------------------------------------------------
# The headline table


HEADLINE_COLUMNS = (
    ("model", "model"), ("kind", "kind"), ("AUROC [95% CI]", "auroc"), ("AUPRC [95% CI]", "auprc"),
    ("F1", "f1"), ("age-sex AUROC", "auroc_age_sex_stratified"), ("oracle share", "oracle_share"),
    ("pos/neg", None),
)


def _short(m: dict, with_ci: bool = True) -> str:
    """A table cell: the number, or just 'n/a' (the reason is in the report and metrics.json)."""
    return format_metric(m, with_ci=with_ci) if m and m.get("value") is not None else "n/a"


def headline_table(metrics: dict) -> str:
    """The comparison tables (and the inflation table) as plain text, for the terminal."""
    lines = []
    for group in metrics["tasks"]:
        header = f"{group['task']}, {group['horizon_days']} days"
        if group["horizon_days"] == 0:
            header = f"{group['task']} (next visit)"
        lines.append(header)
        table = [[title for title, _ in HEADLINE_COLUMNS]]
        for r in group["rows"]:
            cells = [r["model"] + (" (oracle)" if r["is_oracle"] else ""), r["kind"]]
            for _, key in HEADLINE_COLUMNS[2:-1]:
                if key == "oracle_share" and r["is_oracle"]:
                    cells.append("ref")
                else:
                    cells.append(_short(r.get(key), with_ci=key in ("auroc", "auprc")))
            cells.append(f"{r['counts']['positives']}/{r['counts']['negatives']}")
            table.append(cells)
        lines += _text_table(table)
        for r in group["rows"]:  # why each n/a is n/a, one line per model
            reasons: dict[str, list[str]] = {}
            for title, key in HEADLINE_COLUMNS[2:-1]:
                m = r.get(key)
                if not (key == "oracle_share" and r["is_oracle"]) and isinstance(m, dict) and m.get("value") is None:
                    reasons.setdefault(m.get("reason") or "undefined", []).append(title.split(" [")[0])
            if reasons:
                lines.append(f"  n/a for {r['model']}: "
                             + "; ".join(f"{', '.join(titles)}: {reason}" for reason, titles in reasons.items()))
        lines.append("")
    for block in metrics["inflation"]:
        lines.append(f"Inflation: {block['task']} (AUROC, all occurrences vs new onsets)")
        table = [["model", "repeat regularization", "all occurrences", "new onsets", "difference"]]
        for m in block["models"]:
            table.append([m["model"], m["repeat_regularization"], _short(m["all_occurrences"]["auroc"]),
                          _short(m["new_onsets"]["auroc"]), _short(m["difference"])])
        lines += _text_table(table)
        lines.append("")
    if metrics["warnings"]:
        lines.append(f"{len(metrics['warnings'])} warning(s); see metrics.json or the report")
    return "\n".join(lines).rstrip() + "\n"


def _text_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out


def run_cli(args) -> int:
    metrics = evaluate(args.predictions, args.out, n_bootstrap=args.bootstrap, seed=args.seed)
    for warning in metrics["warnings"]:
        sys.stderr.write(f"warning: {warning}\n")
    sys.stdout.write(headline_table(metrics))
    sys.stdout.write(f"\nReport: {(Path(args.out) / 'report.html').resolve()}\n")
    return 0
