"""The classical baseline a reviewer asks for first: bag-of-codes counts in lookback windows before the
prediction time, plus age and sex, fed to a logistic regression (or gradient-boosted trees); and, with
``features = "observable"``, the observable reference: the same model on everything a history shows.

Features of one history (a label row's subject cut at its prediction time, ``nextvisit.data.histories``):

- for every lookback window (default the last 365 days and all history) and every code of the feature
  vocabulary: the number of visits (calendar days) in the window holding the code, an event at exactly the
  prediction time included; plus the number of visits in the window;
- age at the prediction time (z-scored with train statistics, plus one-hot age buckets) and sex (one-hot
  over the train values);
- observable reference only: for every code of the vocabulary (and for visits of any kind), how long before
  the prediction day its first visit lies (and its last, ``occurrence_times``), one-hot over the bins of
  ``time_bins_days`` (a code the history lacks has no bin): when a code began, which counts alone do not say
  (a prodrome's knee pain for a year, memory complaints for two).

The feature vocabulary is fit on train-split rows only: codes present in at least ``min_code_count``
train histories. Codes listed in the task's ``remove_from_inputs`` never become features. One model per
(task, horizon), fit on train rows; its hyper-parameter (``C``, or the trees' iterations) is chosen on the
tuning rows when they hold at least 30 positive subjects, else by cross-validation within train with
folds grouped by subject (``nextvisit.baselines.selection``), and recorded in info.json's ``selection``.
The observable reference writes predictions of kind ``observable-reference``: the reference for what a
history shows, beside the oracle (which sees the simulator's latent state) and each compared model.
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
from nextvisit.artifacts.predictions import COUNT_FEATURES, OBSERVABLE_REFERENCE
from nextvisit.baselines import selection
from nextvisit.compare import ComparedModel, Labels
from nextvisit.config import merge
from nextvisit.data.histories import add_counts, read_histories
from nextvisit.errors import UserError
from nextvisit.data.meds import BIRTH_CODE

MODELS = ("logistic", "gbt")
COUNT_TRANSFORMS = ("log1p", "standardize")
FEATURE_SETS = {"counts": COUNT_FEATURES, "observable": OBSERVABLE_REFERENCE}  # -> predictions kind
OCCURRENCES = ("first", "last")


@dataclass
class CountsConfig:
    """Every number of the count baseline. ``lookback_days``: one window per entry, ``None`` = all history."""

    features: str = "counts"  # "counts", or "observable" (the observable reference: counts + occurrence times)
    lookback_days: list = field(default_factory=lambda: [365, None])
    min_code_count: int = 5  # train histories holding a code before it becomes a feature
    # observable reference: time from each code's first (and/or last) visit to the prediction day, one-hot
    # over bins with these edges in days (below the first edge, between edges, from the last edge on)
    occurrence_times: list = field(default_factory=lambda: ["first"])
    time_bins_days: list = field(default_factory=lambda: [365, 1825])
    age_bucket_years: float | None = 5.0  # one-hot age buckets beside the linear age (risk is not linear in age)
    count_transform: str = "log1p"  # "log1p" counts, or "standardize" (divide by the train SD, sparse-safe)
    model: str = "logistic"
    # logistic regression: C (inverse L2 strength) chosen by AUROC among these values
    c_values: list = field(default_factory=lambda: [0.01, 0.1, 1.0])
    default_c: float = 1.0  # used when tuning cannot rank and train cannot be split into folds by outcome
    class_weight: str | None = None  # None or "balanced"
    max_iter: int = 2000
    # gradient-boosted trees (sklearn HistGradientBoostingClassifier on the densified top features):
    # iterations chosen by early stopping on the validation loss (tuning rows, or each train fold)
    gbt_max_features: int = 1000
    gbt_max_iter: int = 300
    gbt_learning_rate: float = 0.05
    gbt_max_leaf_nodes: int = 31
    gbt_patience: int = 10  # iterations without a lower validation loss before stopping
    # folds of the cross-validation within train (used when tuning holds < 30 positive subjects)
    cv_folds: int = 5
    seed: int = 0
    histories_per_chunk: int = 4096  # histories cut and counted at once (bounds memory, not the results)

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
        if self.features not in FEATURE_SETS:
            raise UserError(f"counts config: features {self.features!r} unknown; use one of {tuple(FEATURE_SETS)}")
        unknown = [o for o in self.occurrence_times if o not in OCCURRENCES]
        if unknown or len(set(self.occurrence_times)) != len(self.occurrence_times):
            raise UserError(f"counts config: occurrence_times {self.occurrence_times!r} must list distinct "
                            f"entries of {OCCURRENCES}")
        edges = self.time_bins_days
        if not edges or any(not isinstance(d, int) or d <= 0 for d in edges) or sorted(set(edges)) != list(edges):
            raise UserError(f"counts config: time_bins_days {edges!r} must be increasing positive whole days")
        if self.histories_per_chunk < 1:
            raise UserError(f"counts config: histories_per_chunk must be at least 1, got {self.histories_per_chunk}")
        if self.cv_folds < 2:
            raise UserError(f"counts config: cv_folds must be at least 2, got {self.cv_folds}")

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
    """The name of a lookback window (``None`` = all history).

    >>> window_name(365), window_name(None)
    ('365d', 'all')
    """
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


def bin_label(edges: list, index: int) -> str:
    """The name of occurrence-time bin ``index`` (0..len(edges)) for bin ``edges`` in days.

    >>> [bin_label([90, 365], b) for b in range(3)]
    ['<90d', '[90d,365d)', '>=365d']
    """
    if index == 0:
        return f"<{edges[0]}d"
    if index == len(edges):
        return f">={edges[-1]}d"
    return f"[{edges[index - 1]}d,{edges[index]}d)"


def occurrence_bins(visit_codes: pl.DataFrame, occurrences: list, edges: list) -> pl.DataFrame:
    """Long table ``history_id, occurrence, code, bin``: for every code of a history (and ``code = None`` for
    its visits of any kind), the bin of the days from its first (``occurrence = "first"``) or last visit to
    the prediction day; ``bin`` = the number of ``edges`` at or below those days (0..len(edges))."""
    ago = pl.col("prediction_time").dt.truncate("1d") - pl.col("day")
    extreme = {"first": ago.max(), "last": ago.min()}
    spans = [extreme[o].dt.total_days().alias(o) for o in occurrences]
    per_code = visit_codes.group_by("history_id", "code").agg(spans)
    visits = visit_codes.group_by("history_id").agg(spans).with_columns(pl.lit(None, pl.String).alias("code"))
    return (
        pl.concat([per_code.select("history_id", "code", *occurrences), visits.select("history_id", "code", *occurrences)])
        .unpivot(index=["history_id", "code"], on=list(occurrences), variable_name="occurrence", value_name="days")
        .select("history_id", "occurrence", "code",
                pl.sum_horizontal([(pl.col("days") >= days).cast(pl.Int64) for days in edges]).alias("bin"))
    )


@dataclass
class HistoryCells:
    """What the count baseline reads of every history, before a feature vocabulary is chosen: the long tables
    of ``window_counts`` and (observable reference) ``occurrence_bins``, each code replaced by its index in
    ``codes`` (``code_id``, null for the visits rows), so a cell costs a few integers, not a string."""

    codes: pl.DataFrame  # code, code_id: every code some history holds (ids in the order first read)
    counts: pl.DataFrame  # history_id, window, code_id, count
    times: pl.DataFrame | None  # history_id, occurrence, code_id, bin
    n_histories: int


CODE_IDS = {"code": pl.String, "code_id": pl.Int32}


def _with_code_ids(cells: pl.DataFrame, codes: pl.DataFrame) -> pl.DataFrame:
    """``cells`` with its ``code`` column replaced by ``codes``' ``code_id`` (null stays null: visits)."""
    columns = [c if c != "code" else "code_id" for c in cells.columns]
    return cells.join(codes, on="code", how="left").select(columns)


