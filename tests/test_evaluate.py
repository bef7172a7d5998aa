"""Evaluation metrics against scikit-learn, the stratified bootstrap, and `nextvisit evaluate` on small
synthetic prediction folders (docs/interfaces.md §6), including bad input."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, precision_score, recall_score
from sklearn.metrics import roc_auc_score

from nextvisit.evaluate import evaluation as ev
from nextvisit.evaluate.bootstrap import View, percentile_interval, subject_bootstrap, subject_multiplicities
from nextvisit.evaluate.metrics import (
    RankIndex, auroc, average_precision, best_f1_threshold, calibration_bins, classification_at, stratified_auroc,
)
from nextvisit.evaluate.tables import format_metric, headline_table
from nextvisit.cli import main as cli_main
from nextvisit.errors import UserError

FAST = 200  # bootstrap resamples in end-to-end tests


def write_predictions(folder: Path, model: str, kind: str = "zero-shot", task: str = "dementia",
                      horizons=(730,), n_rows: int = 600, noise: float = 1.0, seed: int = 0, config=None,
                      label_counts=None, prior_occurrence: bool = False, drop=(), info_overrides=None,
                      censoring: bool = False) -> Path:
    """A predictions folder in the contract's schema. Every model of a (task, horizon) shares one cohort
    (labels drawn from a fixed seed); ``noise`` blurs the model's score around the true log-odds; the
    oracle's score is the true risk. Two rows per subject."""
    frames = []
    for horizon in horizons:
        cohort = np.random.default_rng(10_000 + horizon)
        subject_id = np.arange(n_rows) // 2
        age = cohort.uniform(40, 95, n_rows)
        sex = cohort.choice(["F", "M"], n_rows)
        log_odds = -3.0 + 0.06 * (age - 65) + cohort.normal(0, 1.2, n_rows)
        risk = 1 / (1 + np.exp(-log_odds))
        label = cohort.random(n_rows) < risk
        split = np.where(subject_id % 3 == 0, "tuning", "held_out")
        prior = cohort.random(n_rows) < 0.35
        noise_draw = np.random.default_rng(seed).normal(0, noise, n_rows)
        score = risk if kind == "oracle" else 1 / (1 + np.exp(-(log_odds + noise_draw)))
        if prior_occurrence:
            # Recurrences: a subject who had the code usually has it again, and the model knows it.
            label = np.where(prior, cohort.random(n_rows) < 0.8, label)
            score = np.where(prior, 0.5 + 0.5 * score, score)
        columns = {
            "subject_id": subject_id.astype(np.int64),
            "prediction_time": [datetime(2016, 1, 1) + timedelta(days=int(d)) for d in range(n_rows)],
            "boolean_value": label, "task": [task] * n_rows, "horizon_days": np.full(n_rows, horizon, np.int32),
            "split": split, "age_years": age, "sex": sex,
            "predicted_boolean_probability": score.astype(np.float64), "model": [model] * n_rows,
        }
        if prior_occurrence:
            columns["prior_occurrence"] = prior
        if censoring:  # the label stage's carried columns (nextvisit.tasks.censoring)
            columns["censoring_weight"] = 1.0 + cohort.exponential(0.5, n_rows)
            columns["days_after_horizon"] = cohort.integers(0, 2000, n_rows).astype(np.int32)
        frames.append(pl.DataFrame(columns).drop(list(drop)))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pl.concat(frames).write_parquet(folder / "predictions.parquet")
    info = {"model": model, "kind": kind, "task": task, "config": config or {"aggregator": "sum_logits"},
            "label_counts": label_counts if label_counts is not None else {
                f"{task}@{h}": {"held_out": {"labelled": n_rows, "positive": 1, "censored": 17 + h % 7},
                                "tuning": {"censored": 3}} for h in horizons}}
    info.update(info_overrides or {})
    (folder / "info.json").write_text(json.dumps(info))
    return folder


def held_out(folder: Path, horizon: int = 730) -> pl.DataFrame:
    frame = pl.read_parquet(folder / "predictions.parquet")
    return frame.filter((pl.col("split") == "held_out") & (pl.col("horizon_days") == horizon))


