"""The classical baseline a reviewer asks for first: bag-of-codes counts in lookback windows before the
prediction time, plus age and sex, fed to a logistic regression (or gradient-boosted trees).

Features of one history (a label row's subject cut at its prediction time, see ``baselines.common``):

- for every lookback window (default the last 365 days and all history) and every code of the feature
  vocabulary: the number of visits (calendar days) in the window holding the code, an event at exactly the
  prediction time included; plus the number of visits in the window;
- age at the prediction time (z-scored with train statistics, plus one-hot age buckets) and sex (one-hot
  over the train values).

The feature vocabulary is fit on train-split rows only: codes present in at least ``min_code_count``
train histories. Codes listed in the task's ``remove_from_inputs`` never become features. One model per
(task, horizon), fit on train rows; the regularisation strength is picked on the tuning split (AUROC).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from nextvisit.baselines import common
from nextvisit.config import merge
from nextvisit.errors import UserError
from nextvisit.data.meds import BIRTH_CODE

MODELS = ("logistic", "gbt")
COUNT_TRANSFORMS = ("log1p", "standardize")


@dataclass
class CountsConfig:
    """Every number of the count baseline. ``lookback_days``: one window per entry, ``None`` = all history."""

    lookback_days: list = field(default_factory=lambda: [365, None])
    min_code_count: int = 5  # train histories holding a code before it becomes a feature
    age_bucket_years: float | None = 5.0  # one-hot age buckets beside the linear age (risk is not linear in age)
    count_transform: str = "log1p"  # "log1p" counts, or "standardize" (divide by the train SD, sparse-safe)
    model: str = "logistic"
    # logistic regression: C (inverse L2 strength) chosen on tuning AUROC among these values
    c_values: list = field(default_factory=lambda: [0.01, 0.1, 1.0])
    default_c: float = 1.0  # used when the tuning rows cannot rank (no rows, or one class only)
    class_weight: str | None = None  # None or "balanced"
    max_iter: int = 2000
    # gradient-boosted trees (sklearn HistGradientBoostingClassifier on the densified top features)
    gbt_max_features: int = 1000
    gbt_max_iter: int = 300
    gbt_learning_rate: float = 0.05
    gbt_max_leaf_nodes: int = 31
    gbt_validation_fraction: float = 0.1  # of train rows, for early stopping
    seed: int = 0

    def __post_init__(self):
        if self.model not in MODELS:
            raise UserError(f"counts config: model {self.model!r} unknown; use one of {MODELS}")
        if self.count_transform not in COUNT_TRANSFORMS:
            raise UserError(f"counts config: count_transform {self.count_transform!r} unknown; use one of {COUNT_TRANSFORMS}")
        if not self.lookback_days:
            raise UserError("counts config: lookback_days is empty; give at least one window (null = all history)")
        for days in self.lookback_days:
            if days is not None and (not isinstance(days, int) or days <= 0):
                raise UserError(f"counts config: lookback_days entry {days!r} must be a positive whole number or null")
        if self.min_code_count < 1:
            raise UserError(f"counts config: min_code_count must be at least 1, got {self.min_code_count}")
        if self.class_weight not in (None, "balanced"):
            raise UserError(f"counts config: class_weight must be null or 'balanced', got {self.class_weight!r}")

    @classmethod
    def from_yaml(cls, path: Path | None, **overrides) -> "CountsConfig":
        """Defaults, then the YAML file's fields (unknown fields are errors), then non-None ``overrides``."""
        config = cls()
        if path is not None:
            from nextvisit.config import read_yaml

            config = merge(config, read_yaml(path), str(path))
        config = merge(config, {k: v for k, v in overrides.items() if v is not None}, "command line")
        config.__post_init__()
        return config


def window_name(days: int | None) -> str:
    """>>> window_name(365), window_name(None)
    ('365d', 'all')"""
    return "all" if days is None else f"{days}d"