def read_counts(meds_dir: Path, labels: Labels, config: CountsConfig) -> tuple[HistoryCells, dict]:
    """The window counts (``window_counts``) and, for the observable reference, occurrence-time bins
    (``occurrence_bins``) of the histories cut at their prediction times, computed ``histories_per_chunk``
    histories at a time (every cell is one history's: chunks never share one), and the counts of events
    not seen (after the prediction time, removed from the inputs). Memory: the chunk's events and the
    cells, never every history's events at once."""
    n_histories = labels.histories.height
    codes = pl.DataFrame(schema=CODE_IDS)
    count_parts, time_parts, input_counts = [], [], {}
    has_events = np.zeros(n_histories, dtype=bool)
    events_kept = 0
    for chunk in read_histories(meds_dir, labels.histories, labels.remove_from_inputs, config.histories_per_chunk):
        add_counts(input_counts, chunk.counts)
        events_kept += chunk.events.height
        has_events[chunk.events["history_id"].to_numpy()] = True
        visit_codes = visit_code_days(chunk.events)
        new = visit_codes.select(pl.col("code").unique().sort()).join(codes, on="code", how="anti")
        codes = pl.concat([codes, new.with_columns(
            (pl.int_range(pl.len()) + codes.height).cast(pl.Int32).alias("code_id"))])
        count_parts.append(_with_code_ids(window_counts(visit_codes, config.lookback_days), codes))
        if config.features == "observable":
            time_parts.append(_with_code_ids(
                occurrence_bins(visit_codes, config.occurrence_times, config.time_bins_days), codes))
    counts_schema = {"history_id": pl.Int64, "window": pl.String, "code_id": pl.Int32, "count": pl.Int64}
    times_schema = {"history_id": pl.Int64, "occurrence": pl.String, "code_id": pl.Int32, "bin": pl.Int64}
    cells = HistoryCells(
        codes=codes,
        counts=pl.concat(count_parts) if count_parts else pl.DataFrame(schema=counts_schema),
        times=None if config.features != "observable" else (
            pl.concat(time_parts) if time_parts else pl.DataFrame(schema=times_schema)),
        n_histories=n_histories)
    input_counts.update(histories=n_histories, events_kept=events_kept,
                        histories_without_events=n_histories - int(has_events.sum()))
    return cells, input_counts


