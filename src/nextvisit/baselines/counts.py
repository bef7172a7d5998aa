"""The classical baseline a reviewer asks for first: bag-of-codes counts in lookback windows before the
prediction time, plus age and sex, fed to a logistic regression (or gradient-boosted trees).

Features of one history (a label row's subject cut at its prediction time, ``nextvisit.data.histories``):

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from nextvisit import compare
from nextvisit.artifacts.predictions import COUNT_FEATURES
from nextvisit.compare import ComparedModel, Labels
from nextvisit.config import merge
from nextvisit.data.histories import add_counts, read_histories
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


def read_counts(meds_dir: Path, labels: Labels, config: CountsConfig) -> tuple[pl.DataFrame, dict]:
    """Long table of per-history window counts (``window_counts``) of the histories cut at their prediction
    times, and the counts of events not seen (after the prediction time, removed from the inputs)."""
    parts, input_counts = [], {}
    for chunk in read_histories(meds_dir, labels.histories, labels.remove_from_inputs):
        parts.append(chunk.events)
        add_counts(input_counts, chunk.counts)
    events = pl.concat(parts) if parts else pl.DataFrame(schema={"history_id": pl.Int64,
                                                                 "prediction_time": pl.Datetime("us"),
                                                                 "time": pl.Datetime("us"), "code": pl.String})
    input_counts.update(histories=labels.histories.height, events_kept=events.height,
                        histories_without_events=labels.histories.height - events["history_id"].n_unique())
    return window_counts(visit_code_days(events), config.lookback_days), input_counts


def build_features(meds_dir: Path, labels: Labels, config: CountsConfig):
    """Per-history raw counts over the vocabulary fit on train histories, the label rows (with
    ``history_id``), and the input counts."""
    counts, input_counts = read_counts(meds_dir, labels, config)
    train_histories = labels.split("train")["history_id"].unique()
    vocabulary = fit_vocabulary(counts, train_histories, config.min_code_count)
    features = count_matrix(counts, labels.histories.height, vocabulary, config.lookback_days)
    input_counts["feature_codes"] = len(vocabulary)
    return labels.rows, features, input_counts


@dataclass
class Design:
    """The transform from raw counts and demographics to the classifier's design matrix, with every
    statistic fit on train rows: count SDs (``standardize``), the age mean and SD, the sexes and the age
    buckets seen in train."""

    config: CountsConfig
    count_scale: np.ndarray | None = None
    age_mean: float = 0.0
    age_sd: float = 1.0
    sexes: tuple = ()
    buckets: tuple[int, int] | None = None

    def fit(self, raw: sp.csr_matrix, train: pl.DataFrame) -> "Design":
        counts = raw[train["history_id"].to_numpy()]
        if self.config.count_transform == "standardize":
            mean_sq = np.asarray(counts.multiply(counts).mean(axis=0)).ravel()
            mean = np.asarray(counts.mean(axis=0)).ravel()
            sd = np.sqrt(np.maximum(mean_sq - mean**2, 0.0))
            self.count_scale = np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)
        age = train["age_years"].to_numpy().astype(np.float64)
        self.age_mean, age_sd = float(np.nanmean(age)), float(np.nanstd(age))
        self.age_sd = age_sd if age_sd > 0 else 1.0
        self.sexes = tuple(sorted(v for v in train["sex"].unique().to_list() if v is not None))
        if self.config.age_bucket_years:
            bucket = np.floor(self._age(train) / self.config.age_bucket_years).astype(np.int64)
            self.buckets = (int(bucket.min()), int(bucket.max()))
        return self

    def _age(self, rows: pl.DataFrame) -> np.ndarray:
        age = rows["age_years"].to_numpy().astype(np.float64)
        return np.where(np.isnan(age), self.age_mean, age)  # an unknown age counts as the train mean

    def names(self) -> list[str]:
        names = ["age_z", *[f"sex:{v}" for v in self.sexes]]
        if self.buckets is not None:
            width = self.config.age_bucket_years
            names += [f"age:[{b * width:g},{(b + 1) * width:g})" for b in range(self.buckets[0], self.buckets[1] + 1)]
        return names

    def transform(self, raw: sp.csr_matrix, rows: pl.DataFrame) -> sp.csr_matrix:
        counts = raw[rows["history_id"].to_numpy()]
        counts = counts.log1p() if self.count_scale is None else counts @ sp.diags(self.count_scale)
        age = self._age(rows)
        columns = [((age - self.age_mean) / self.age_sd)[:, None]]
        sex_values = np.array(rows["sex"].fill_null("").to_list(), dtype=object)
        columns.append(np.column_stack([sex_values == v for v in self.sexes]).astype(np.float64) if self.sexes
                       else np.zeros((len(age), 0)))
        if self.buckets is not None:
            # buckets seen in train rows; younger/older ages fall into the first/last one
            first, last = self.buckets
            bucket = np.clip(np.floor(age / self.config.age_bucket_years).astype(np.int64), first, last)
            columns.append((bucket[:, None] == np.arange(first, last + 1)[None, :]).astype(np.float64))
        return sp.hstack([counts, sp.csr_matrix(np.hstack(columns))], format="csr")


def _auroc(y: np.ndarray, model, x) -> float:
    """Tuning AUROC, NaN when the tuning rows hold fewer than two classes."""
    return float(roc_auc_score(y, model.predict_proba(x)[:, 1])) if len(np.unique(y)) == 2 else math.nan


def _fit_logistic(x_train, y_train, x_tune, y_tune, config: CountsConfig):
    from sklearn.linear_model import LogisticRegression

    def fit(c):
        return LogisticRegression(C=c, class_weight=config.class_weight, max_iter=config.max_iter).fit(x_train, y_train)

    if len(np.unique(y_tune)) == 2:
        fits = [(_auroc(y_tune, model, x_tune), c, model) for c, model in ((c, fit(c)) for c in config.c_values)]
        auroc, c, model = max(fits, key=lambda f: f[0])
    else:
        c, auroc = config.default_c, math.nan
        model = fit(c)
    return (lambda x: model.predict_proba(x)[:, 1]), {"C": c, "tuning_auroc": auroc}


def _fit_trees(x_train, y_train, x_tune, y_tune, config: CountsConfig):
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
    summary = {"features_used": int(len(keep)), "iterations": int(model.n_iter_), "tuning_auroc": auroc}
    return (lambda x: model.predict_proba(x[:, keep].toarray().astype(np.float32))[:, 1]), summary


def fit_classifier(x_train, y_train, x_tune, y_tune, config: CountsConfig):
    """The configured classifier fit on train rows (its hyper-parameter picked on tuning AUROC): a function
    from a design matrix to probabilities, and a summary of the choice."""
    if len(np.unique(y_train)) < 2:
        raise UserError("count baseline: the train split holds only one class for this task/horizon; "
                        "more subjects or a longer follow-up are needed to fit a classifier")
    fit = _fit_logistic if config.model == "logistic" else _fit_trees
    return fit(x_train, y_train, x_tune, y_tune, config)


def _label(rows: pl.DataFrame) -> np.ndarray:
    return rows["boolean_value"].to_numpy().astype(np.int64)


class CountModel(ComparedModel):
    """The count baseline behind the compared-model interface (``nextvisit.compare``): one classifier per
    (task, horizon), the feature vocabulary and every transform statistic fit on train rows."""

    kind = COUNT_FEATURES

    def __init__(self, config: CountsConfig):
        self.config = config
        self.name = f"counts-{config.model}"
        self.fits: dict[tuple, tuple] = {}
        self.summaries: dict[str, dict] = {}
        self.input_counts: dict = {}

    def read(self, meds_dir: Path, labels: Labels):
        counts, self.input_counts = read_counts(meds_dir, labels, self.config)
        return counts, labels.histories.height

    def fit(self, inputs, train: pl.DataFrame, tuning: pl.DataFrame) -> "CountModel":
        counts, n_histories = inputs
        vocabulary = fit_vocabulary(counts, train["history_id"].unique(), self.config.min_code_count)
        self.features = count_matrix(counts, n_histories, vocabulary, self.config.lookback_days)
        self.input_counts["feature_codes"] = len(vocabulary)
        sys.stderr.write(
            f"count features: {n_histories} histories, {len(vocabulary)} codes x {len(self.config.lookback_days)} "
            f"windows; {self.input_counts['after_prediction_time']} events after the prediction time and "
            f"{self.input_counts['removed_from_inputs']} removed-from-inputs events not counted\n")
        for (task, horizon), group in train.group_by("task", "horizon_days", maintain_order=True):
            group = group.sort("row")
            tune = tuning.filter((pl.col("task") == task) & (pl.col("horizon_days") == horizon)).sort("row")
            design = Design(self.config).fit(self.features.matrix, group)
            x = self.features.matrix
            predict, summary = fit_classifier(design.transform(x, group), _label(group), design.transform(x, tune),
                                              _label(tune), self.config)
            summary.update(train_rows=group.height, train_positive=int(_label(group).sum()))
            self.summaries[f"{task}@{horizon}"] = summary
            self.fits[(task, horizon)] = (design, predict)
            sys.stderr.write(f"{task} @ {horizon} days: {summary}\n")
        self.feature_columns = len(self.features.names) + (len(design.names()) if self.fits else 0)
        return self

    def predict_proba(self, inputs, rows: pl.DataFrame) -> np.ndarray:
        probability = np.full(rows.height, np.nan)
        index = np.arange(rows.height)
        for (task, horizon), (design, predict) in self.fits.items():
            mask = ((rows["task"] == task) & (rows["horizon_days"] == horizon)).to_numpy()
            if mask.any():
                probability[index[mask]] = predict(design.transform(self.features.matrix, rows.filter(pl.Series(mask))))
        if np.isnan(probability).any():
            task, horizon = rows.filter(pl.Series(np.isnan(probability))).select("task", "horizon_days").row(0)
            raise UserError(f"count baseline: task {task!r} at {horizon} days has no train rows to fit a classifier")
        return probability

    def info(self) -> dict:
        return {"config": asdict(self.config), "inputs": self.input_counts, "fits": self.summaries,
                "feature_columns": self.feature_columns}


def run(meds_dir: Path, labels_dir: Path, out: Path, config: CountsConfig, overwrite: bool = False) -> Path:
    """Fit one count model per (task, horizon) and write predictions for the tuning and held_out rows."""
    return compare.run(CountModel(config), meds_dir, labels_dir, out, overwrite)


def run_cli(args) -> int:
    config = CountsConfig.from_yaml(args.config, model=args.model)
    run(args.meds_dir, args.labels, args.out, config, overwrite=args.overwrite)
    return 0
