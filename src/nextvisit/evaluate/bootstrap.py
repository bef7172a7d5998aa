"""The subject-level (cluster) bootstrap, stratified by each subject's outcome; the seeded streams; and the
per-resample metrics of several views of one row set.

Contract: a subject contributes many rows (landmarks) and its rows are correlated, so a resample draws
**subjects**, never rows: the subjects with at least one positive row are drawn with replacement among
themselves, and the others among themselves, so every resample keeps the number of positive subjects (never a
single class) and carries every row of a drawn subject as often as the subject was drawn. A resample is a
vector of multiplicities over the original rows, scored by `nextvisit.evaluate.metrics.RankIndex` in blocks
of resamples. One set of resamples serves every ``View`` of the rows (weighted, stratified, a row subset), so
the differences between views are paired. `rng_for` gives every model of one (task, horizon) the same stream,
so models scored on the same rows get the same resamples and paired model comparisons (oracle share) are
possible. Percentile intervals ignore non-finite resample values.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from nextvisit.evaluate.metrics import RankIndex

METHOD = ("percentile interval of subject-level bootstrap resamples: subjects, not rows, are drawn with "
          "replacement, those with a positive row among themselves and the others among themselves")


def class_multiplicities(n_positive: int, n_negative: int, n_resamples: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """How often each positive ([n_resamples, n_positive]) and each negative ([n_resamples, n_negative]) unit
    is drawn in a stratified bootstrap resample: positives resampled with replacement among themselves, and
    negatives among themselves, so every resample keeps the class counts."""
    out = []
    for n in (n_positive, n_negative):
        drawn = rng.integers(0, max(n, 1), size=(n_resamples, n))
        flat = (drawn + np.arange(n_resamples)[:, None] * n).ravel()
        out.append(np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(np.float64))
    return out[0], out[1]


def subject_outcomes(labels: np.ndarray, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(subject index per row into the sorted distinct subjects, whether each subject has a positive row)."""
    _, index = np.unique(subjects, return_inverse=True)
    positive = np.zeros(int(index.max()) + 1 if len(index) else 0, dtype=bool)
    np.logical_or.at(positive, index, np.asarray(labels, dtype=bool))
    return index, positive


def subject_multiplicities(labels: np.ndarray, subjects: np.ndarray, n_resamples: int,
                           rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n rows]: each row drawn as often as its subject (module docstring)."""
    index, positive = subject_outcomes(labels, subjects)
    drawn = _subject_draws(positive, n_resamples, rng)
    return drawn[:, index]


def _subject_draws(positive_subject: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    pos, neg = class_multiplicities(int(positive_subject.sum()), int((~positive_subject).sum()), n_resamples, rng)
    drawn = np.zeros((n_resamples, len(positive_subject)))
    drawn[:, positive_subject], drawn[:, ~positive_subject] = pos, neg
    return drawn


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def rng_for(seed: int, task: str, horizon: int, subset: str) -> np.random.Generator:
    """The same stream for every model of one (task, horizon): identical cohorts get identical resamples,
    so paired comparisons (oracle share) are possible."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), horizon, zlib.crc32(subset.encode())])


@dataclass
class View:
    """One way of scoring the rows in every resample: a row subset (None = all rows), per-row weights (None =
    1; multiplied by the multiplicities), strata (AUROC over within-stratum pairs only; '' = left out), and
    whether the Brier score is wanted (scores must be probabilities)."""

    rows: np.ndarray | None = None
    weights: np.ndarray | None = None
    strata: np.ndarray | None = None
    brier: bool = False


class Resampled:
    """Per-resample values, by ``"<view>.<metric>"`` (metric: auroc, auprc, brier)."""

    def __init__(self):
        self.values: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        self.values.setdefault(name, []).append(values)

    def get(self, name: str) -> np.ndarray:
        return np.concatenate(self.values[name]) if name in self.values else np.array([])


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


class _Prepared:
    """A view's rows, their subjects, weights and rank indexes (one per stratum for a stratified view)."""

    def __init__(self, view: View, labels, scores, subject_index):
        rows = np.arange(len(labels)) if view.rows is None else np.flatnonzero(view.rows)
        self.rows = rows
        self.subject = subject_index[rows]
        self.weights = None if view.weights is None else np.asarray(view.weights, np.float64)[rows]
        self.labels, self.scores = labels[rows], scores[rows]
        self.brier = view.brier
        self.parts = []
        if view.strata is None:
            self.parts.append((None, RankIndex(self.labels, self.scores)))
        else:
            strata = np.asarray(view.strata)[rows]
            for s in np.unique(strata):
                inside = np.flatnonzero(strata == s)
                if s != "" and self.labels[inside].any() and not self.labels[inside].all():
                    self.parts.append((inside, RankIndex(self.labels[inside], self.scores[inside])))

    def score(self, name: str, drawn: np.ndarray, out: Resampled) -> None:
        weights = drawn[:, self.subject]
        if self.weights is not None:
            weights = weights * self.weights
        if len(self.parts) == 1 and self.parts[0][0] is None:
            concordant, pairs, ap = self.parts[0][1].pair_sums(weights)
            out.add(f"{name}.auroc", _ratio(concordant, pairs))
            out.add(f"{name}.auprc", ap)
        else:
            concordant = pairs = np.zeros(len(weights))
            for inside, index in self.parts:
                c, p, _ = index.pair_sums(weights[:, inside])
                concordant, pairs = concordant + c, pairs + p
            out.add(f"{name}.auroc", _ratio(concordant, pairs))
        if self.brier:
            error = (self.scores - self.labels) ** 2
            out.add(f"{name}.brier", _ratio(weights @ error, weights.sum(axis=1)))


def subject_bootstrap(labels, scores, subjects, n_resamples: int, block_cells: int, rng: np.random.Generator,
                      views: dict[str, View]) -> Resampled:
    """``n_resamples`` subject-level resamples (module docstring), drawn in blocks of at most ``block_cells``
    resample x row cells; every view scored on every resample."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    subject_index, positive_subject = subject_outcomes(labels, subjects)
    prepared = {name: _Prepared(view, labels, scores, subject_index) for name, view in views.items()}
    out = Resampled()
    block = max(1, min(n_resamples, block_cells // max(1, len(labels))))
    done = 0
    while done < n_resamples:
        size = min(block, n_resamples - done)
        drawn = _subject_draws(positive_subject, size, rng)
        for name, view in prepared.items():
            view.score(name, drawn, out)
        done += size
    return out