def row_for(metrics: dict, task: str, horizon: int, model: str) -> dict:
    group = next(g for g in metrics["tasks"] if g["task"] == task and g["horizon_days"] == horizon)
    return next(r for r in group["rows"] if r["model"] == model)


# ---------------------------------------------------------------------------------------------- metrics


def test_rank_metrics_match_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 300))
        labels = rng.random(n) < rng.uniform(0.05, 0.6)
        labels[:2] = [True, False]
        scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1), int(rng.integers(0, 3)))  # many ties
        weights = rng.uniform(0.1, 3, n)
        assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert auroc(labels, scores, weights) == pytest.approx(
            roc_auc_score(labels, scores, sample_weight=weights), abs=1e-12)
        assert average_precision(labels, scores, weights) == pytest.approx(
            average_precision_score(labels, scores, sample_weight=weights), abs=1e-12)


def test_single_class_auroc_is_nan_not_an_error():
    assert math.isnan(auroc([False, False, False], [0.1, 0.2, 0.3]))
    assert math.isnan(average_precision([False, False], [0.1, 0.2]))


def test_subject_resample_equals_scikit_learn_on_the_resampled_rows():
    rng = np.random.default_rng(1)
    subjects = np.repeat(np.arange(30), rng.integers(1, 6, 30))
    labels = (rng.random(len(subjects)) < 0.3) & np.isin(subjects, np.arange(0, 30, 2))
    scores = np.round(rng.normal(labels * 1.0, 1), 1)
    counts = subject_multiplicities(labels, subjects, 5, np.random.default_rng(2))
    positive_subjects = np.unique(subjects[labels])
    for b in range(5):
        # Clustered: every row of a subject is drawn as often as the subject ...
        per_subject = {s: set(counts[b, subjects == s].tolist()) for s in np.unique(subjects)}
        assert all(len(v) == 1 for v in per_subject.values())
        # ... and stratified by subject outcome: every resample draws as many positive subjects as there are.
        assert sum(per_subject[s].pop() for s in positive_subjects) == len(positive_subjects)
        assert counts[b].sum() > 0
    concordant, pairs, ap = RankIndex(labels, scores).pair_sums(counts)
    for b in range(5):
        rows = np.repeat(np.arange(len(labels)), counts[b].astype(int))
        assert concordant[b] / pairs[b] == pytest.approx(roc_auc_score(labels[rows], scores[rows]), abs=1e-12)
        assert ap[b] == pytest.approx(average_precision_score(labels[rows], scores[rows]), abs=1e-12)


def _clustered(rng, n_subjects: int):
    """Rows correlated within subjects: a subject's rows share its outcome class and a random effect on the
    score; a positive subject's rows are positive with probability 0.7 (landmarks before and near its onset)."""
    rows_per = rng.integers(1, 12, n_subjects)
    subjects = np.repeat(np.arange(n_subjects), rows_per)
    positive_subject = rng.random(n_subjects) < 0.3
    effect = rng.normal(size=n_subjects)
    labels = positive_subject[subjects] & (rng.random(len(subjects)) < 0.7)
    scores = 1.2 * effect[subjects] + 0.6 * positive_subject[subjects] + 0.5 * labels + 0.5 * rng.normal(size=len(subjects))
    return subjects, labels, scores


def test_subject_bootstrap_covers_the_true_auroc_on_correlated_rows_where_a_row_bootstrap_does_not():
    rng = np.random.default_rng(11)
    big_subjects, big_labels, big_scores = _clustered(rng, 200_000)
    truth = auroc(big_labels, big_scores)
    draws, covered, covered_rows = 200, 0, 0
    for _ in range(draws):
        subjects, labels, scores = _clustered(rng, 120)
        boot = subject_bootstrap(labels, scores, subjects, 300, 2_000_000, rng, {"all": View()})
        low, high = percentile_interval(boot.get("all.auroc"), 0.95)
        covered += low <= truth <= high
        row_boot = subject_bootstrap(labels, scores, np.arange(len(labels)), 300, 2_000_000, rng, {"all": View()})
        low, high = percentile_interval(row_boot.get("all.auroc"), 0.95)
        covered_rows += low <= truth <= high
    # Nominal 0.95 (binomial standard error over 200 draws: 0.015); resampling rows ignores the clustering and
    # its intervals are too narrow.
    assert 0.87 <= covered / draws <= 0.99  # measured: 0.905 (rows resampled instead: 0.595)
    assert covered_rows / draws < covered / draws - 0.08


