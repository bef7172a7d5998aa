"""The stratified bootstrap: resample multiplicities, the seeded streams, and per-resample rank metrics.

Contract: a stratified resample draws the positives with replacement among the positives and the negatives
among the negatives, so every resample keeps the class counts; it is a matrix of multiplicities over the
original rows, scored by `nextvisit.evaluate.metrics.RankIndex` in blocks of resamples. `rng_for` gives
every model of one (task, horizon) the same stream for a given seed, so models scored on the same rows get
the same resamples and paired intervals (oracle share, inflation difference) are possible. Percentile
intervals ignore non-finite resample values.
"""

from __future__ import annotations

import zlib

import numpy as np

from nextvisit.evaluate.metrics import RankIndex


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


class Resampled:
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


def rng_for(seed: int, task: str, horizon: int, subset: str) -> np.random.Generator:
    """The same stream for every model of one (task, horizon): identical cohorts get identical resamples,
    so paired comparisons (oracle share) are possible."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), horizon, zlib.crc32(subset.encode())])


def stratified_bootstrap(labels, scores, n_resamples: int, block_cells: int, rng,
                         weightings: dict[str, np.ndarray | None], strata: np.ndarray | None,
                         subsets: dict[str, np.ndarray]) -> Resampled:
    """Stratified bootstrap of AUROC/AP over ``n_resamples`` resamples, drawn in blocks of at most
    ``block_cells`` resample x row cells: ``weightings`` maps a name to per-row weights (multiplied by the
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

    out = Resampled()
    block = max(1, min(n_resamples, block_cells // max(1, len(labels))))
    done = 0
    while done < n_resamples:
        size = min(block, n_resamples - done)
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
