"""`nextvisit evaluate`: honest metrics for one or more prediction folders (docs/interfaces.md §6).

Contract: `evaluate` reads prediction folders/files through `nextvisit.artifacts.predictions`, evaluates
every model per (task, horizon) and writes ``metrics.json`` (returned as a dict) and, through
`nextvisit.evaluate.report`, ``report.html`` with its plots, all of them or none (``nextvisit.artifacts.folders``);
`run_cli` is ``nextvisit evaluate``. This module
decides which rows are scored and which metric goes where (the driver); the numbers come from
`nextvisit.evaluate.metrics` and `nextvisit.evaluate.bootstrap`, their text from `nextvisit.evaluate.tables`.
Bad input raises `UserError` naming the path; a metric that cannot be computed is ``null`` with a
``reason`` (shown as "n/a (reason)"), never a crash.

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
onsets"). The method is written down in docs/evaluation.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from nextvisit.artifacts.folders import atomic_folder, check_out
from nextvisit.artifacts.predictions import (
    CENSORING_WEIGHT, DAYS_AFTER_HORIZON, LABEL, ORACLE, PROBABILITY, HeldPredictions, ModelPredictions,
    find_prediction_files, read_predictions,
)
from nextvisit.errors import UserError
from nextvisit.evaluate.bootstrap import METHOD, View, percentile_interval, rng_for, subject_bootstrap
from nextvisit.evaluate.metrics import (
    auroc, average_precision, best_f1_threshold, calibration_bins, classification_at, metric, not_available,
    roc_pr_curves, stratified_auroc, subject_weights,
)
from nextvisit.evaluate.report import write_report
from nextvisit.evaluate.tables import headline_table

PRIOR_OCCURRENCE = "prior_occurrence"
NEXT_VISIT_SUFFIX = "_next_visit"


@dataclass
class EvaluationConfig:
    """Every number with meaning in the evaluation."""

    n_bootstrap: int = 1000  # 1,000 subject-level resamples, stratified by subject outcome
    seed: int = 0
    confidence: float = 0.95  # percentile bootstrap interval
    interval_method: str = METHOD
    report_split: str = "held_out"
    threshold_split: str = "tuning"  # only used to pick the F1 threshold
    # Age bands for the stratified AUROC: 5-year bands where incidence of the demo's conditions climbs
    # steeply (dementia, knee OA), wider bands below 50. Upper edges are exclusive.
    age_band_edges: tuple[float, ...] = (0, 18, 30, 40, 50, 55, 60, 65, 70, 75, 80, 85, 90, 200)
    calibration_bins: int = 10  # equal-count (quantile) bins of predicted risk
    # Below this many positive subjects a bootstrap interval says little (a handful of cases are resampled); warn.
    min_positive_subjects_for_ci: int = 10
    # The sensitivity analysis drops landmarks whose horizon ends within this many days of the data end, where
    # censoring is heaviest (a record has little time left to show the subject was still there).
    final_days_excluded: int = 365
    max_curve_points: int = 400  # ROC / PR curves are thinned to this many points for the plots
    # Bootstrap work is done in blocks of at most this many resample x row cells (memory bound, ~16 MB each).
    bootstrap_block_cells: int = 2_000_000


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
    weights: np.ndarray | None  # the labels' censoring weights (nextvisit.tasks.censoring), None when absent
    weights_problem: str | None  # why there are no usable weights
    days_after_horizon: np.ndarray | None  # days of data after each row's horizon (NaN: no data end)
    tuning_labels: np.ndarray
    tuning_scores: np.ndarray
    tuning_subject_ids: np.ndarray
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
    weights, weights_problem = _censoring_weights(held)
    days_after = None
    if DAYS_AFTER_HORIZON in held.columns:
        days_after = held[DAYS_AFTER_HORIZON].cast(pl.Float64).fill_null(np.nan).to_numpy()
    return _Prepared(
        labels=held[LABEL].to_numpy().astype(bool), scores=held[PROBABILITY].to_numpy(),
        subject_ids=held["subject_id"].to_numpy(), keys=keys, ages=ages, sexes=sexes, prior=prior,
        weights=weights, weights_problem=weights_problem, days_after_horizon=days_after,
        tuning_labels=tuning[LABEL].to_numpy().astype(bool), tuning_scores=tuning[PROBABILITY].to_numpy(),
        tuning_subject_ids=tuning["subject_id"].to_numpy(), counts=counts, no_labels=no_labels,
    )


def _censoring_weights(held: pl.DataFrame) -> tuple[np.ndarray | None, str | None]:
    """The held-out rows' censoring weights, or (None, why not)."""
    if CENSORING_WEIGHT not in held.columns:
        return None, ("the labels carry no censoring weights (`nextvisit label` with a nextvisit task fits the "
                      "censoring model on train; labels from an ACES config or another tool have none)")
    weights = held[CENSORING_WEIGHT].cast(pl.Float64).fill_null(np.nan).to_numpy()
    bad = int((~np.isfinite(weights) | (weights <= 0)).sum())
    if bad:
        return None, f"{bad} labelled row(s) have no finite positive censoring weight"
    return weights, None


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