def fit_vocabulary(cells: HistoryCells, train_histories: pl.Series, min_code_count: int) -> list[str]:
    """Codes present in at least ``min_code_count`` train histories (the widest window), sorted."""
    widest = cells.counts.filter(pl.col("code_id").is_not_null()
                                 & pl.col("history_id").is_in(train_histories.implode()))
    per_code = widest.group_by("code_id").agg(pl.col("history_id").n_unique().alias("histories"))
    chosen = per_code.filter(pl.col("histories") >= min_code_count).join(cells.codes, on="code_id")
    return sorted(chosen["code"].to_list())


@dataclass
class CountFeatures:
    """Sparse count matrix over histories and the names of its columns; for the observable reference also
    the one-hot occurrence-time bins."""

    matrix: sp.csr_matrix  # [n_histories, n_windows * (n_codes + 1)] raw counts
    names: list[str]
    times: sp.csr_matrix | None = None  # [n_histories, n_occurrences * (n_codes + 1) * n_bins] 0/1
    time_names: list[str] = field(default_factory=list)


def _cells_matrix(cells: pl.DataFrame, keys: list[tuple], key_names: tuple, schema: dict, n_histories: int,
                  value: str | None) -> sp.csr_matrix:
    """CSR matrix [n_histories, len(keys)] holding column ``value`` (1 for None) of each row of ``cells`` at
    the column of its key (the ``key_names`` columns; a null code is the visits column); rows of other keys
    are left out."""
    columns = pl.DataFrame(
        {**{name: [k[i] for k in keys] for i, name in enumerate(key_names)},
         "column": np.arange(len(keys), dtype=np.int64)},
        schema={**schema, "column": pl.Int64},
    )
    cells = cells.join(columns, on=list(key_names), how="inner", nulls_equal=True)
    return sp.csr_matrix(
        (np.ones(cells.height) if value is None else cells[value].to_numpy().astype(np.float64),
         (cells["history_id"].to_numpy(), cells["column"].to_numpy())),
        shape=(n_histories, len(keys)),
    )


def _code_ids(cells: HistoryCells, vocabulary: list[str]) -> list:
    """The ``code_id`` of each code of ``vocabulary``, in its order."""
    ids = dict(cells.codes.filter(pl.col("code").is_in(vocabulary)).iter_rows())
    return [ids[code] for code in vocabulary]


