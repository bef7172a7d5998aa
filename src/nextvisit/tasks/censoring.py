"""Censoring handled, not just counted: inverse-probability-of-censoring weights for the label rows.

Contract: ``censoring_weights(rows, horizon)`` takes the label rows of one horizon (with ``reason``, ``event_days``,
``followup_days``, ``death_days``, ``days_after_horizon`` and ``split``), fits the censoring
distribution on the **train** rows only, and returns one weight per row: ``1 / G(t-)`` for a labelled row, null
for a censored one, where ``G(t) = P(censoring time > t)`` is the reverse Kaplan–Meier estimate
(`sksurv.nonparametric.kaplan_meier_estimator`) within the row's stratum, and ``t`` is the time up to
which the row had to stay under observation for its label to be known:

- a positive: the day of the onset (``event_days``, at most the horizon);
- a plain negative: the horizon's last day (the record must reach day d + H);
- a negative by a competing death: the day of death (a dead subject cannot be lost afterwards);
- a row censored by death (``death_is_competing: false``) counts as censored at the death.

A row is censored when the record ends (its last event, ``followup_days``) before the horizon's last day with
no onset. In an EHR that happens mostly because no visit followed, and how likely that is depends on how much
data lies after the horizon: a horizon that ends just before the data end leaves little room for the visit that
would show the subject was still there, while an onset is labelled whatever came after. The strata are
therefore bands of ``days_after_horizon`` (days of data after the horizon's last day); a band with fewer than
``min_stratum_rows`` train rows uses the pooled estimate. Weighted metrics (AUROC, AUPRC, Brier with these
weights; docs/evaluation.md) estimate what the complete-case figures would be had no row been censored.

Times are in days after the landmark day: an onset on day T was observed if the record reached day T, so G is
read just before T (at T - 0.5 on the day grid), which makes the weighted AUROC of one stratum equal to
Uno's cumulative/dynamic AUROC at the horizon (``sksurv.metrics.cumulative_dynamic_auc``; tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import meds
import numpy as np
import polars as pl

# Bands of days_after_horizon (upper edges, exclusive): within half a year, a year, two years, beyond.
STRATUM_EDGES_DAYS = (183, 365, 730)
MIN_STRATUM_ROWS = 200
WEIGHT = "censoring_weight"


@dataclass
class CensoringFit:
    """What was fit, for counts.json: per stratum its train rows, censored train rows and whether it was pooled."""

    strata: list[dict]
    train_rows: int
    train_censored: int

    def to_dict(self) -> dict:
        return {"train_rows": self.train_rows, "train_censored": self.train_censored, "strata": self.strata,
                "method": "Kaplan-Meier of the censoring time within bands of days of data after the horizon, "
                          "fit on the train split"}


def stratum_of(days_after_horizon: np.ndarray) -> np.ndarray:
    """Band index per row (0 = within half a year of the data end); rows without a data end get the last band.

    >>> stratum_of(np.array([0, 200, 400, 5000])).tolist()
    [0, 1, 2, 3]
    """
    days = np.nan_to_num(np.asarray(days_after_horizon, dtype=np.float64), nan=np.inf)
    return np.searchsorted(np.asarray(STRATUM_EDGES_DAYS), days, side="right")


def _censoring_input(reason: np.ndarray, event_days: np.ndarray, followup_days: np.ndarray, death_days: np.ndarray,
                     horizon: int):
    """(observed, time) per row as the censoring estimator reads them: ``observed == False`` is a censoring at
    ``time``; ``observed == True`` leaves the risk set at ``time`` without censoring."""
    observed = np.ones(len(reason), dtype=bool)
    time = np.full(len(reason), float(horizon))
    positive = reason == "positive"
    time[positive] = event_days[positive] - 0.5
    competing = reason == "negative_competing_death"
    time[competing] = np.minimum(death_days[competing], horizon) - 0.5
    censored = np.isin(reason, ["censored_lost_to_followup", "censored_death"])
    observed[censored] = False
    time[censored] = followup_days[censored]
    by_death = reason == "censored_death"  # censored at the death, whatever the record holds after it
    time[by_death] = death_days[by_death]
    # A plain negative stays at risk through the horizon: a censoring at the horizon's last day or later does
    # not touch G before it, so it enters as "censored at H" (no other censoring time is >= H).
    observed[reason == "negative"] = False
    return observed, time


def _read_time(reason: np.ndarray, event_days: np.ndarray, death_days: np.ndarray, horizon: int) -> np.ndarray:
    """The time at which G is read for each labelled row (module docstring)."""
    t = np.full(len(reason), horizon - 0.5)
    positive = reason == "positive"
    t[positive] = event_days[positive] - 0.5
    competing = reason == "negative_competing_death"
    t[competing] = np.minimum(death_days[competing], horizon) - 0.5
    return t


class _Censoring:
    """G(t) = P(censoring time > t): the reverse Kaplan-Meier estimate
    (`sksurv.nonparametric.kaplan_meier_estimator` with ``reverse=True``), a right-continuous step function
    that is 1 before the first time seen and keeps its last value after the last one."""

    def __init__(self, observed: np.ndarray, time: np.ndarray):
        from sksurv.nonparametric import kaplan_meier_estimator

        self.times, self.survival = kaplan_meier_estimator(observed, time, reverse=True)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.times, t, side="right") - 1
        return np.where(at >= 0, self.survival[np.maximum(at, 0)], 1.0)


def censoring_weights(rows: pl.DataFrame, horizon: int) -> tuple[np.ndarray, CensoringFit]:
    """One weight per row of ``rows`` (label rows of one horizon), NaN for censored rows; the fit on train."""
    reason = rows["reason"].to_numpy().astype(str)
    event_days = rows["event_days"].cast(pl.Float64).fill_null(np.inf).to_numpy()
    followup_days = rows["followup_days"].cast(pl.Float64).to_numpy()
    # The death day (older label files without the column: the record's last event, which a death ends).
    death_days = (rows["death_days"].cast(pl.Float64).fill_null(np.nan).to_numpy() if "death_days" in rows.columns
                  else followup_days)
    death_days = np.where(np.isnan(death_days), followup_days, death_days)
    stratum = stratum_of(rows["days_after_horizon"].cast(pl.Float64).to_numpy())
    train = rows["split"].to_numpy() == meds.train_split
    observed, time = _censoring_input(reason, event_days, followup_days, death_days, horizon)
    read_at = _read_time(reason, event_days, death_days, horizon)
    censored = np.isin(reason, ["censored_lost_to_followup", "censored_death"])
    weights = np.full(len(rows), np.nan)
    strata_info = []
    if not train.any():
        return weights, CensoringFit(strata=[], train_rows=0, train_censored=0)
    pooled = _Censoring(observed[train], time[train])
    for s in range(len(STRATUM_EDGES_DAYS) + 1):
        in_stratum = stratum == s
        fit_rows = train & in_stratum
        use_pooled = fit_rows.sum() < MIN_STRATUM_ROWS
        estimator = pooled if use_pooled else _Censoring(observed[fit_rows], time[fit_rows])
        target = in_stratum & ~censored
        if target.any():
            g = estimator(read_at[target])
            weights[target] = np.where(g > 0, 1.0 / np.where(g > 0, g, 1.0), np.nan)
        low = 0 if s == 0 else STRATUM_EDGES_DAYS[s - 1]
        high = STRATUM_EDGES_DAYS[s] if s < len(STRATUM_EDGES_DAYS) else None
        strata_info.append({"days_after_horizon": [low, high], "train_rows": int(fit_rows.sum()),
                            "train_censored": int((fit_rows & censored).sum()), "pooled": bool(use_pooled),
                            "rows": int(in_stratum.sum()), "censored": int((in_stratum & censored).sum())})
    return weights, CensoringFit(strata=strata_info, train_rows=int(train.sum()),
                                 train_censored=int((train & censored).sum()))


def add_censoring_weights(labels: pl.DataFrame) -> tuple[pl.DataFrame, dict]:
    """``labels`` (every horizon) with the ``censoring_weight`` column, and the fit per horizon."""
    if labels.height == 0:
        return labels, {}
    parts, fits = [], {}
    for (horizon,), part in labels.group_by(["horizon_days"], maintain_order=True):
        weights, fit = censoring_weights(part, int(horizon))
        parts.append(part.with_columns(pl.Series(WEIGHT, weights, dtype=pl.Float64).fill_nan(None)))
        fits[str(int(horizon))] = fit.to_dict()
    return pl.concat(parts), fits