def _evaluate_model(pred: ModelPredictions, config: EvaluationConfig, warnings: list[str]) -> tuple[dict, dict]:
    """(table row, plot data) for one model on one task and horizon."""
    p = _prepare(pred, config, warnings)
    row = _model_row(pred, p, config, warnings)
    plot = {"model": pred.name, "kind": pred.kind}
    _rank_metrics(pred, p, config, row, plot, warnings)
    _calibration_metrics(p, config, row, plot)
    _threshold_metrics(p, config, row)
    row["_keys"] = p.keys
    row["_prepared"] = p
    return row, plot


def _positive_subjects(labels: np.ndarray, subject_ids: np.ndarray) -> int:
    return int(len(np.unique(subject_ids[labels]))) if len(labels) else 0


def _model_row(pred: ModelPredictions, p: _Prepared, config: EvaluationConfig, warnings: list[str]) -> dict:
    """The table row's identity and counts, before any metric."""
    split = config.report_split
    n_pos, n_neg = int(p.labels.sum()), int((~p.labels).sum())
    n_subjects = int(len(np.unique(p.subject_ids)))
    positive_subjects = _positive_subjects(p.labels, p.subject_ids)
    censored, censored_scope = censored_count(pred.label_counts, pred.task, pred.horizon_days, split)
    if censored is None and p.counts.get("censored_rows_in_file"):
        censored, censored_scope = p.counts["censored_rows_in_file"], "rows in the predictions file"
    if censored is None and pred.task.endswith(NEXT_VISIT_SUFFIX):
        censored_scope = "not applicable: every scored visit boundary has an observed next visit"
    if 0 < positive_subjects < config.min_positive_subjects_for_ci:
        warnings.append(f"{pred.name} on {pred.task} at {pred.horizon_days} days: only {positive_subjects} {split} "
                        f"positive subjects ({n_pos} positive rows); its intervals rest on very few cases")
    return {
        "model": pred.name, "kind": pred.kind, "source": pred.source, "is_oracle": pred.kind == ORACLE,
        "repeat_regularization": repeat_setting(pred.config),
        "selection": _selection(pred),
        "counts": {
            "positives": n_pos, "negatives": n_neg, "rows": len(p.labels),
            "subjects": n_subjects, "positive_subjects": positive_subjects,
            "negative_subjects": n_subjects - positive_subjects,
            "censored": ({"value": int(censored), "ci": None, "reason": None} if censored is not None
                         else not_available(censored_scope)),
            "censored_scope": censored_scope if censored is not None else None,
            "tuning_rows": len(p.tuning_labels), "tuning_positives": int(p.tuning_labels.sum()),
            "tuning_positive_subjects": _positive_subjects(p.tuning_labels, p.tuning_subject_ids),
            **{k: v for k, v in p.counts.items() if k != "rows"},
            "rows_in_file": p.counts["rows"],
        },
    }


def _selection(pred: ModelPredictions) -> dict | None:
    """How the model chose its hyperparameters (info.json ``selection``, per ``task@H`` or for the model)."""
    selection = pred.info.get("selection") if isinstance(pred.info, dict) else None
    if not isinstance(selection, dict):
        return None
    if "method" in selection:  # one record for the model
        return selection
    keyed = selection.get(f"{pred.task}@{pred.horizon_days}")  # one record per task@H
    return keyed if isinstance(keyed, dict) else None