def count_matrix(cells: HistoryCells, vocabulary: list[str], lookback_days: list) -> CountFeatures:
    """Raw counts as a CSR matrix; column = (window, code) with the visits count as code ``None``."""
    ids = _code_ids(cells, vocabulary)
    keys = [(window_name(days), code_id) for days in lookback_days for code_id in [None, *ids]]
    names = [f"{window_name(days)}:{'visits' if code is None else code}" for days in lookback_days
             for code in [None, *vocabulary]]
    matrix = _cells_matrix(cells.counts, keys, ("window", "code_id"), {"window": pl.String, "code_id": pl.Int32},
                           cells.n_histories, "count")
    return CountFeatures(matrix=matrix, names=names)


def time_matrix(cells: HistoryCells, vocabulary: list[str], config: "CountsConfig"):
    """One-hot occurrence-time bins (``occurrence_bins``) as a CSR matrix; column = (occurrence, code, bin)."""
    edges, ids = config.time_bins_days, _code_ids(cells, vocabulary)
    bins = range(len(edges) + 1)
    keys = [(o, code_id, b) for o in config.occurrence_times for code_id in [None, *ids] for b in bins]
    names = [f"{o}:{'visits' if code is None else code}:{bin_label(edges, b)}" for o in config.occurrence_times
             for code in [None, *vocabulary] for b in bins]
    matrix = _cells_matrix(cells.times, keys, ("occurrence", "code_id", "bin"),
                           {"occurrence": pl.String, "code_id": pl.Int32, "bin": pl.Int64}, cells.n_histories, None)
    return matrix, names


def features_of(cells: HistoryCells, vocabulary: list[str], config: "CountsConfig") -> CountFeatures:
    """The raw feature matrices of every history over ``vocabulary`` (occurrence times for the observable
    reference)."""
    features = count_matrix(cells, vocabulary, config.lookback_days)
    if cells.times is not None:
        features.times, features.time_names = time_matrix(cells, vocabulary, config)
    return features


def build_features(meds_dir: Path, labels: Labels, config: CountsConfig):
    """Per-history raw features over the vocabulary fit on train histories, the label rows (with
    ``history_id``), and the input counts."""
    cells, input_counts = read_counts(meds_dir, labels, config)
    train_histories = labels.split("train")["history_id"].unique()
    vocabulary = fit_vocabulary(cells, train_histories, config.min_code_count)
    features = features_of(cells, vocabulary, config)
    input_counts["feature_codes"] = len(vocabulary)
    return labels.rows, features, input_counts


@dataclass
class Design:
    """The transform from raw features and demographics to the classifier's design matrix, with every
    statistic fit on train rows: count SDs (``standardize``), the age mean and SD, the sexes and the age
    buckets seen in train. Occurrence-time bins (0/1) pass unchanged."""

    config: CountsConfig
    count_scale: np.ndarray | None = None
    age_mean: float = 0.0
    age_sd: float = 1.0
    sexes: tuple = ()
    buckets: tuple[int, int] | None = None

    def fit(self, features: CountFeatures, train: pl.DataFrame) -> "Design":
        counts = features.matrix[train["history_id"].to_numpy()]
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

    def transform(self, features: CountFeatures, rows: pl.DataFrame) -> sp.csr_matrix:
        histories = rows["history_id"].to_numpy()
        counts = features.matrix[histories]
        counts = counts.log1p() if self.count_scale is None else counts @ sp.diags(self.count_scale)
        times = [] if features.times is None else [features.times[histories]]
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
        return sp.hstack([counts, *times, sp.csr_matrix(np.hstack(columns))], format="csr")


def _auroc(y: np.ndarray, predict, x) -> float:
    """AUROC of ``predict(x)``, NaN when ``y`` holds fewer than two classes."""
    return float(roc_auc_score(y, predict(x))) if len(np.unique(y)) == 2 else math.nan


@dataclass
class Choice:
    """How a classifier chooses its hyper-parameter (``nextvisit.baselines.selection``): the method, the
    tuning rows' design matrix and labels (method ``tuning``), the train rows' folds (``cv_within_train``)."""

    method: str
    x_tune: sp.csr_matrix
    y_tune: np.ndarray
    fold: np.ndarray | None = None


def _logistic(c: float, config: CountsConfig):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, class_weight=config.class_weight, max_iter=config.max_iter)