def test_stratified_auroc_counts_only_within_stratum_pairs():
    rng = np.random.default_rng(3)
    n = 400
    strata = rng.choice(["60|F", "60|M", "80|F", "80|M"], n)
    old = np.char.startswith(strata.astype(str), "80")
    labels = rng.random(n) < np.where(old, 0.4, 0.05)
    age_only = old.astype(float)  # a score that knows only the age band
    assert auroc(labels, age_only) > 0.7
    assert stratified_auroc(labels, age_only, strata) == pytest.approx(0.5)
    scores = rng.normal(labels * 1.0, 1)
    brute = num = 0.0
    for i in np.flatnonzero(labels):
        for j in np.flatnonzero(~labels):
            if strata[i] == strata[j]:
                brute += (scores[i] > scores[j]) + 0.5 * (scores[i] == scores[j])
                num += 1
    assert stratified_auroc(labels, scores, strata) == pytest.approx(brute / num)


def test_f1_threshold_maximises_f1_and_metrics_match_scikit_learn():
    rng = np.random.default_rng(4)
    labels = rng.random(300) < 0.2
    scores = np.round(rng.normal(labels * 1.2, 1), 2)
    threshold, best = best_f1_threshold(labels, scores)
    all_f1 = [f1_score(labels, scores >= t) for t in np.unique(scores)]
    assert best == pytest.approx(max(all_f1))
    assert f1_score(labels, scores >= threshold) == pytest.approx(best)
    test_labels = rng.random(200) < 0.2
    test_scores = rng.normal(test_labels * 1.2, 1)
    at = classification_at(test_labels, test_scores, threshold)
    predicted = test_scores >= threshold
    assert at["f1"]["value"] == pytest.approx(f1_score(test_labels, predicted))
    assert at["precision"]["value"] == pytest.approx(precision_score(test_labels, predicted))
    assert at["recall"]["value"] == pytest.approx(recall_score(test_labels, predicted))
    nothing = classification_at(test_labels, test_scores, 1e9)
    assert nothing["precision"]["value"] is None and "threshold" in nothing["precision"]["reason"]


def test_calibration_bins_count_every_row():
    rng = np.random.default_rng(5)
    p = rng.beta(1, 20, 1000)
    y = rng.random(1000) < p
    bins = calibration_bins(y, p, 10)
    assert sum(b["rows"] for b in bins) == 1000 and sum(b["positives"] for b in bins) == y.sum()
    assert len(bins) == 10 and all(90 <= b["rows"] <= 110 for b in bins)
    for b in bins:
        assert b["observed_ci"][0] <= b["observed_rate"] <= b["observed_ci"][1]


# ------------------------------------------------------------------------------------------- bootstrap


def _binormal(rng, n_pos, n_neg, separation):
    labels = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    return labels, np.r_[rng.normal(separation, 1, n_pos), rng.normal(0, 1, n_neg)]


def _auroc_interval(labels, scores, rng, resamples):
    multiplicities = subject_multiplicities(labels, np.arange(len(labels)), resamples, rng)  # one row per subject
    concordant, pairs, _ = RankIndex(labels, scores).pair_sums(multiplicities)
    return percentile_interval(concordant / pairs, 0.95)