def one_landmark_per_subject(subject_ids: np.ndarray, times: np.ndarray, seed: int) -> np.ndarray:
    """A row mask keeping one row per subject, chosen by a seeded hash of (subject, prediction time), so
    every model scored on the same rows keeps the same rows.

    >>> mask = one_landmark_per_subject(np.array([1, 1, 2, 3, 3, 3]), np.arange(6), seed=0)
    >>> int(mask.sum()), sorted(set(np.array([1, 1, 2, 3, 3, 3])[mask].tolist()))
    (3, [1, 2, 3])
    """
    with np.errstate(over="ignore"):
        key = (np.asarray(subject_ids).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
               ^ (np.asarray(times).astype(np.int64).astype(np.uint64) + np.uint64(seed)) * np.uint64(0xBF58476D1CE4E5B9))
        key ^= key >> np.uint64(31)
        key *= np.uint64(0x94D049BB133111EB)
        key ^= key >> np.uint64(29)
    order = np.lexsort((key, subject_ids))
    first = np.r_[True, subject_ids[order][1:] != subject_ids[order][:-1]]
    mask = np.zeros(len(subject_ids), dtype=bool)
    mask[order[first]] = True
    return mask


def _views(pred: ModelPredictions, p: _Prepared, config: EvaluationConfig) -> dict[str, tuple[View, str | None]]:
    """Every view of the held-out rows scored on the same subject-level resamples, each with the reason it is
    n/a (None when it can be computed)."""
    probabilities = bool(len(p.scores)) and p.scores.min() >= 0 and p.scores.max() <= 1
    views = {"sample": (View(brier=probabilities), None),
             "subject": (View(weights=subject_weights(p.subject_ids)), None)}
    strata, strata_problem = _age_sex_strata(p, config)
    if strata is None:
        views["stratified"] = (View(), strata_problem)
    else:
        has_both = any(0 < p.labels[strata == s].sum() < (strata == s).sum() for s in np.unique(strata[strata != ""]))
        views["stratified"] = (View(strata=strata), None if has_both else "no age-sex stratum holds both classes")
    weights_problem = p.weights_problem
    if pred.task.endswith(NEXT_VISIT_SUFFIX):
        # Every scored boundary has its next visit observed: nothing is censored, nothing to weight.
        weights_problem = "not applicable: every scored visit boundary has an observed next visit"
    views["ipcw"] = (View(weights=p.weights, brier=probabilities), weights_problem)
    times = p.keys[:, 1] if p.keys is not None else np.zeros(len(p.labels))
    one = one_landmark_per_subject(p.subject_ids, times, config.seed)
    views["one_landmark"] = (View(rows=one), _class_problem(p.labels[one], f"{config.report_split} one-landmark"))
    if p.days_after_horizon is None or pred.task.endswith(NEXT_VISIT_SUFFIX):
        reason = (weights_problem if pred.task.endswith(NEXT_VISIT_SUFFIX) else
                  f"the predictions carry no {DAYS_AFTER_HORIZON} column (labels written before it existed)")
        views["excluding_final_year"] = (View(), reason)
        views["ipcw_excluding_final_year"] = (View(), reason)
    else:
        keep = ~(p.days_after_horizon < config.final_days_excluded)
        problem = _class_problem(p.labels[keep], f"{config.report_split} (final year excluded)")
        views["excluding_final_year"] = (View(rows=keep), problem)
        views["ipcw_excluding_final_year"] = (View(rows=keep, weights=p.weights), problem or weights_problem)
    if pred.task.endswith(NEXT_VISIT_SUFFIX) and p.prior is not None:
        new = ~p.prior
        views["new_onsets"] = (View(rows=new), _class_problem(p.labels[new], f"{config.report_split} new-onset"))
    return views


# (metrics.json name, view, metric): what each view contributes to the table row.
_RANK_FIGURES = (
    ("auroc", "sample", "auroc"), ("auprc", "sample", "auprc"),
    ("auroc_subject_weighted", "subject", "auroc"), ("auprc_subject_weighted", "subject", "auprc"),
    ("auroc_age_sex_stratified", "stratified", "auroc"),
    ("auroc_ipcw", "ipcw", "auroc"), ("auprc_ipcw", "ipcw", "auprc"),
    ("auroc_one_landmark", "one_landmark", "auroc"),
    ("auroc_excluding_final_year", "excluding_final_year", "auroc"),
    ("auroc_ipcw_excluding_final_year", "ipcw_excluding_final_year", "auroc"),
)