def visit_code_days(events: pl.DataFrame) -> pl.DataFrame:
    """Distinct ``history_id, prediction_time, code, day`` of timed events (a code counts once per visit =
    calendar day). Birth rows carry no information beyond age and are left out."""
    return (
        events.filter(pl.col("time").is_not_null() & (pl.col("code") != BIRTH_CODE))
        .select("history_id", "prediction_time", "code", pl.col("time").dt.truncate("1d").alias("day"))
        .unique()
    )


def window_counts(visit_codes: pl.DataFrame, lookback_days: list) -> pl.DataFrame:
    """Long table ``history_id, window, code, count``: visits holding the code within each window
    (``day > prediction_day - lookback``; all history for ``None``), plus ``code = None`` rows counting all
    visits in the window. One group-by for all windows; zero counts are left out (sparse)."""
    prediction_day = pl.col("prediction_time").dt.truncate("1d")
    in_window = [
        (pl.len() if days is None else (pl.col("day") > prediction_day - pl.duration(days=days)).sum()).alias(window_name(days))
        for days in lookback_days
    ]
    per_code = visit_codes.group_by("history_id", "code").agg(in_window)
    visits = (
        visit_codes.select("history_id", "prediction_time", "day").unique()
        .group_by("history_id").agg(in_window)
        .with_columns(pl.lit(None, pl.String).alias("code"))
    )
    names = [window_name(days) for days in lookback_days]
    return (
        pl.concat([per_code.select("history_id", "code", *names), visits.select("history_id", "code", *names)])
        .unpivot(index=["history_id", "code"], on=names, variable_name="window", value_name="count")
        .filter(pl.col("count") > 0)
        .select("history_id", "window", "code", pl.col("count").cast(pl.Int64))
    )


def fit_vocabulary(counts: pl.DataFrame, train_histories: pl.Series, min_code_count: int) -> list[str]:
    """Codes present in at least ``min_code_count`` train histories (the widest window), sorted."""
    widest = counts.filter(pl.col("code").is_not_null() & pl.col("history_id").is_in(train_histories.implode()))
    per_code = widest.group_by("code").agg(pl.col("history_id").n_unique().alias("histories"))
    return sorted(per_code.filter(pl.col("histories") >= min_code_count)["code"].to_list())


@dataclass
class CountFeatures:
    """Sparse count matrix over histories and the names of its columns."""

    matrix: sp.csr_matrix  # [n_histories, n_windows * (n_codes + 1)] raw counts
    names: list[str]


def count_matrix(counts: pl.DataFrame, n_histories: int, vocabulary: list[str], lookback_days: list) -> CountFeatures:
    """Raw counts as a CSR matrix; column = (window, code) with the visits count as code ``None``."""
    names, keys = [], []
    for days in lookback_days:
        w = window_name(days)
        for code in [None, *vocabulary]:
            keys.append((w, code))
            names.append(f"{w}:{'visits' if code is None else code}")
    columns = pl.DataFrame(
        {"window": [k[0] for k in keys], "code": [k[1] for k in keys], "column": np.arange(len(keys), dtype=np.int64)},
        schema={"window": pl.String, "code": pl.String, "column": pl.Int64},
    )
    cells = counts.join(columns, on=["window", "code"], how="inner", nulls_equal=True)
    matrix = sp.csr_matrix(
        (cells["count"].to_numpy().astype(np.float64), (cells["history_id"].to_numpy(), cells["column"].to_numpy())),
        shape=(n_histories, len(keys)),
    )
    return CountFeatures(matrix=matrix, names=names)