def _fit_logistic(x_train, y_train, choice: Choice, config: CountsConfig):
    if choice.method == selection.TUNING:
        fits = [(c, _logistic(c, config).fit(x_train, y_train)) for c in config.c_values]
        scores = [{"C": c, "auroc": _auroc(choice.y_tune, lambda x: m.predict_proba(x)[:, 1], choice.x_tune)}
                  for c, m in fits]
        model = fits[int(np.argmax([score["auroc"] for score in scores]))][1]
    elif choice.method == selection.CV_WITHIN_TRAIN:
        from sklearn.model_selection import GridSearchCV, PredefinedSplit

        # mean AUROC over the validation folds; the winner is refit on all train rows
        search = GridSearchCV(_logistic(config.default_c, config), {"C": list(config.c_values)}, scoring="roc_auc",
                              cv=PredefinedSplit(choice.fold), refit=True).fit(x_train, y_train)
        scores = [{"C": c, "auroc": float(a)} for c, a in zip(config.c_values, search.cv_results_["mean_test_score"])]
        model = search.best_estimator_
    else:
        model, scores = _logistic(config.default_c, config).fit(x_train, y_train), []
    return (lambda x: model.predict_proba(x)[:, 1]), {"C": float(model.C)}, scores


def _fit_trees(x_train, y_train, choice: Choice, config: CountsConfig):
    from sklearn.ensemble import HistGradientBoostingClassifier

    def trees(**options):
        return HistGradientBoostingClassifier(
            max_iter=config.gbt_max_iter, learning_rate=config.gbt_learning_rate,
            max_leaf_nodes=config.gbt_max_leaf_nodes, class_weight=config.class_weight, random_state=config.seed,
            **options)

    def best_iterations(x, y, x_validation, y_validation) -> int:
        """Iterations at the lowest validation loss (``validation_score_`` is the negative loss before and
        after each iteration)."""
        stopped = trees(early_stopping=True, n_iter_no_change=config.gbt_patience, scoring="loss").fit(
            x, y, X_val=x_validation, y_val=y_validation)
        return max(1, int(np.argmax(stopped.validation_score_)))

    # trees need dense input: keep the most frequent train columns (age and sex are the last columns)
    nonzero = np.asarray((x_train != 0).sum(axis=0)).ravel()
    keep = np.sort(np.argsort(-nonzero, kind="stable")[: config.gbt_max_features])

    def dense(x):
        return x[:, keep].toarray().astype(np.float32)

    train, scores = dense(x_train), []
    if choice.method == selection.TUNING:
        iterations = best_iterations(train, y_train, dense(choice.x_tune), choice.y_tune)
    elif choice.method == selection.CV_WITHIN_TRAIN:
        for fold in range(int(choice.fold.max()) + 1):
            fit, validation = choice.fold != fold, choice.fold == fold
            scores.append({"fold": fold, "iterations": best_iterations(train[fit], y_train[fit], train[validation],
                                                                        y_train[validation])})
        # the folds' median, refit on all train rows (more rows rarely need fewer trees)
        iterations = max(1, int(np.median([score["iterations"] for score in scores])))
    else:
        iterations = config.gbt_max_iter
    # boosting without subsampling is deterministic: this equals the stopped fit cut at ``iterations``
    model = trees(early_stopping=False).set_params(max_iter=iterations).fit(train, y_train)
    chosen = {"iterations": int(model.n_iter_), "features_used": int(len(keep))}
    return (lambda x: model.predict_proba(dense(x))[:, 1]), chosen, scores


def fit_classifier(x_train, y_train, choice: Choice, config: CountsConfig):
    """The configured classifier fit on train rows, its hyper-parameter chosen as ``choice`` says: a
    function from a design matrix to probabilities, the chosen value and each candidate's score."""
    if len(np.unique(y_train)) < 2:
        raise UserError("count baseline: the train split holds only one class for this task/horizon; "
                        "more subjects or a longer follow-up are needed to fit a classifier")
    fit = _fit_logistic if config.model == "logistic" else _fit_trees
    return fit(x_train, y_train, choice, config)


def _label(rows: pl.DataFrame) -> np.ndarray:
    return rows["boolean_value"].to_numpy().astype(np.int64)