def _point(view: View, metric_name: str, p: _Prepared) -> float:
    rows = np.ones(len(p.labels), dtype=bool) if view.rows is None else view.rows
    labels, scores = p.labels[rows], p.scores[rows]
    weights = None if view.weights is None else view.weights[rows]
    if view.strata is not None:
        strata = np.asarray(view.strata)[rows]
        known = strata != ""
        return stratified_auroc(labels[known], scores[known], strata[known])
    if metric_name == "auroc":
        return auroc(labels, scores, weights)
    if metric_name == "auprc":
        return average_precision(labels, scores, weights)
    weights = np.ones(len(labels)) if weights is None else weights
    return float(np.sum(weights * (scores - labels) ** 2) / np.sum(weights))


def _rank_metrics(pred: ModelPredictions, p: _Prepared, config: EvaluationConfig, row: dict, plot: dict,
                  warnings: list[str]) -> None:
    """Every rank figure of ``_RANK_FIGURES`` with its subject-level bootstrap CI (and the IPCW Brier score),
    and the ROC/PR curves, into ``row`` and ``plot``; n/a with the reason where a view cannot be computed."""
    problem = p.no_labels or _class_problem(p.labels, config.report_split)
    if problem:
        for name, _, _ in _RANK_FIGURES:
            row[name] = not_available(problem)
        row["_boot"] = None
        return
    views = _views(pred, p, config)
    usable = {name: view for name, (view, reason) in views.items() if reason is None}
    boot = subject_bootstrap(p.labels, p.scores, p.subject_ids, config.n_bootstrap, config.bootstrap_block_cells,
                             rng_for(config.seed, pred.task, pred.horizon_days, "all"), usable)
    for name, view_name, metric_name in _RANK_FIGURES:
        view, reason = views[view_name]
        if reason is not None:
            row[name] = not_available(reason)
            continue
        value = _point(view, metric_name, p)
        resampled = boot.get(f"{view_name}.{metric_name}")
        row[name] = metric(value, percentile_interval(resampled, config.confidence))
        # A row subset can lose every positive row in a resample (its positive subjects are drawn, but not
        # always with a positive row inside the subset): such resamples are left out of its interval, and said.
        finite = int(np.isfinite(resampled).sum())
        if row[name]["value"] is not None and finite < config.n_bootstrap:
            row[name]["resamples_used"] = finite
            warnings.append(f"{pred.name} on {pred.task} at {pred.horizon_days} days: {name} interval from {finite} "
                            f"of {config.n_bootstrap} resamples (the others held one class in this view)")
    if views["ipcw"][1] is None and views["ipcw"][0].brier:
        row["brier_ipcw"] = metric(_point(views["ipcw"][0], "brier", p),
                                   percentile_interval(boot.get("ipcw.brier"), config.confidence))
    else:
        row["brier_ipcw"] = not_available(views["ipcw"][1] or "scores outside [0, 1] are not probabilities")
    if views["sample"][0].brier:
        row["_brier_ci"] = percentile_interval(boot.get("sample.brier"), config.confidence)
    counts = row["counts"]
    strata = views["stratified"][0].strata
    if strata is not None:
        known = strata != ""
        counts["age_sex_rows_excluded"] = int((~known).sum())
        counts["age_sex_strata_used"] = int(sum(
            1 for s in np.unique(strata[known]) if 0 < p.labels[strata == s].sum() < (strata == s).sum()))
    for view_name in ("one_landmark", "excluding_final_year", "new_onsets"):
        if view_name in views and views[view_name][0].rows is not None:
            rows = views[view_name][0].rows
            counts[view_name] = {"rows": int(rows.sum()), "positives": int(p.labels[rows].sum()),
                                 "positive_subjects": _positive_subjects(p.labels[rows], p.subject_ids[rows])}
            view_subjects = counts[view_name]["positive_subjects"]
            if view_name != "new_onsets" and 0 < view_subjects < config.min_positive_subjects_for_ci:
                warnings.append(f"{pred.name} on {pred.task} at {pred.horizon_days} days: only {view_subjects} "
                                f"positive subjects in the {view_name.replace('_', ' ')} view; its interval rests "
                                "on very few cases")
    row["_boot"] = boot
    plot.update(roc_pr_curves(p.labels, p.scores, config.max_curve_points))
    prevalence = int(p.labels.sum()) / len(p.labels)
    plot["auroc"], plot["auprc"], plot["prevalence"] = row["auroc"]["value"], row["auprc"]["value"], prevalence