def build_features(meds_dir: Path, labelled: pl.DataFrame, removed, config: CountsConfig):
    """Everything the models need: per-history raw counts, per-row history index, and input counts."""
    history = common.histories(labelled)
    events, input_counts = common.history_events(meds_dir, history, removed)
    counts = window_counts(visit_code_days(events), config.lookback_days)
    rows = labelled.join(history, on=["subject_id", "prediction_time"], how="left")
    train_histories = rows.filter(pl.col("split") == "train")["history_id"].unique()
    vocabulary = fit_vocabulary(counts, train_histories, config.min_code_count)
    features = count_matrix(counts, history.height, vocabulary, config.lookback_days)
    input_counts["feature_codes"] = len(vocabulary)
    return rows, features, input_counts


def design_matrix(raw: sp.csr_matrix, rows: pl.DataFrame, train: np.ndarray, config: CountsConfig) -> tuple[sp.csr_matrix, list[str]]:
    """Transformed counts plus age (z-scored on train rows) and sex one-hot (train values), one row per label
    row. ``train`` is a boolean mask of train rows; every statistic comes from them only."""
    counts = raw[rows["history_id"].to_numpy()]
    if config.count_transform == "log1p":
        counts = counts.log1p()
    else:
        train_counts = counts[train]
        mean_sq = np.asarray(train_counts.multiply(train_counts).mean(axis=0)).ravel()
        mean = np.asarray(train_counts.mean(axis=0)).ravel()
        sd = np.sqrt(np.maximum(mean_sq - mean**2, 0.0))
        counts = counts @ sp.diags(np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0))
    age = rows["age_years"].to_numpy().astype(np.float64)
    age_mean, age_sd = np.nanmean(age[train]), np.nanstd(age[train])
    age = np.where(np.isnan(age), age_mean, age)  # an unknown age counts as the train mean
    age_z = (age - age_mean) / (age_sd if age_sd > 0 else 1.0)
    sexes = sorted(v for v in rows.filter(pl.Series(train))["sex"].unique().to_list() if v is not None)
    sex_values = np.array(rows["sex"].fill_null("").to_list(), dtype=object)
    sex = np.column_stack([sex_values == value for value in sexes]).astype(np.float64) if sexes else np.zeros((len(age), 0))
    names = ["age_z", *[f"sex:{v}" for v in sexes]]
    columns = [age_z[:, None], sex]
    if config.age_bucket_years:
        # buckets seen in train rows; younger/older ages fall into the first/last one
        bucket = np.floor(age / config.age_bucket_years).astype(np.int64)
        first, last = bucket[train].min(), bucket[train].max()
        bucket = np.clip(bucket, first, last)
        columns.append((bucket[:, None] == np.arange(first, last + 1)[None, :]).astype(np.float64))
        names += [f"age:[{b * config.age_bucket_years:g},{(b + 1) * config.age_bucket_years:g})" for b in range(first, last + 1)]
    demographics = sp.csr_matrix(np.hstack(columns))
    return sp.hstack([counts, demographics], format="csr"), names


def _auroc(y: np.ndarray, model, x) -> float:
    """Tuning AUROC, NaN when the tuning rows hold fewer than two classes."""
    return float(roc_auc_score(y, model.predict_proba(x)[:, 1])) if len(np.unique(y)) == 2 else math.nan