class CountModel(ComparedModel):
    """The count baseline (or, with ``features = "observable"``, the observable reference) behind the
    compared-model interface (``nextvisit.compare``): one classifier per (task, horizon), the feature
    vocabulary and every transform statistic fit on train rows, the hyper-parameter chosen on tuning rows or
    by cross-validation within train (``nextvisit.baselines.selection``)."""

    def __init__(self, config: CountsConfig):
        self.config = config
        self.kind = FEATURE_SETS[config.features]
        if config.features == "counts":
            self.name = f"counts-{config.model}"
        else:
            self.name = "observable_reference" if config.model == "logistic" else f"observable_reference-{config.model}"
        self.fits: dict[tuple, tuple] = {}
        self.summaries: dict[str, dict] = {}
        self.selections: dict[str, dict] = {}
        self.input_counts: dict = {}

    def read(self, meds_dir: Path, labels: Labels) -> HistoryCells:
        cells, self.input_counts = read_counts(meds_dir, labels, self.config)
        return cells

    def fit(self, cells: HistoryCells, train: pl.DataFrame, tuning: pl.DataFrame) -> "CountModel":
        config = self.config
        vocabulary = fit_vocabulary(cells, train["history_id"].unique(), config.min_code_count)
        self.features = features_of(cells, vocabulary, config)
        n_histories = cells.n_histories
        self.input_counts["feature_codes"] = len(vocabulary)
        sys.stderr.write(
            f"{self.name} features: {n_histories} histories, {len(vocabulary)} codes x {len(config.lookback_days)} "
            f"windows{f' + {len(self.features.time_names)} occurrence-time bins' if cells.times is not None else ''}; "
            f"{self.input_counts['after_prediction_time']} events after the prediction time and "
            f"{self.input_counts['removed_from_inputs']} removed-from-inputs events not counted\n")
        for (task, horizon), group in train.group_by("task", "horizon_days", maintain_order=True):
            group = group.sort("row")
            tune = tuning.filter((pl.col("task") == task) & (pl.col("horizon_days") == horizon)).sort("row")
            design = Design(config).fit(self.features, group)
            x_train, x_tune = design.transform(self.features, group), design.transform(self.features, tune)
            how, fold = selection.method(tune), None
            if how == selection.CV_WITHIN_TRAIN:
                fold = selection.subject_folds(group, config.cv_folds, config.seed)
                how = how if fold is not None else selection.DEFAULT
            predict, chosen, scores = fit_classifier(x_train, _label(group), Choice(how, x_tune, _label(tune), fold),
                                                     config)
            key = f"{task}@{horizon}"
            self.selections[key] = selection.record(how, tune, None if fold is None else int(fold.max()) + 1, chosen,
                                                    scores)
            self.summaries[key] = {**chosen, "tuning_auroc": _auroc(_label(tune), predict, x_tune),
                                   "train_rows": group.height, "train_positive": int(_label(group).sum())}
            self.fits[(task, horizon)] = (design, predict)
            sys.stderr.write(f"{task} @ {horizon} days: selection {how} {chosen}, {self.summaries[key]}\n")
        self.feature_columns = (len(self.features.names) + len(self.features.time_names)
                                + (len(design.names()) if self.fits else 0))
        return self

    def predict_proba(self, inputs, rows: pl.DataFrame) -> np.ndarray:
        probability = np.full(rows.height, np.nan)
        index = np.arange(rows.height)
        for (task, horizon), (design, predict) in self.fits.items():
            mask = ((rows["task"] == task) & (rows["horizon_days"] == horizon)).to_numpy()
            if mask.any():
                probability[index[mask]] = predict(design.transform(self.features, rows.filter(pl.Series(mask))))
        if np.isnan(probability).any():
            task, horizon = rows.filter(pl.Series(np.isnan(probability))).select("task", "horizon_days").row(0)
            raise UserError(f"count baseline: task {task!r} at {horizon} days has no train rows to fit a classifier")
        return probability

    def info(self) -> dict:
        return {"config": asdict(self.config), "inputs": self.input_counts, "fits": self.summaries,
                "selection": self.selections, "feature_columns": self.feature_columns}


def run(meds_dir: Path, labels_dir: Path, out: Path, config: CountsConfig, overwrite: bool = False) -> Path:
    """Fit one count model (or observable reference) per (task, horizon) and write predictions for the tuning
    and held_out rows."""
    return compare.run(CountModel(config), meds_dir, labels_dir, out, overwrite)


def run_cli(args) -> int:
    config = CountsConfig.from_yaml(args.config, model=args.model, features=args.features)
    run(args.meds_dir, args.labels, args.out, config, overwrite=args.overwrite)
    return 0