def _calibration_metrics(p: _Prepared, config: EvaluationConfig, row: dict, plot: dict) -> None:
    """Brier score and calibration bins into ``row`` and ``plot``. They need labels and scores that are
    probabilities, not both classes."""
    if p.no_labels or len(p.labels) == 0:
        reason = p.no_labels or f"no labelled {config.report_split} rows"
        row["brier"] = not_available(reason)
        row["calibration"] = not_available(reason)
    elif p.scores.min() < 0 or p.scores.max() > 1:
        reason = f"scores outside [0, 1] ({p.scores.min():.3g} to {p.scores.max():.3g}) are not probabilities"
        row["brier"] = not_available(reason)
        row["calibration"] = not_available(reason)
    else:
        row["brier"] = metric(np.mean((p.scores - p.labels) ** 2), row.pop("_brier_ci", None))
        bins = calibration_bins(p.labels, p.scores, config.calibration_bins)
        row["calibration"] = {"value": None, "ci": None, "reason": None, "bins": bins,
                              "strategy": f"{config.calibration_bins} equal-count bins of predicted risk"}
        row["mean_predicted"] = metric(np.mean(p.scores))
        row["observed_rate"] = metric(np.mean(p.labels))
        plot["calibration"] = bins
    row.pop("_brier_ci", None)
    if "brier_ipcw" not in row:
        row["brier_ipcw"] = not_available(row["brier"]["reason"] or "no labelled rows")


def _threshold_metrics(p: _Prepared, config: EvaluationConfig, row: dict) -> None:
    """F1, precision and recall at the tuning split's best threshold, applied to held_out, into ``row``."""
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
        return
    threshold, tuning_f1 = best_f1_threshold(p.tuning_labels, p.tuning_scores)
    row["threshold"] = metric(threshold)
    row["threshold"]["tuning_f1"] = tuning_f1
    if len(p.labels) == 0:
        for name in ("f1", "precision", "recall"):
            row[name] = not_available(f"no labelled {config.report_split} rows")
    else:
        at = classification_at(p.labels, p.scores, threshold)
        row.update(precision=at["precision"], recall=at["recall"], f1=at["f1"])
        row["counts"]["predicted_positive"] = at["predicted_positive"]


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
                    margin = oracle["_boot"].get("sample.auroc") - 0.5
                    model_margin = r["_boot"].get("sample.auroc") - 0.5
                    paired = np.where(margin > 0, model_margin / np.where(margin > 0, margin, 1), np.nan)
                ci = percentile_interval(paired, config.confidence)
            else:
                warnings.append(f"{where}: {r['model']!r} and the oracle were evaluated on different rows; "
                                "its oracle share has no confidence interval")
            r["oracle_share"] = metric(share, ci)
    return oracle["model"]


def _inflation(task: str, horizon: int, rows: list[dict], config: EvaluationConfig, warnings: list[str]) -> dict:
    """AUROC on all occurrences vs new onsets (prior_occurrence == False), per model, both from the same
    subject-level resamples (so the difference has a paired interval)."""
    models = []
    for r in rows:
        p: _Prepared = r["_prepared"]
        entry = {"model": r["model"], "kind": r["kind"], "repeat_regularization": r["repeat_regularization"],
                 "all_occurrences": {"auroc": r["auroc"], "positives": int(p.labels.sum()),
                                     "positive_subjects": _positive_subjects(p.labels, p.subject_ids),
                                     "negatives": int((~p.labels).sum())}}
        if p.prior is None:
            reason = f"no {PRIOR_OCCURRENCE} column"
            entry["new_onsets"] = {"auroc": not_available(reason)}
            entry["difference"] = not_available(reason)
            models.append(entry)
            continue
        new = ~p.prior
        labels, scores = p.labels[new], p.scores[new]
        new_subjects = _positive_subjects(labels, p.subject_ids[new])
        entry["new_onsets"] = {"positives": int(labels.sum()), "positive_subjects": new_subjects,
                               "negatives": int((~labels).sum())}
        if 0 < new_subjects < config.min_positive_subjects_for_ci:
            warnings.append(f"{r['model']} on {task}: only {new_subjects} new-onset {config.report_split} positive "
                            f"subjects ({int(labels.sum())} rows); the new-onset interval rests on very few cases")
        entry["recurrence_share_of_positives"] = (
            metric(float(p.labels[p.prior].sum()) / p.labels.sum()) if p.labels.sum() else not_available("0 positives"))
        problem = p.no_labels or _class_problem(labels, f"{config.report_split} new-onset")
        if problem or r.get("_boot") is None:
            problem = problem or r["auroc"]["reason"]
            entry["new_onsets"]["auroc"] = not_available(problem)
            entry["difference"] = not_available(problem)
        else:
            boot = r["_boot"]
            value = auroc(labels, scores)
            entry["new_onsets"]["auroc"] = metric(value, percentile_interval(boot.get("new_onsets.auroc"),
                                                                             config.confidence))
            # Paired: AUROC on all rows minus AUROC on the new-onset rows of the same resamples.
            diff = boot.get("sample.auroc") - boot.get("new_onsets.auroc")
            entry["difference"] = metric(r["auroc"]["value"] - value, percentile_interval(diff, config.confidence))
        models.append(entry)
    return {"task": task, "models": models}