def fit_predict(x_train, y_train, x_tune, y_tune, x_score, config: CountsConfig) -> tuple[np.ndarray, dict]:
    """Fit the configured classifier on train rows (hyper-parameter picked on tuning AUROC) and return
    probabilities for ``x_score`` with a summary of the choice."""
    if len(np.unique(y_train)) < 2:
        raise UserError("count baseline: the train split holds only one class for this task/horizon; "
                        "more subjects or a longer follow-up are needed to fit a classifier")
    if config.model == "logistic":
        from sklearn.linear_model import LogisticRegression

        def fit(c):
            return LogisticRegression(C=c, class_weight=config.class_weight, max_iter=config.max_iter).fit(x_train, y_train)

        if len(np.unique(y_tune)) == 2:
            fits = [(_auroc(y_tune, model, x_tune), c, model) for c, model in ((c, fit(c)) for c in config.c_values)]
            auroc, c, model = max(fits, key=lambda f: f[0])
        else:
            c, auroc = config.default_c, math.nan
            model = fit(c)
        return model.predict_proba(x_score)[:, 1], {"C": c, "tuning_auroc": auroc}
    from sklearn.ensemble import HistGradientBoostingClassifier

    # trees need dense input: keep the most frequent train columns (age and sex are the last columns)
    nonzero = np.asarray((x_train != 0).sum(axis=0)).ravel()
    keep = np.sort(np.argsort(-nonzero, kind="stable")[: config.gbt_max_features])
    model = HistGradientBoostingClassifier(
        max_iter=config.gbt_max_iter, learning_rate=config.gbt_learning_rate, max_leaf_nodes=config.gbt_max_leaf_nodes,
        class_weight=config.class_weight, early_stopping=True, validation_fraction=config.gbt_validation_fraction,
        random_state=config.seed,
    )
    model.fit(x_train[:, keep].toarray().astype(np.float32), y_train)
    auroc = _auroc(y_tune, model, x_tune[:, keep].toarray().astype(np.float32))
    score = model.predict_proba(x_score[:, keep].toarray().astype(np.float32))[:, 1]
    return score, {"features_used": int(len(keep)), "iterations": int(model.n_iter_), "tuning_auroc": auroc}


def run(meds_dir: Path, labels_dir: Path, out: Path, config: CountsConfig, overwrite: bool = False) -> Path:
    """Fit one count model per (task, horizon) and write predictions for the tuning and held_out rows."""
    started = time.monotonic()
    labelled, label_counts = common.load_labels(labels_dir)
    removed = common.removed_input_codes(labels_dir)
    out = common.prepare_out(out, overwrite)
    rows, features, input_counts = build_features(meds_dir, labelled, removed, config)
    sys.stderr.write(
        f"count features: {features.matrix.shape[0]} histories, {input_counts['feature_codes']} codes x "
        f"{len(config.lookback_days)} windows; {input_counts['after_prediction_time']} events after the prediction "
        f"time and {input_counts['removed_from_inputs']} removed-from-inputs events not counted\n"
    )
    scored, fits = [], {}
    for (task, horizon), group in rows.group_by("task", "horizon_days", maintain_order=True):
        group = group.sort("row")
        split = group["split"].to_numpy()
        train = split == "train"
        x, demographic_names = design_matrix(features.matrix, group, train, config)
        y = group["boolean_value"].to_numpy().astype(np.int64)
        tune = split == "tuning"
        score_mask = np.isin(split, common.PREDICTION_SPLITS)
        probability, summary = fit_predict(x[train], y[train], x[tune], y[tune], x[score_mask], config)
        summary.update(train_rows=int(train.sum()), train_positive=int(y[train].sum()))
        fits[f"{task}@{horizon}"] = summary
        sys.stderr.write(f"{task} @ {horizon} days: {summary}\n")
        scored.append(group.filter(pl.Series(score_mask)).with_columns(pl.Series(common.PROBABILITY, probability)))
    predictions = pl.concat(scored)
    elapsed = time.monotonic() - started
    path = common.write_predictions(
        out, predictions, model=f"counts-{config.model}", kind="count-features", config=asdict(config),
        label_counts=label_counts,
        extra_info={"inputs": input_counts, "removed_from_inputs": common.code_set_json(removed), "fits": fits,
                    "feature_columns": len(features.names) + len(demographic_names), "seconds": round(elapsed, 1)},
    )
    sys.stderr.write(f"wrote {predictions.height} predictions to {path} in {elapsed:.1f} s\n")
    return path


def run_cli(args) -> int:
    config = CountsConfig.from_yaml(getattr(args, "config", None), model=args.model)
    run(args.meds_dir, args.labels, args.out, config, overwrite=getattr(args, "overwrite", False))
    return 0
