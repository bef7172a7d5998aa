"""Censoring weights: fit on train only, equal to Uno's IPCW AUROC (scikit-survival) in one stratum, and
removing the bias that outcome-dependent censoring puts into the complete-case AUROC."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sksurv.metrics import cumulative_dynamic_auc
from sksurv.util import Surv

from nextvisit.evaluate.metrics import auroc
from nextvisit.tasks.censoring import STRATUM_EDGES_DAYS, censoring_weights, stratum_of

H = 730


def synthetic_rows(n: int, rng, near_share: float = 0.0, near_censoring: float = 0.0, far_censoring: float = 0.2):
    """Label rows of one horizon with a known score. A row is 'near' the data end (little data after the horizon)
    with probability ``near_share``; near rows have a higher risk and lose ``near_censoring`` of their records
    before the horizon, far rows ``far_censoring``. Returns the rows, the score and the uncensored truth."""
    near = rng.random(n) < near_share
    score = rng.normal(size=n) + 0.8 * near
    event = np.ceil(rng.exponential(H * np.exp(-1.2 * score - 0.5))).astype(int)  # day of the onset, >= 1
    lost = rng.random(n) < np.where(near, near_censoring, far_censoring)
    end = np.where(lost, rng.integers(1, H, n), H + rng.integers(0, 2 * H, n))  # the record's last day
    truth = event <= H
    reason = np.where(event <= np.minimum(H, end), "positive", np.where(end >= H, "negative", "censored_lost_to_followup"))
    split = rng.choice(["train", "tuning", "held_out"], size=n, p=[0.6, 0.1, 0.3])
    rows = pl.DataFrame({
        "reason": reason, "event_days": np.where(event <= end, event, None).tolist(),
        "followup_days": np.maximum(end, np.where(reason == "positive", event, 0)),
        "days_after_horizon": np.where(near, 100, 5000), "split": split,
    }, schema={"reason": pl.String, "event_days": pl.Int32, "followup_days": pl.Int32,
               "days_after_horizon": pl.Int32, "split": pl.String})
    return rows, score, truth


def survival(rows: pl.DataFrame) -> np.ndarray:
    """The rows as scikit-survival reads them: an onset at T - 0.5 (observed through day T), else the last day."""
    positive = rows["reason"].to_numpy() == "positive"
    time = np.where(positive, rows["event_days"].fill_null(0).to_numpy() - 0.5, rows["followup_days"].to_numpy())
    return Surv.from_arrays(event=positive, time=time.astype(float))


def test_weighted_auroc_equals_uno_cumulative_dynamic_auc_in_one_stratum():
    rows, score, _ = synthetic_rows(4000, np.random.default_rng(0))
    weights, fit = censoring_weights(rows, H)
    assert fit.train_censored > 100  # the comparison means something only with censoring
    censored = rows["reason"].to_numpy() == "censored_lost_to_followup"
    assert np.isnan(weights[censored]).all() and (weights[~censored] >= 1).all()
    held = rows["split"].to_numpy() == "held_out"
    train = rows["split"].to_numpy() == "train"
    expected, _ = cumulative_dynamic_auc(survival(rows.filter(pl.Series(train))), survival(rows.filter(pl.Series(held))),
                                         score[held], times=[H - 0.5])
    labelled = held & ~censored
    ours = auroc(rows["reason"].to_numpy()[labelled] == "positive", score[labelled], weights[labelled])
    assert ours == pytest.approx(float(expected[0]), abs=1e-9)
    # and it differs from the unweighted figure, so the weights did something
    assert abs(ours - auroc(rows["reason"].to_numpy()[labelled] == "positive", score[labelled])) > 1e-4


def test_censoring_model_is_fit_on_train_rows_only():
    rng = np.random.default_rng(1)
    rows, _, _ = synthetic_rows(3000, rng, near_share=0.3, near_censoring=0.5)
    before, _ = censoring_weights(rows, H)
    held = rows["split"] == "held_out"
    # Censor every held_out record early: a model that looked at held_out would change every weight.
    changed = rows.with_columns(
        reason=pl.when(held).then(pl.lit("censored_lost_to_followup")).otherwise("reason"),
        followup_days=pl.when(held).then(pl.lit(5, dtype=pl.Int32)).otherwise("followup_days"))
    after, _ = censoring_weights(changed, H)
    keep = ~held.to_numpy()
    np.testing.assert_array_equal(before[keep], after[keep])
    assert np.isnan(after[~keep]).all()


def test_weights_remove_the_bias_of_outcome_dependent_censoring():
    """Near the data end records are lost more often; positives are kept whatever follows, negatives need the
    whole horizon. The complete-case AUROC drifts from the AUROC of the uncensored truth; the weighted one
    recovers it (large n, so the gap is not noise)."""
    rows, score, truth = synthetic_rows(100_000, np.random.default_rng(0), near_share=0.5, near_censoring=0.6,
                                        far_censoring=0.05)
    weights, fit = censoring_weights(rows, H)
    assert [s["pooled"] for s in fit.strata] == [False, True, True, False]  # near band and far band fit apart
    held = rows["split"].to_numpy() == "held_out"
    labelled = held & ~np.isnan(weights)
    labels = rows["reason"].to_numpy()[labelled] == "positive"
    true_auroc = auroc(truth[held], score[held])
    complete_case = auroc(labels, score[labelled])
    weighted = auroc(labels, score[labelled], weights[labelled])
    assert abs(complete_case - true_auroc) > 0.006  # measured: 0.009 (4 seeds: 0.009-0.010)
    assert abs(weighted - true_auroc) < 0.3 * abs(complete_case - true_auroc)


def test_strata_are_bands_of_days_after_the_horizon():
    assert stratum_of(np.array([0, STRATUM_EDGES_DAYS[0] - 1, STRATUM_EDGES_DAYS[0], np.nan])).tolist() == [0, 0, 1, 3]


def test_train_rows_without_any_onset_or_censoring_give_weight_one():
    rows = pl.DataFrame({"reason": ["negative"] * 5 + ["censored_lost_to_followup", "positive"],
                         "event_days": [None] * 6 + [100], "followup_days": [900] * 5 + [300, 900],
                         "days_after_horizon": [None] * 7, "split": ["train"] * 5 + ["held_out"] * 2},
                        schema={"reason": pl.String, "event_days": pl.Int32, "followup_days": pl.Int32,
                                "days_after_horizon": pl.Int32, "split": pl.String})
    weights, fit = censoring_weights(rows, H)
    assert weights[:5].tolist() == [1.0] * 5 and np.isnan(weights[5]) and weights[6] == 1.0
    assert fit.train_censored == 0


def test_a_competing_death_is_read_at_the_death_not_at_events_recorded_after_it():
    """Events after a death (late results, billing) must not stretch the time a dead subject was observed."""
    rng = np.random.default_rng(3)
    rows, _, _ = synthetic_rows(3000, rng)
    rows = rows.with_columns(death_days=pl.lit(None, dtype=pl.Int32))
    dead = pl.DataFrame({"reason": ["negative_competing_death"] * 2, "event_days": [None, None],
                         "followup_days": [10, 300], "death_days": [10, 10], "days_after_horizon": [5000, 5000],
                         "split": ["held_out", "held_out"]}, schema=rows.schema)
    weights, _ = censoring_weights(pl.concat([rows, dead]), H)
    assert weights[-1] == weights[-2] and weights[-1] < 1.05  # 10 days in: almost nothing can be lost by then