def test_bootstrap_interval_shrinks_with_more_data():
    rng = np.random.default_rng(6)
    widths = {}
    for n in (100, 1600):
        labels, scores = _binormal(rng, n // 4, n - n // 4, 1.0)
        low, high = _auroc_interval(labels, scores, rng, 500)
        widths[n] = high - low
    # The width scales like 1/sqrt(n): 16x the data, about a quarter of the width.
    assert widths[1600] < 0.4 * widths[100]


def test_bootstrap_interval_covers_the_true_auroc_at_about_the_nominal_rate():
    separation = 1.0
    truth = 0.5 * (1 + math.erf(separation / math.sqrt(2) / math.sqrt(2)))  # Phi(d / sqrt 2) = 0.760
    rng = np.random.default_rng(7)
    draws, covered = 300, 0
    for _ in range(draws):
        labels, scores = _binormal(rng, 80, 160, separation)
        low, high = _auroc_interval(labels, scores, rng, 300)
        covered += low <= truth <= high
    # Nominal 0.95; the binomial standard error over 300 draws is 0.013.
    assert 0.90 <= covered / draws <= 0.99


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture
def folders(tmp_path):
    return {
        "oracle": write_predictions(tmp_path / "p" / "oracle", "oracle", kind="oracle", horizons=(730, 1825)),
        "nextvisit": write_predictions(tmp_path / "p" / "nextvisit", "nextvisit", horizons=(730, 1825), seed=1,
                                       config={"loss": {"repeat_decay": 0.5, "repeat_floor": 0.1}}),
        "counts": write_predictions(tmp_path / "p" / "counts", "counts", kind="count-features",
                                    horizons=(730, 1825), noise=2.0, seed=2),
    }


def test_evaluate_numbers_match_scikit_learn(folders, tmp_path):
    metrics = ev.evaluate(list(folders.values()), tmp_path / "report", n_bootstrap=FAST, seed=0, progress=False)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert saved["tasks"] == metrics["tasks"]
    for name, folder in folders.items():
        for horizon in (730, 1825):
            rows = held_out(folder, horizon)
            y = rows["boolean_value"].to_numpy()
            p = rows["predicted_boolean_probability"].to_numpy()
            r = row_for(metrics, "dementia", horizon, name)
            assert r["counts"]["positives"] == y.sum() and r["counts"]["negatives"] == (~y).sum()
            assert r["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
            assert r["auprc"]["value"] == pytest.approx(average_precision_score(y, p))
            assert r["brier"]["value"] == pytest.approx(brier_score_loss(y, p))
            assert r["auroc"]["ci"][0] < r["auroc"]["value"] < r["auroc"]["ci"][1]
            subjects = rows.group_by("subject_id").len().join(rows, on="subject_id", maintain_order="right")
            weights = 1 / subjects["len"].to_numpy()
            assert r["auroc_subject_weighted"]["value"] == pytest.approx(
                roc_auc_score(subjects["boolean_value"], subjects["predicted_boolean_probability"], sample_weight=weights))
            # F1 at the tuning split's best threshold, applied to held_out.
            frame = pl.read_parquet(folder / "predictions.parquet").filter(pl.col("horizon_days") == horizon)
            tuning = frame.filter(pl.col("split") == "tuning")
            threshold, _ = best_f1_threshold(tuning["boolean_value"].to_numpy(),
                                                tuning["predicted_boolean_probability"].to_numpy())
            assert r["threshold"]["value"] == pytest.approx(threshold)
            assert r["f1"]["value"] == pytest.approx(f1_score(y, p >= threshold))
            assert r["counts"]["censored"]["value"] == 17 + horizon % 7  # held_out censored from label_counts
            assert sum(b["rows"] for b in r["calibration"]["bins"]) == len(y)


def test_oracle_share_of_margin(folders, tmp_path):
    metrics = ev.evaluate(list(folders.values()), tmp_path / "report", n_bootstrap=FAST, progress=False)
    group = metrics["tasks"][0]
    assert group["oracle"] == "oracle" and group["rows"][0]["is_oracle"]
    oracle_auroc = group["rows"][0]["auroc"]["value"]
    for r in group["rows"][1:]:
        share = r["oracle_share"]
        assert share["value"] == pytest.approx((r["auroc"]["value"] - 0.5) / (oracle_auroc - 0.5))
        assert share["ci"][0] < share["value"] < share["ci"][1]  # paired: same cohort, same resamples
    assert group["rows"][0]["oracle_share"]["value"] is None
    # The oracle (the true risk) beats a model with noise added to the same log-odds.
    assert row_for(metrics, "dementia", 730, "counts")["oracle_share"]["value"] < 1


def test_same_seed_same_numbers_and_headline_table(folders, tmp_path, capsys):
    paths = list(folders.values())
    a = ev.evaluate(paths, tmp_path / "a", n_bootstrap=FAST, seed=3, progress=False)
    b = ev.evaluate(paths, tmp_path / "b", n_bootstrap=FAST, seed=3, progress=False)
    assert a["tasks"] == b["tasks"]
    code = cli_main(["evaluate", *map(str, paths), "--out", str(tmp_path / "c"), "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert code == 0
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    nextvisit = row_for(c, "dementia", 1825, "nextvisit")
    assert format_metric(nextvisit["auroc"]) in out
    assert "dementia, 1825 days" in out and str(tmp_path / "c" / "report.html") in out


def test_thousand_resamples_stay_fast(folders, tmp_path):
    import time

    started = time.perf_counter()
    ev.evaluate(list(folders.values()), tmp_path / "report", n_bootstrap=1000, progress=False)
    # 3 models x 2 horizons, 1,000 resamples each, plus plots: seconds, not minutes.
    assert time.perf_counter() - started < 30


def test_inflation_all_occurrences_versus_new_onsets(tmp_path):
    decayed = write_predictions(tmp_path / "occ" / "decayed", "nextvisit", task="dementia_next_visit", horizons=(0,),
                                prior_occurrence=True, config={"loss": {"repeat_decay": 0.5}}, seed=1)
    plain = write_predictions(tmp_path / "occ" / "plain", "nextvisit", task="dementia_next_visit", horizons=(0,),
                              prior_occurrence=True, config={"loss": {"repeat_decay": 1.0}}, seed=2)
    metrics = ev.evaluate([decayed, plain], tmp_path / "report", n_bootstrap=FAST, progress=False)
    # The same model name twice for one task: kept apart, with a warning.
    assert any("appears 2 times" in w for w in metrics["warnings"])
    (block,) = metrics["inflation"]
    assert [m["model"] for m in block["models"]] == ["nextvisit [decayed]", "nextvisit [plain]"]
    assert [m["repeat_regularization"] for m in block["models"]] == ["repeat_decay=0.5", "off (repeat_decay=1.0)"]
    rows = held_out(decayed, 0)
    new = rows.filter(~pl.col("prior_occurrence"))
    for m in block["models"]:
        assert m["new_onsets"]["positives"] == new["boolean_value"].sum()
        assert m["all_occurrences"]["auroc"]["value"] > m["new_onsets"]["auroc"]["value"] + 0.05
        assert m["difference"]["ci"][0] > 0  # recurrences inflate the figure, beyond the noise
    first = block["models"][0]
    assert first["all_occurrences"]["auroc"]["value"] == pytest.approx(
        roc_auc_score(rows["boolean_value"], rows["predicted_boolean_probability"]))
    new_rows = held_out(decayed, 0).filter(~pl.col("prior_occurrence"))
    assert first["new_onsets"]["auroc"]["value"] == pytest.approx(
        roc_auc_score(new_rows["boolean_value"], new_rows["predicted_boolean_probability"]))


# --------------------------------------------------------------------------------------------- bad input


def test_predictions_without_labels_give_na_with_reason(tmp_path):
    folder = write_predictions(tmp_path / "nolabels", "nextvisit", drop=("boolean_value",))
    metrics = ev.evaluate([folder], tmp_path / "report", n_bootstrap=FAST, progress=False)
    r = row_for(metrics, "dementia", 730, "nextvisit")
    for key in ("auroc", "auprc", "brier", "f1", "auroc_age_sex_stratified"):
        assert r[key]["value"] is None and "boolean_value" in r[key]["reason"]
    assert "n/a" in headline_table(metrics)

    nulls = write_predictions(tmp_path / "nulls", "nextvisit")
    frame = pl.read_parquet(nulls / "predictions.parquet")
    frame.with_columns(pl.lit(None, dtype=pl.Boolean).alias("boolean_value")).write_parquet(nulls / "predictions.parquet")
    metrics = ev.evaluate([nulls], tmp_path / "report2", n_bootstrap=FAST, progress=False)
    r = row_for(metrics, "dementia", 730, "nextvisit")
    assert r["auroc"]["value"] is None and "null" in r["auroc"]["reason"]
    assert r["counts"]["unlabelled_rows_excluded"] == frame.height
    assert any("null boolean_value" in w for w in metrics["warnings"])


def test_single_class_evaluation_set(tmp_path):
    folder = write_predictions(tmp_path / "oneclass", "nextvisit")
    frame = pl.read_parquet(folder / "predictions.parquet").with_columns(pl.lit(False).alias("boolean_value"))
    frame.write_parquet(folder / "predictions.parquet")
    metrics = ev.evaluate([folder], tmp_path / "report", n_bootstrap=FAST, progress=False)
    r = row_for(metrics, "dementia", 730, "nextvisit")
    assert r["auroc"]["value"] is None and "0 positives" in r["auroc"]["reason"]
    assert r["auprc"]["value"] is None and r["f1"]["value"] is None
    assert r["brier"]["value"] == pytest.approx(np.mean(held_out(folder)["predicted_boolean_probability"].to_numpy() ** 2))
    assert (tmp_path / "report" / "report.html").exists()


def test_missing_and_unbounded_scores(tmp_path):
    folder = write_predictions(tmp_path / "scores", "logits")
    frame = pl.read_parquet(folder / "predictions.parquet")
    scores = frame["predicted_boolean_probability"].to_numpy().copy()
    held = (frame["split"] == "held_out").to_numpy()
    first, second = np.flatnonzero(held)[:2]
    scores[first], scores[second] = np.nan, np.inf
    frame.with_columns(pl.Series("predicted_boolean_probability", scores)).write_parquet(folder / "predictions.parquet")
    metrics = ev.evaluate([folder], tmp_path / "report", n_bootstrap=FAST, progress=False)
    r = row_for(metrics, "dementia", 730, "logits")
    assert r["counts"]["missing_score_rows_excluded"] == 1 and r["counts"]["rows"] == held.sum() - 1
    assert any("null/NaN predicted_boolean_probability" in w for w in metrics["warnings"])
    assert r["auroc"]["value"] is not None  # ranks are fine with an infinite score
    assert r["brier"]["value"] is None and "not probabilities" in r["brier"]["reason"]


def test_rows_that_disagree_with_info_json_are_reported(tmp_path):
    folder = write_predictions(tmp_path / "mismatch", "nextvisit", task="knee_oa",
                               info_overrides={"task": "dementia", "model": "renamed"})
    metrics = ev.evaluate([folder], tmp_path / "report", n_bootstrap=FAST, progress=False)
    assert any("rows hold task(s) ['knee_oa']" in w and "info.json says ['dementia']" in w for w in metrics["warnings"])
    assert any("'model' column holds ['nextvisit']" in w for w in metrics["warnings"])
    assert metrics["tasks"][0]["task"] == "knee_oa" and metrics["tasks"][0]["rows"][0]["model"] == "renamed"


def test_a_different_cohort_is_flagged_and_the_oracle_share_has_no_ci(tmp_path):
    oracle = write_predictions(tmp_path / "oracle", "oracle", kind="oracle")
    other = write_predictions(tmp_path / "other", "nextvisit", n_rows=500)
    metrics = ev.evaluate([oracle, other], tmp_path / "report", n_bootstrap=FAST, progress=False)
    assert any("not evaluated on the same held_out rows" in w and "nextvisit 332" in w for w in metrics["warnings"])
    share = row_for(metrics, "dementia", 730, "nextvisit")["oracle_share"]
    assert share["value"] is not None and share["ci"] is None


def test_not_a_predictions_folder_names_it(tmp_path, capsys):
    empty = tmp_path / "not_predictions"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not_predictions: not a predictions folder"):
        ev.evaluate([empty], tmp_path / "report", progress=False)
    assert cli_main(["evaluate", str(empty), "--out", str(tmp_path / "report")]) == 2
    assert "not a predictions folder" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "predictions.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="cannot be read as parquet"):
        ev.evaluate([broken], tmp_path / "report", progress=False)
    typed = write_predictions(tmp_path / "typed", "m")
    frame = pl.read_parquet(typed / "predictions.parquet")
    frame.with_columns(pl.lit("high").alias("predicted_boolean_probability")).write_parquet(typed / "predictions.parquet")
    with pytest.raises(UserError, match="predicted_boolean_probability has type String"):
        ev.evaluate([typed], tmp_path / "report", progress=False)
    missing = write_predictions(tmp_path / "noscore", "m", drop=("predicted_boolean_probability",))
    with pytest.raises(UserError, match="missing column.*predicted_boolean_probability"):
        ev.evaluate([missing], tmp_path / "report", progress=False)


def test_a_parent_folder_expands_to_every_predictions_folder_below(folders, tmp_path):
    metrics = ev.evaluate([tmp_path / "p"], tmp_path / "report", n_bootstrap=FAST, progress=False)
    assert sorted(r["model"] for r in metrics["tasks"][0]["rows"]) == ["counts", "nextvisit", "oracle"]


def test_censored_count_reads_the_shape_every_writer_records():
    from nextvisit.tasks import label_counts

    labels = pl.DataFrame({"task": ["dementia"] * 4, "horizon_days": [730] * 4,
                           "split": ["held_out", "held_out", "held_out", "tuning"],
                           "boolean_value": [True, None, None, None]})
    counts = label_counts(labels)
    assert ev.censored_count(counts, "dementia", 730, "held_out") == (2, "held_out")
    assert ev.censored_count(counts, "dementia", 730, "tuning") == (1, "tuning")
    value, reason = ev.censored_count(counts, "dementia", 1825, "held_out")
    assert value is None and "no censored count" in reason
    value, reason = ev.censored_count({}, "dementia", 730, "held_out")
    assert value is None and "label_counts" in reason


def test_wilson_interval_holds_the_observed_rate_at_the_extremes():
    """Calibration bins with no (or only) positives are common; their interval must hold 0 (or 1) exactly,
    or the calibration plot's error bars would be negative."""
    from nextvisit.evaluate.metrics import wilson_interval

    for n in range(1, 3000):
        low, high = wilson_interval(0, n)
        assert low == 0.0 and 0 < high < 1
        low, high = wilson_interval(n, n)
        assert high == 1.0 and 0 < low < 1
        k = n // 3
        low, high = wilson_interval(k, n)
        assert low <= k / n <= high


def test_weighted_one_landmark_and_final_year_figures_match_their_definitions(tmp_path):
    folder = write_predictions(tmp_path / "p" / "m", "m", censoring=True)
    metrics = ev.evaluate([folder], tmp_path / "report", n_bootstrap=FAST, seed=0, progress=False)
    r = row_for(metrics, "dementia", 730, "m")
    rows = held_out(folder)
    y = rows["boolean_value"].to_numpy()
    p = rows["predicted_boolean_probability"].to_numpy()
    w = rows["censoring_weight"].to_numpy()
    subjects = rows["subject_id"].to_numpy()
    assert r["auroc_ipcw"]["value"] == pytest.approx(roc_auc_score(y, p, sample_weight=w))
    assert r["auprc_ipcw"]["value"] == pytest.approx(average_precision_score(y, p, sample_weight=w))
    assert r["brier_ipcw"]["value"] == pytest.approx(brier_score_loss(y, p, sample_weight=w))
    keep = rows["days_after_horizon"].to_numpy() >= 365
    assert r["auroc_excluding_final_year"]["value"] == pytest.approx(roc_auc_score(y[keep], p[keep]))
    assert r["auroc_ipcw_excluding_final_year"]["value"] == pytest.approx(
        roc_auc_score(y[keep], p[keep], sample_weight=w[keep]))
    assert r["counts"]["excluding_final_year"]["rows"] == keep.sum()
    one = ev.one_landmark_per_subject(subjects, rows["prediction_time"].cast(pl.Int64).to_numpy(), 0)
    assert len(np.unique(subjects[one])) == one.sum() == len(np.unique(subjects))
    assert r["auroc_one_landmark"]["value"] == pytest.approx(roc_auc_score(y[one], p[one]))
    assert r["counts"]["positive_subjects"] == len(np.unique(subjects[y]))
    assert r["counts"]["negative_subjects"] == len(np.unique(subjects)) - len(np.unique(subjects[y]))
    for name in ("auroc_ipcw", "auroc_one_landmark", "auroc_excluding_final_year", "brier_ipcw"):
        low, high = r[name]["ci"]
        assert low < r[name]["value"] < high, name
    assert metrics["settings"]["interval_method"].startswith("percentile interval of subject-level")


def test_without_censoring_columns_the_weighted_figures_are_na_with_the_reason(tmp_path):
    folder = write_predictions(tmp_path / "p" / "m", "m")
    r = row_for(ev.evaluate([folder], tmp_path / "r", n_bootstrap=FAST, progress=False), "dementia", 730, "m")
    assert r["auroc_ipcw"]["value"] is None and "censoring weights" in r["auroc_ipcw"]["reason"]
    assert r["auroc_excluding_final_year"]["value"] is None and "days_after_horizon" in r["auroc_excluding_final_year"]["reason"]
    assert r["auroc_one_landmark"]["value"] is not None  # needs nothing but subjects


def test_censoring_rates_by_horizon_end_year_come_from_the_label_counts(tmp_path):
    counts = {"dementia@730": {"held_out": {"labelled": 600, "positive": 1, "negative": 1, "censored": 30,
                                            "censored_by_horizon_end_year": {"2019": {"rows": 40, "censored": 10},
                                                                             "2018": {"rows": 50, "censored": 5}}}}}
    folder = write_predictions(tmp_path / "p" / "m", "m", label_counts=counts)
    metrics = ev.evaluate([folder], tmp_path / "r", n_bootstrap=FAST, progress=False)
    table = metrics["tasks"][0]["censoring"]["by_horizon_end_year"]
    assert table == [{"year": 2018, "rows": 50, "censored": 5, "rate": 0.1},
                     {"year": 2019, "rows": 40, "censored": 10, "rate": 0.25}]


def test_a_view_whose_resamples_can_lose_its_positives_says_how_many_resamples_its_interval_used(tmp_path):
    folder = write_predictions(tmp_path / "p" / "m", "m", censoring=True)
    frame = pl.read_parquet(folder / "predictions.parquet")
    # every held_out positive but one falls into the final year: the final-year-excluded view keeps one
    positive_rows = frame.filter(pl.col("boolean_value") & (pl.col("split") == "held_out"))
    keep_one = positive_rows["prediction_time"][0]
    frame = frame.with_columns(days_after_horizon=pl.when(
        pl.col("boolean_value") & (pl.col("prediction_time") != keep_one)).then(pl.lit(10, dtype=pl.Int32))
        .otherwise(pl.lit(1000, dtype=pl.Int32)))
    frame.write_parquet(folder / "predictions.parquet")
    metrics = ev.evaluate([folder], tmp_path / "r", n_bootstrap=FAST, progress=False)
    r = row_for(metrics, "dementia", 730, "m")
    assert r["counts"]["excluding_final_year"]["positive_subjects"] == 1
    assert 0 < r["auroc_excluding_final_year"]["resamples_used"] < FAST
    assert any("excluding_final_year interval from" in w for w in metrics["warnings"])
    assert any("positive subjects in the excluding final year view" in w for w in metrics["warnings"])
    assert "resamples_used" not in r["auroc"]  # the full row set never loses a class


def test_selection_is_read_per_task_and_horizon_or_for_the_model():
    def pred(selection, horizon=730):
        return ev.ModelPredictions(name="m", kind="count-features", task="t", horizon_days=horizon,
                                   frame=pl.DataFrame(), source="x", info={"selection": selection})
    record = {"method": "tuning", "chosen": {"C": 1.0}}
    assert ev._selection(pred({"t@730": record})) == record
    assert ev._selection(pred({"t@730": record}, horizon=1825)) is None
    assert ev._selection(pred(record, horizon=1825)) == record