def disambiguate(entries: list[ModelPredictions], warnings: list[str]) -> None:
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
             config: EvaluationConfig | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Evaluate prediction folders/files and write ``out_dir/metrics.json``, ``report.html`` and its plots, all
    or none (``nextvisit.artifacts.folders``; a non-empty ``out_dir`` only with ``overwrite``). Returns the
    metrics (the content of metrics.json)."""
    check_out(out_dir, overwrite)
    warnings: list[str] = []
    entries, inputs = load_predictions(prediction_paths, warnings)
    return evaluate_predictions(entries, inputs, warnings, out_dir, config or EvaluationConfig(n_bootstrap=n_bootstrap,
                                                                                              seed=seed),
                                progress=progress, overwrite=overwrite)


def evaluate_predictions(entries: list[ModelPredictions], inputs: list[dict], warnings: list[str],
                         out_dir: Path | None, config: EvaluationConfig, progress: bool = True,
                         overwrite: bool = False) -> dict:
    """The metrics of ``entries`` (``load_predictions``'s, or rows held in memory: ``split_predictions``), each
    model per (task, horizon); with ``out_dir``, written there with the report (``evaluate``), else only
    returned (no ``figures``). ``warnings`` gathers what the loading found and the evaluation finds."""
    from tqdm import tqdm

    from nextvisit import __version__

    tasks, inflation, plots, models = [], [], [], {}
    bar = tqdm(total=len(entries), desc="evaluate", unit="model", file=sys.stderr, disable=not progress)
    for (task, horizon), group in sorted(_by_task_horizon(entries).items()):
        rows, curves = [], []
        for e in group:
            bar.set_postfix_str(f"{task}@{horizon} {e.name}")
            row, curve = _evaluate_model(e, config, warnings)
            rows.append(row)
            curves.append(curve)
            _record_model(models, e, row)
            bar.update(1)
        tasks.append(_task_table(task, horizon, rows, config, warnings, inflation, [e.label_counts for e in group]))
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
    if out_dir is not None:
        with atomic_folder(out_dir, overwrite) as staging:
            metrics["figures"] = write_report(metrics, plots, staging)
            _write_json(staging / "metrics.json", metrics)
    return metrics


def load_predictions(prediction_paths, warnings: list[str]) -> tuple[list[ModelPredictions], list[dict]]:
    """Every (file, task, horizon) of the given folders/files (or predictions held in memory,
    ``HeldPredictions``), each file once, with same-named models renamed apart (``disambiguate``); and the
    ``inputs`` entry of metrics.json per file."""
    if isinstance(prediction_paths, (str, Path, HeldPredictions)):
        prediction_paths = [prediction_paths]
    if not prediction_paths:
        raise UserError("no predictions given; pass one or more prediction folders")
    sources: list[Path | HeldPredictions] = []
    for path in prediction_paths:
        if isinstance(path, HeldPredictions):
            sources.append(path)
            continue
        for file in find_prediction_files(Path(path)):
            if file.resolve() not in {f.resolve() for f in sources if isinstance(f, Path)}:
                sources.append(file)
    entries: list[ModelPredictions] = []
    inputs = []
    for source in sources:
        held = isinstance(source, HeldPredictions)
        loaded = source.split(warnings) if held else read_predictions(source, warnings)
        entries += loaded
        inputs.append(_input_entry(source.where if held else str(source), loaded))
    disambiguate(entries, warnings)
    return entries, inputs


def _input_entry(file: str, loaded: list[ModelPredictions]) -> dict:
    """metrics.json's ``inputs`` entry of one predictions file (or frame held in memory)."""
    return {"file": file, "model": loaded[0].name if loaded else None, "kind": loaded[0].kind if loaded else None,
            "task_horizons": [[e.task, e.horizon_days] for e in loaded]}


def _by_task_horizon(entries: list[ModelPredictions]) -> dict[tuple[str, int], list[ModelPredictions]]:
    groups: dict[tuple[str, int], list[ModelPredictions]] = {}
    for e in entries:
        groups.setdefault((e.task, e.horizon_days), []).append(e)
    for key in groups:  # the oracle first, then models in the order given
        groups[key].sort(key=lambda e: e.kind != ORACLE)
    return groups


def _record_model(models: dict, e: ModelPredictions, row: dict) -> None:
    """The ``models`` entry of metrics.json: kind, repeat setting, and every source and config seen."""
    model = models.setdefault(e.name, {"kind": e.kind, "repeat_regularization": row["repeat_regularization"],
                                       "sources": [], "configs": []})
    if e.source not in model["sources"]:
        model["sources"].append(e.source)
    if e.config not in model["configs"]:
        model["configs"].append(e.config)
    calibration = e.info.get("visit_time_calibration")  # sampled risks: the run's visit-time head
    if calibration and "visit_time_calibration" not in model:
        model["visit_time_calibration"] = calibration


def _task_table(task: str, horizon: int, rows: list[dict], config: EvaluationConfig, warnings: list[str],
                inflation: list[dict], group_counts: list[dict] = ()) -> dict:
    """One (task, horizon) table of metrics.json from its models' rows: oracle shares, the same-cohort
    check, and (next-visit tasks) the inflation block appended to ``inflation``."""
    where = f"{task} at {horizon} days"
    oracle = _oracle_shares(rows, config, warnings, where)
    if any(not _same_cohort(r, rows[0]) for r in rows[1:]):
        sizes = ", ".join(f"{r['model']} {r['counts']['rows']}" for r in rows)
        warnings.append(f"{where}: models were not evaluated on the same {config.report_split} rows "
                        f"(rows or labels differ; row counts: {sizes}); compare them with care")
    if task.endswith(NEXT_VISIT_SUFFIX):
        inflation.append({"horizon_days": horizon, **_inflation(task, horizon, rows, config, warnings)})
    censoring = _censoring_by_year(task, horizon, group_counts, config.report_split)
    for r in rows:
        for private in [k for k in r if k.startswith("_")]:
            del r[private]
    table = {"task": task, "horizon_days": horizon, "oracle": oracle, "rows": rows}
    if censoring is not None:
        table["censoring"] = censoring
    return table


def _censoring_by_year(task: str, horizon: int, label_counts: list[dict], split: str) -> dict | None:
    """Rows and censored rows of ``split`` by calendar year of the horizon's end, from the first info.json
    ``label_counts`` that records them (``nextvisit.tasks.label_counts``)."""
    for counts in label_counts:
        years = (counts or {}).get(f"{task}@{horizon}", {}).get(split, {}).get("censored_by_horizon_end_year")
        if isinstance(years, dict) and years:
            table = [{"year": int(year), "rows": int(v["rows"]), "censored": int(v["censored"]),
                      "rate": v["censored"] / v["rows"] if v["rows"] else None} for year, v in sorted(years.items())]
            return {"split": split, "by_horizon_end_year": table}
    return None


def _write_json(path: Path, payload: dict) -> None:
    """Strict JSON (into the staging folder, which is published whole)."""
    path.write_text(json.dumps(_finite(payload), indent=2, default=_json_default, allow_nan=False))


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


def run_cli(args) -> int:
    metrics = evaluate(args.predictions, args.out, n_bootstrap=args.bootstrap, seed=args.seed,
                       overwrite=args.overwrite)
    for warning in metrics["warnings"]:
        sys.stderr.write(f"warning: {warning}\n")
    sys.stdout.write(headline_table(metrics))
    sys.stdout.write(f"\nReport: {(Path(args.out) / 'report.html').resolve()}\n")
    return 0
