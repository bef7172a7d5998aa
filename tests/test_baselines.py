"""Baselines on identical cohorts: counts and occurrence times match a hand computation, nothing after the
prediction time is seen, hyper-parameters are chosen on tuning rows when they hold 30 positive subjects and
by subject-grouped cross-validation within train otherwise, fine-tuning learns a planted signal, and the
predictions folder follows docs/interfaces.md §6."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from nextvisit.baselines import counts, selection
from nextvisit.compare import Labels
from nextvisit.errors import UserError

T0 = datetime(2020, 6, 1)


def write_meds(folder: Path, events: list[tuple], splits: dict[int, str]) -> Path:
    """A MEDS 0.4 dataset from ``(subject_id, time, code, numeric_value)`` tuples."""
    (folder / "data").mkdir(parents=True)
    (folder / "metadata").mkdir()
    frame = pl.DataFrame(
        events, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32},
        orient="row",
    ).sort("subject_id", "time", nulls_last=False)
    frame.write_parquet(folder / "data" / "0.parquet")
    pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())},
                 schema={"subject_id": pl.Int64, "split": pl.String}).write_parquet(folder / "metadata" / "subject_splits.parquet")
    codes = sorted(frame["code"].unique().to_list())
    pl.DataFrame({"code": codes, "description": codes, "parent_codes": [[] for _ in codes]},
                 schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)}).write_parquet(
        folder / "metadata" / "codes.parquet")
    (folder / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "tiny", "meds_version": "0.4"}))
    return folder


def write_labels(folder: Path, rows: list[dict], remove_from_inputs=()) -> Path:
    """``LABELS/labels.parquet`` + ``task.yaml`` (docs/interfaces.md §5)."""
    folder.mkdir(parents=True)
    schema = {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean,
              "reason": pl.String, "task": pl.String, "horizon_days": pl.Int32, "split": pl.String,
              "age_years": pl.Float64, "sex": pl.String}
    filled = [{"reason": "positive" if r.get("boolean_value") else "negative", "task": "toy", "horizon_days": 730,
               "age_years": 70.0, "sex": "F", **r} for r in rows]
    pl.DataFrame(filled, schema=schema).write_parquet(folder / "labels.parquet")
    task = {"name": "toy", "condition": {"code_prefixes": ["OUTCOME"]}, "horizons_days": [730],
            "remove_from_inputs": {"code_prefixes": list(remove_from_inputs)}}
    (folder / "task.yaml").write_text(yaml.safe_dump(task))
    return folder


# -- count features ---------------------------------------------------------------------------------------

def _hand_dataset(tmp_path):
    d = lambda y, m, day: datetime(y, m, day)  # noqa: E731
    events = [
        (1, None, "GENDER//F", None), (1, d(1950, 1, 1), "MEDS_BIRTH", None),
        (1, d(2018, 1, 1), "A", None),                       # all history only
        (1, d(2019, 7, 1), "A", None), (1, d(2019, 7, 1), "A", None),  # same visit: counts once
        (1, d(2019, 7, 1), "B", None),
        (1, T0, "C", None),                                  # at the prediction time: known
        (1, T0, "ICD10CM//R41.1", None),                     # removed from the inputs by the task
        (1, T0 + timedelta(days=1), "D", None),              # after the prediction time: never counted
        (1, T0 + timedelta(days=400), "A", None),
        (2, None, "GENDER//M", None), (2, d(1950, 1, 1), "MEDS_BIRTH", None),
        (2, d(2019, 1, 1), "D", None), (2, d(2019, 1, 1), "ICD10CM//R41.1", None),
        (3, d(2019, 1, 1), "HELDOUT_ONLY", None), (3, d(2019, 1, 1), "A", None),
        (4, d(2019, 1, 1), "A", None),
    ]
    meds_dir = write_meds(tmp_path / "meds", events, {1: "train", 2: "train", 3: "held_out", 4: "tuning"})
    labels = write_labels(tmp_path / "labels", [
        {"subject_id": 1, "prediction_time": T0, "boolean_value": True, "split": "train"},
        {"subject_id": 2, "prediction_time": T0, "boolean_value": False, "split": "train", "sex": "M"},
        {"subject_id": 3, "prediction_time": T0, "boolean_value": False, "split": "held_out"},
        {"subject_id": 4, "prediction_time": T0, "boolean_value": None, "reason": "censored_lost_to_followup",
         "split": "tuning"},
    ], remove_from_inputs=["ICD10CM//R41"])
    return meds_dir, labels


def test_counts_match_hand_computation(tmp_path):
    meds_dir, labels_dir = _hand_dataset(tmp_path)
    labels = Labels.load(labels_dir)
    label_counts = labels.counts
    config = counts.CountsConfig(min_code_count=1)
    rows, features, inputs = counts.build_features(meds_dir, labels, config)
    # the vocabulary is fit on train histories only, without removed codes or codes seen after the cut
    names = features.names
    assert names == ["365d:visits", "365d:A", "365d:B", "365d:C", "365d:D",
                     "all:visits", "all:A", "all:B", "all:C", "all:D"]
    history = rows.filter(pl.col("subject_id") == 1)["history_id"].item()
    got = dict(zip(names, features.matrix[history].toarray().ravel()))
    assert got == {"365d:visits": 2, "365d:A": 1, "365d:B": 1, "365d:C": 1, "365d:D": 0,
                   "all:visits": 3, "all:A": 2, "all:B": 1, "all:C": 1, "all:D": 0}
    # two events after the prediction time (D and a late A) and the removed code at T0 are counted, not used
    assert inputs["after_prediction_time"] == 2
    assert inputs["removed_from_inputs"] == 2  # subject 1 at T0 and subject 2
    # the censored row is neither featurised nor hidden: it is counted
    assert 4 not in rows["subject_id"].to_list()
    tuning = label_counts["toy@730"]["tuning"]
    assert {k: tuning[k] for k in ("labelled", "positive", "negative", "censored")} == {
        "labelled": 0, "positive": 0, "negative": 0, "censored": 1}


def test_count_window_edges(tmp_path):
    """An event exactly 365 days before the prediction day falls outside the 365-day window; one a day later is
    inside; an event at the prediction time counts; one a second later does not."""
    events = [
        (1, T0 - timedelta(days=365), "EDGE_OUT", None),
        (1, T0 - timedelta(days=364), "EDGE_IN", None),
        (1, T0, "AT", None),
        (1, T0 + timedelta(seconds=1), "AFTER", None),
        (2, T0 - timedelta(days=10), "AFTER", None),
    ]
    meds_dir = write_meds(tmp_path / "meds", events, {1: "train", 2: "train"})
    labels_dir = write_labels(tmp_path / "labels", [
        {"subject_id": 1, "prediction_time": T0, "boolean_value": True, "split": "train"},
        {"subject_id": 2, "prediction_time": T0, "boolean_value": False, "split": "train"}])
    rows, features, _ = counts.build_features(meds_dir, Labels.load(labels_dir), counts.CountsConfig(min_code_count=1))
    history = rows.filter(pl.col("subject_id") == 1)["history_id"].item()
    got = dict(zip(features.names, features.matrix[history].toarray().ravel()))
    assert got["365d:EDGE_OUT"] == 0 and got["all:EDGE_OUT"] == 1
    assert got["365d:EDGE_IN"] == 1 and got["365d:AT"] == 1
    assert got["all:AFTER"] == 0 and got["all:visits"] == 3


def test_occurrence_times_match_hand_computation(tmp_path):
    """The observable reference's occurrence-time bins: days from a code's first (last) visit to the prediction
    day; nothing after the prediction time and no removed code reaches them."""
    meds_dir, labels_dir = _hand_dataset(tmp_path)
    config = counts.CountsConfig(min_code_count=1, features="observable", occurrence_times=["first", "last"],
                                 time_bins_days=[90, 365, 730, 1825, 3650])
    rows, features, _ = counts.build_features(meds_dir, Labels.load(labels_dir), config)
    assert len(features.time_names) == 2 * 5 * 6  # first/last x (visits + A B C D) x 6 bins
    assert not any("R41" in name for name in features.names + features.time_names)
    history = rows.filter(pl.col("subject_id") == 1)["history_id"].item()
    row = features.times[history].toarray().ravel()
    on = {name for name, value in zip(features.time_names, row) if value}
    # A first on 2018-01-01 (882 days before 2020-06-01), last and B on 2019-07-01 (336 days), C at T0 (0 days);
    # D and the late A come after the prediction time
    assert on == {"first:visits:[730d,1825d)", "last:visits:<90d", "first:A:[730d,1825d)", "last:A:[90d,365d)",
                  "first:B:[90d,365d)", "last:B:[90d,365d)", "first:C:<90d", "last:C:<90d"}
    assert row.sum() == len(on)  # one bin per (occurrence, code) present


def _signal_dataset(tmp_path, n_subjects=240, seed=0, later_events=False, at_time_events=False):
    """Subjects with code SIGNAL before the prediction time are positive 85% of the time, others 10%.
    ``later_events`` adds a SIGNAL event after every prediction time, ``at_time_events`` one at exactly the
    prediction time; neither changes anything else."""
    rng = np.random.default_rng(seed)
    events, splits, rows = [], {}, []
    for s in range(1, n_subjects + 1):
        split = "train" if s % 4 in (0, 1) else ("tuning" if s % 4 == 2 else "held_out")
        splits[s] = split
        birth = datetime(1940 + int(rng.integers(0, 20)), 1, 1)
        events += [(s, None, "GENDER//" + ("F" if s % 2 else "M"), None), (s, birth, "MEDS_BIRTH", None)]
        has_signal = rng.random() < 0.4
        for v in range(int(rng.integers(3, 7))):
            day = T0 - timedelta(days=int(rng.integers(1, 1500)))
            events.append((s, day, "VISIT//OUTPATIENT", None))
            events.append((s, day, f"NOISE//{int(rng.integers(0, 8))}", None))
            events.append((s, day, "LOINC//4548-4", float(rng.normal(6, 1))))
        if has_signal:
            events.append((s, T0 - timedelta(days=int(rng.integers(1, 300))), "SIGNAL", None))
        if later_events:
            events.append((s, T0 + timedelta(days=30), "SIGNAL", None))
        if at_time_events:
            events.append((s, T0, "SIGNAL", None))
        positive = rng.random() < (0.85 if has_signal else 0.1)
        rows.append({"subject_id": s, "prediction_time": T0, "boolean_value": bool(positive), "split": split,
                     "age_years": (T0 - birth).days / 365.25, "sex": "F" if s % 2 else "M"})
    meds_dir = write_meds(tmp_path / "meds", events, splits)
    labels_dir = write_labels(tmp_path / "labels", rows)
    return meds_dir, labels_dir


def _auroc(predictions: pl.DataFrame, split="held_out") -> float:
    from sklearn.metrics import roc_auc_score

    part = predictions.filter(pl.col("split") == split)
    return roc_auc_score(part["boolean_value"].to_numpy(), part["predicted_boolean_probability"].to_numpy())


@pytest.mark.parametrize("model", ["logistic", "gbt"])
def test_count_model_learns_signal_and_writes_predictions(tmp_path, model):
    meds_dir, labels_dir = _signal_dataset(tmp_path)
    out = counts.run(meds_dir, labels_dir, tmp_path / "pred", counts.CountsConfig(model=model, min_code_count=2))
    predictions = pl.read_parquet(out)
    assert set(predictions["split"].unique()) == {"tuning", "held_out"}
    assert predictions.schema["predicted_boolean_probability"] == pl.Float64
    assert predictions["predicted_boolean_probability"].is_between(0, 1).all()
    assert _auroc(predictions) > 0.75
    info = json.loads((tmp_path / "pred" / "info.json").read_text())
    assert info["kind"] == "count-features" and info["model"] == f"counts-{model}" and info["task"] == "toy"


@pytest.mark.parametrize("features", ["counts", "observable"])
def test_count_predictions_ignore_later_events(tmp_path, features):
    """Adding a strongly predictive code after every prediction time changes no prediction (of the count
    baseline, or of the observable reference with first and last occurrence times); the same code at exactly
    the prediction time is known, so it does."""
    config = counts.CountsConfig(min_code_count=2, features=features, occurrence_times=["first", "last"])

    def probabilities(name, **planted):
        out = counts.run(*_signal_dataset(tmp_path / name, **planted), tmp_path / name / "pred", config)
        return pl.read_parquet(out)["predicted_boolean_probability"].to_numpy()

    base = probabilities("base")
    assert np.array_equal(base, probabilities("later", later_events=True))
    assert np.abs(base - probabilities("at_time", at_time_events=True)).max() > 0.01


def test_observable_reference_writes_its_kind_and_learns(tmp_path):
    from nextvisit.cli import main

    meds_dir, labels_dir = _signal_dataset(tmp_path)
    config = tmp_path / "counts.yaml"
    config.write_text("min_code_count: 2\n")
    out = tmp_path / "pred"
    assert main(["baseline", "counts", str(meds_dir), str(labels_dir), "--out", str(out), "--config", str(config),
                 "--observable"]) == 0
    info = json.loads((out / "info.json").read_text())
    assert info["kind"] == "observable-reference" and info["model"] == "observable_reference"
    assert info["config"]["features"] == "observable"
    assert info["feature_columns"] > 2 * (info["inputs"]["feature_codes"] + 1)  # occurrence bins beside counts
    assert _auroc(pl.read_parquet(out / "predictions.parquet")) > 0.75


def _whole_frame_counts(meds_dir: Path, labels: Labels, config) -> pl.DataFrame:
    """The long tables as computed before chunking: every history's events in one frame, then one
    ``window_counts`` (the reference the chunked reader must equal)."""
    from nextvisit.data.histories import read_histories

    events = pl.concat([c.events for c in read_histories(meds_dir, labels.histories, labels.remove_from_inputs)])
    return counts.window_counts(counts.visit_code_days(events), config.lookback_days)


def _as_strings(cells) -> pl.DataFrame:
    return (cells.counts.join(cells.codes, on="code_id", how="left")
            .select("history_id", "window", "code", "count").sort("history_id", "window", "code", nulls_last=False))


@pytest.mark.parametrize("histories_per_chunk", [1, 7])
def test_chunked_count_features_equal_the_whole_frame(tmp_path, histories_per_chunk):
    """Counting a few histories at a time gives the cells, vocabulary, matrices and input counts of counting
    every history's events in one frame: chunks hold whole histories and every cell is one history's."""
    meds_dir, labels_dir = _signal_dataset(tmp_path, n_subjects=60)
    labels = Labels.load(labels_dir)
    whole, chunked = (counts.CountsConfig(features="observable", occurrence_times=["first", "last"], min_code_count=2,
                                          histories_per_chunk=size) for size in (10**6, histories_per_chunk))
    cells, _ = counts.read_counts(meds_dir, labels, chunked)
    reference = _whole_frame_counts(meds_dir, labels, whole).sort("history_id", "window", "code", nulls_last=False)
    assert _as_strings(cells).equals(reference)
    (_, a, inputs_a), (_, b, inputs_b) = (counts.build_features(meds_dir, labels, c) for c in (whole, chunked))
    assert inputs_a == inputs_b and inputs_a["feature_codes"] > 0
    assert a.names == b.names and a.time_names == b.time_names
    for x, y in ((a.matrix, b.matrix), (a.times, b.times)):
        assert x.shape == y.shape and x.nnz > 0
        assert np.array_equal(x.indptr, y.indptr) and np.array_equal(x.indices, y.indices)
        assert np.array_equal(x.data, y.data)


def test_chunked_count_predictions_equal_the_whole_frame(tmp_path):
    """The same probabilities, bit for bit, whatever the chunk size."""
    meds_dir, labels_dir = _signal_dataset(tmp_path, n_subjects=80)
    probabilities = []
    for size in (10**6, 3):
        out = counts.run(meds_dir, labels_dir, tmp_path / f"pred{size}", counts.CountsConfig(histories_per_chunk=size))
        predictions = pl.read_parquet(out).sort("subject_id", "prediction_time")
        probabilities.append(predictions["predicted_boolean_probability"].to_numpy())
    assert np.array_equal(probabilities[0], probabilities[1])


def test_counts_hold_one_chunk_of_events_at_a_time(tmp_path, monkeypatch):
    """Memory is bounded by the chunk: no step sees the events of more than ``histories_per_chunk``
    histories."""
    meds_dir, labels_dir = _signal_dataset(tmp_path, n_subjects=60)
    seen = []
    original = counts.visit_code_days
    monkeypatch.setattr(counts, "visit_code_days",
                        lambda events: seen.append(events["history_id"].n_unique()) or original(events))
    counts.read_counts(meds_dir, Labels.load(labels_dir), counts.CountsConfig(histories_per_chunk=5))
    assert len(seen) == 12 and max(seen) == 5  # 60 histories: 12 chunks of 5


def test_histories_of_a_subject_split_over_two_shards_are_refused(tmp_path):
    meds_dir, labels_dir = _signal_dataset(tmp_path, n_subjects=8)
    shard = meds_dir / "data" / "0.parquet"
    frame = pl.read_parquet(shard)
    subject_3 = frame.filter(pl.col("subject_id") == 3)
    frame.filter(pl.col("subject_id") != 3).vstack(subject_3.head(-1)).write_parquet(shard)
    subject_3.tail(1).write_parquet(meds_dir / "data" / "1.parquet")
    with pytest.raises(UserError, match=r"1\.parquet: subject 3 also appears in an earlier shard; MEDS shards must"):
        counts.build_features(meds_dir, Labels.load(labels_dir), counts.CountsConfig(min_code_count=1))


# -- hyper-parameter selection ----------------------------------------------------------------------------

def test_selection_counts_positive_subjects_not_rows():
    """30 positive subjects choose on tuning; 29 subjects with two positive rows each do not."""
    def tuning(subjects, rows_each):
        ids = [s for s in range(subjects) for _ in range(rows_each)] + [1000, 1001]
        return pl.DataFrame({"subject_id": ids, "boolean_value": [True] * (subjects * rows_each) + [False, False]})

    assert selection.method(tuning(30, 1)) == selection.TUNING
    assert selection.method(tuning(29, 2)) == selection.CV_WITHIN_TRAIN
    assert selection.positive_counts(tuning(29, 2)) == (29, 58)
    assert selection.record(selection.TUNING, tuning(30, 1), None, {"C": 1.0})["folds"] is None


def test_subject_folds_keep_each_subject_in_one_fold():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(60), rng.integers(1, 6, 60))  # 1-5 rows per subject
    positive_subject = rng.random(60) < 0.3
    # a subject's rows need not agree (a positive at one landmark, negatives at others)
    label = positive_subject[subjects] & (rng.random(len(subjects)) < 0.7)
    label[np.searchsorted(subjects, np.flatnonzero(positive_subject))] = True
    rows = pl.DataFrame({"subject_id": subjects, "boolean_value": label})
    fold = selection.subject_folds(rows, 5, seed=0)
    per_subject = rows.with_columns(fold=pl.Series(fold)).group_by("subject_id").agg(pl.col("fold").n_unique())
    assert set(fold) == set(range(5)) and per_subject["fold"].max() == 1
    positives = rows.with_columns(fold=pl.Series(fold)).filter(pl.col("boolean_value")).group_by("fold").agg(
        pl.col("subject_id").n_unique())["subject_id"]
    assert positives.min() >= int(positive_subject.sum()) // 5 - 1  # positive subjects spread over the folds
    # fewer folds than asked when train holds fewer positive subjects; none when fewer than two
    three = rows.filter(~pl.col("subject_id").is_in(np.flatnonzero(positive_subject)[3:].tolist()))
    assert set(selection.subject_folds(three, 5, seed=0)) == {0, 1, 2}
    one = rows.filter(~pl.col("subject_id").is_in(np.flatnonzero(positive_subject)[1:].tolist()))
    assert selection.subject_folds(one, 5, seed=0) is None


def _with_tuning_labels_shuffled(labels_dir: Path, out: Path) -> Path:
    """A copy of a labels folder whose tuning labels are permuted (the same number of positives)."""
    labels = pl.read_parquet(labels_dir / "labels.parquet")
    tuning = labels["split"] == "tuning"
    shuffled = labels["boolean_value"].to_numpy().copy()
    shuffled[tuning.to_numpy()] = np.random.default_rng(1).permutation(shuffled[tuning.to_numpy()])
    out.mkdir()
    labels.with_columns(pl.Series("boolean_value", shuffled)).write_parquet(out / "labels.parquet")
    (out / "task.yaml").write_text((labels_dir / "task.yaml").read_text())
    return out


@pytest.mark.parametrize("model", ["logistic", "gbt"])
def test_counts_choose_by_cross_validation_when_tuning_is_small(tmp_path, model):
    """Tuning holds fewer than 30 positive subjects: C (or the trees' iterations) is chosen by grouped
    folds of train, recorded in info.json, and the tuning labels take no part in the fit."""
    meds_dir, labels_dir = _signal_dataset(tmp_path)
    tuning = pl.read_parquet(labels_dir / "labels.parquet").filter(pl.col("split") == "tuning")
    assert selection.positive_counts(tuning)[0] < selection.MIN_TUNING_POSITIVE_SUBJECTS
    config = counts.CountsConfig(model=model, min_code_count=2, c_values=[0.001, 0.1, 10.0])
    out = counts.run(meds_dir, labels_dir, tmp_path / "pred", config)
    chosen = json.loads((tmp_path / "pred" / "info.json").read_text())["selection"]["toy@730"]
    assert chosen["method"] == "cv_within_train" and chosen["folds"] == config.cv_folds
    assert chosen["tuning_positive_subjects"] == selection.positive_counts(tuning)[0]
    assert chosen["threshold_positive_subjects"] == 30
    if model == "logistic":
        best = max(chosen["scores"], key=lambda score: score["auroc"])
        assert chosen["chosen"] == {"C": best["C"]} and len(chosen["scores"]) == 3
    else:
        folds = [score["iterations"] for score in chosen["scores"]]
        assert len(folds) == config.cv_folds and chosen["chosen"]["iterations"] == int(np.median(folds))
    shuffled = counts.run(meds_dir, _with_tuning_labels_shuffled(labels_dir, tmp_path / "shuffled"),
                          tmp_path / "pred_shuffled", config)
    assert np.array_equal(pl.read_parquet(out)["predicted_boolean_probability"].to_numpy(),
                          pl.read_parquet(shuffled)["predicted_boolean_probability"].to_numpy())


def test_counts_choose_on_tuning_when_it_holds_30_positive_subjects(tmp_path):
    from sklearn.metrics import roc_auc_score

    meds_dir, labels_dir = _signal_dataset(tmp_path, n_subjects=400)
    tuning = pl.read_parquet(labels_dir / "labels.parquet").filter(pl.col("split") == "tuning")
    assert selection.positive_counts(tuning)[0] >= selection.MIN_TUNING_POSITIVE_SUBJECTS
    config = counts.CountsConfig(min_code_count=2, c_values=[0.001, 0.1, 10.0])
    predictions = pl.read_parquet(counts.run(meds_dir, labels_dir, tmp_path / "pred", config))
    chosen = json.loads((tmp_path / "pred" / "info.json").read_text())["selection"]["toy@730"]
    assert chosen["method"] == "tuning" and chosen["folds"] is None
    best = max(chosen["scores"], key=lambda score: score["auroc"])
    assert chosen["chosen"] == {"C": best["C"]}
    # the recorded score is the tuning AUROC of the model that wrote the predictions
    scored = predictions.filter(pl.col("split") == "tuning")
    assert roc_auc_score(scored["boolean_value"], scored["predicted_boolean_probability"]) == pytest.approx(best["auroc"])


def test_count_config_rejects_unknown_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lookback_dayz: [30]\n")
    with pytest.raises(UserError, match="lookback_dayz"):
        counts.CountsConfig.from_yaml(path)
    # YAML reads 1e-1 as text and null as None: both are what the user meant
    path.write_text("default_c: 1e-1\nlookback_days: [30, null]\nclass_weight: null\n")
    config = counts.CountsConfig.from_yaml(path, model="gbt")
    assert config.default_c == 0.1 and config.lookback_days == [30, None] and config.model == "gbt"
    # numeric text inside a list is a number too; a bare number for a list field is one clear error
    path.write_text("c_values: [1e-3, 1e-2]\n")
    assert counts.CountsConfig.from_yaml(path).c_values == [0.001, 0.01]
    path.write_text("lookback_days: 365\n")
    with pytest.raises(UserError, match="lookback_days must be a list"):
        counts.CountsConfig.from_yaml(path)


def test_selection_settings_are_checked(tmp_path):
    from nextvisit.baselines.masked.config import finetune_config

    for bad, message in (({"features": "everything"}, "features"), ({"occurrence_times": ["middle"]}, "occurrence"),
                         ({"time_bins_days": [365, 90]}, "time_bins_days"), ({"cv_folds": 1}, "cv_folds")):
        with pytest.raises(UserError, match=message):
            counts.CountsConfig(**bad)
    path = tmp_path / "finetune.yaml"
    for text, message in (("cv_folds_run: 6\n", "cv_folds_run"), ("cv_refit: false\n", "cv_folds_run: 1")):
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            finetune_config({}, tmp_path, path)
    path.write_text("cv_folds_run: 1\ncv_refit: false\n")
    assert finetune_config({}, tmp_path, path).cv_refit is False


def test_labels_with_a_subject_in_two_splits_or_null_keys_are_refused(tmp_path):
    base = {"subject_id": 1, "prediction_time": T0, "boolean_value": True}
    mixed = write_labels(tmp_path / "mixed", [{**base, "split": "train"},
                                              {**base, "prediction_time": T0 + timedelta(days=400), "split": "held_out"}])
    with pytest.raises(UserError, match="subject 1 has rows in more than one split"):
        Labels.load(mixed)
    null_time = write_labels(tmp_path / "null", [{**base, "split": "train"}, {**base, "prediction_time": None,
                                                                              "split": "train"}])
    with pytest.raises(UserError, match="null prediction_time"):
        Labels.load(null_time)


def test_missing_labels_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="labels.parquet"):
        Labels.load(tmp_path)


# -- masked transformer -----------------------------------------------------------------------------------

def build_store(meds_dir: Path, store_dir: Path) -> Path:
    """A token store of a tiny MEDS dataset: vocabulary fit on train events, every split tokenized through
    ``Tokenizer.subjects`` and written with ``SplitWriter``."""
    from nextvisit.tokenize.store import SPLITS, SplitWriter, write_store_info
    from nextvisit.tokenize.tokenizer import Tokenizer

    events = pl.read_parquet(meds_dir / "data" / "0.parquet")
    splits = pl.read_parquet(meds_dir / "metadata" / "subject_splits.parquet")
    events = events.join(splits, on="subject_id")
    tokenizer = Tokenizer.fit(events.filter(pl.col("split") == "train").drop("split"))
    store_dir.mkdir(parents=True)
    tokenizer.save(store_dir)
    sizes = {}
    for split in SPLITS:
        writer = SplitWriter(store_dir / split)
        for subject in tokenizer.subjects(events.filter(pl.col("split") == split).drop("split")):
            writer.append(subject.subject_id, subject.birth_day, subject.visit_days, np.diff(subject.visit_offsets),
                          subject.tokens)
        sizes[split] = writer.close()
    write_store_info(store_dir, sizes, len(tokenizer.vocab))
    return store_dir


def test_masked_window_layout():
    """CLS, then each visit's tokens closed by SEP; days relative to the first kept visit; types = visit
    index; the most recent visits are kept when the history is longer than the context."""
    from nextvisit.baselines import masked
    from nextvisit.tokenize.store import CLS, SEP, Subject

    subject = Subject(subject_id=7, birth_day=0, visit_days=np.array([100, 130, 200], np.int32),
                      visit_offsets=np.array([0, 2, 5, 6]), tokens=np.array([10, 11, 12, 13, 14, 15], np.int32))
    config = masked.MaskedModelConfig(vocab_size=20, context=64, max_visit_types=3)
    tokens, days, types = masked.window_arrays(subject, 0, 3, config, cls_day=230)
    assert tokens.tolist() == [CLS, 10, 11, SEP, 12, 13, 14, SEP, 15, SEP]
    assert days.tolist() == [130, 0, 0, 0, 30, 30, 30, 30, 100, 100]
    assert types.tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]  # visit 3 shares the last (clipped) type
    # a 9-token context keeps CLS + the last two visits (4 + 2 tokens with their SEPs)
    small = masked.MaskedModelConfig(vocab_size=20, context=9)
    start = masked.recent_start(subject, small.context)
    assert start == 1
    tokens, days, _ = masked.window_arrays(subject, start, 3, small, cls_day=230)
    assert tokens.tolist() == [CLS, 12, 13, 14, SEP, 15, SEP] and days.tolist() == [100, 0, 0, 0, 0, 70, 70]


def test_evaluation_subset_keeps_the_rare_positives():
    """The stopping rule's evaluation histories: every positive history (of any output) while they fit in half the
    budget, the rest at random from the others; censored cells count as neither; a uniform draw of 500 of 8,000
    histories at 2.5% prevalence would keep about 12 positives, this keeps all 200."""
    from nextvisit.baselines.masked.finetune import evaluation_subset

    n = 8000
    targets = np.zeros((n, 2), np.float32)
    labelled = np.ones((n, 2), bool)
    targets[:150, 0] = 1
    targets[100:200, 1] = 1
    targets[200:260, 0], labelled[200:260, 0] = 1, False  # censored cells are not positives
    ids = np.arange(n)[::-1].copy()
    chosen = evaluation_subset(ids, targets, labelled, 500, np.random.default_rng(0))
    assert len(chosen) == 500 and len(np.unique(chosen)) == 500 and np.all(np.diff(chosen) > 0)
    assert set(range(200)) <= set(chosen.tolist())
    assert set(chosen.tolist()) <= set(ids.tolist())
    # more positives than half the budget: half the budget of them, drawn at random, the other half negatives
    chosen = evaluation_subset(ids, targets, labelled, 100, np.random.default_rng(1))
    positive = (targets[chosen] * labelled[chosen]).any(axis=1)
    assert len(chosen) == 100 and positive.sum() == 50
    # too few negatives to fill half the budget: positives fill the rest, the budget is still met
    chosen = evaluation_subset(ids[-240:], targets, labelled, 200, np.random.default_rng(1))
    positive = (targets[chosen] * labelled[chosen]).any(axis=1)
    assert len(chosen) == 200 and (~positive).sum() == 40 and positive.sum() == 160
    # budget 0 or at least every history: all of them, unchanged
    assert np.array_equal(evaluation_subset(ids, targets, labelled, 0, np.random.default_rng(0)), ids)
    assert np.array_equal(evaluation_subset(ids[:10], targets, labelled, 10, np.random.default_rng(0)), ids[:10])


TINY_MASKED = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "context": 64, "dropout": 0.0},
    "pretrain": {"batch_size": 16, "max_steps": 15, "eval_every": 5, "eval_batches": 1, "warmup_steps": 5,
                 "max_minutes": None},
    # all five folds of the cross-validation within train (the tiny preset runs one)
    "finetune": {"batch_size": 16, "max_epochs": 25, "patience": 8, "lr": 3e-3, "warmup_steps": 5,
                 "max_minutes": None, "cv_folds_run": None},
}


@pytest.fixture(scope="module")
def masked_runs(tmp_path_factory):
    """A signal dataset, its token store, a masked pretraining run and a fine-tuned run (built once)."""
    from nextvisit.baselines import masked

    root = tmp_path_factory.mktemp("masked")
    meds_dir, labels_dir = _signal_dataset(root / "data")
    store = build_store(meds_dir, root / "store")
    config = root / "masked.yaml"
    config.write_text(yaml.safe_dump(TINY_MASKED))
    run = masked.pretrain(store, root / "run", preset="tiny", config_path=config)
    tuned = masked.finetune(run, meds_dir, labels_dir, root / "tuned")
    return {"root": root, "meds": meds_dir, "labels": labels_dir, "run": run, "tuned": tuned}


def test_masked_pretraining_lowers_masked_token_loss(masked_runs):
    metrics = pl.read_csv(masked_runs["run"] / "metrics.csv")
    assert metrics["step"].to_list()[-1] == TINY_MASKED["pretrain"]["max_steps"]
    assert metrics["tuning_loss"][-1] < metrics["tuning_loss"][0]
    # the run can re-tokenize histories: it carries the store's tokenizer files
    for name in ("vocab.json", "tokenizer.yaml", "lab_stats.parquet"):
        assert (masked_runs["run"] / name).exists()


def test_finetuning_learns_signal_with_the_stopping_step_chosen_within_train(masked_runs):
    """Tuning holds fewer than 30 positive subjects: one run per fold of train subjects, the median of their
    best steps, and a refit on all train rows stopped there; the fine-tuned model ranks held_out rows."""
    info = json.loads((masked_runs["tuned"] / "info.json").read_text())
    predictions = pl.read_parquet(masked_runs["tuned"] / "predictions.parquet")
    assert info["kind"] == "fine-tuned"
    assert _auroc(predictions) > 0.75
    assert set(predictions["split"].unique()) == {"tuning", "held_out"}
    assert predictions["predicted_boolean_probability"].is_not_null().all()
    chosen = info["selection"]["toy@730"]
    assert chosen["method"] == "cv_within_train" and chosen["folds"] == 5
    fold_best = [run["best_step"] for run in info["fit"]["fold_runs"]]
    assert chosen["chosen"]["fold_best_steps"] == fold_best and chosen["chosen"]["steps"] == round(np.median(fold_best))
    assert info["fit"]["run"] == "refit" and info["fit"]["steps"] == chosen["chosen"]["steps"]
    # each fold run was evaluated on its own validation subjects, never on tuning rows
    metrics = pl.read_csv(masked_runs["tuned"] / "metrics.csv")
    assert metrics["run"].unique().sort().to_list() == ["fold0", "fold1", "fold2", "fold3", "fold4", "refit"]
    assert sum(run["evaluated_histories"] for run in info["fit"]["fold_runs"]) == info["fit"]["train_histories"]


def test_max_steps_replace_the_presets_time_budgets_and_repeat_exactly(masked_runs, tmp_path):
    """--max-steps on both masked stages (the tiny preset budgets them in minutes): runs of that many steps, no time
    budget left in their configs, and the same seed gives the same weights and predictions twice (the demo relies
    on it for figures that do not depend on the machine's speed)."""
    from safetensors.torch import load_file

    from nextvisit.cli import main

    store = masked_runs["root"] / "store"
    runs = []
    for k in range(2):
        run, tuned = tmp_path / f"run{k}", tmp_path / f"tuned{k}"
        assert main(["baseline", "masked", "pretrain", str(store), "--out", str(run), "--preset", "tiny",
                     "--max-steps", "6", "--device", "cpu"]) == 0
        assert main(["baseline", "masked", "finetune", str(run), str(masked_runs["meds"]), str(masked_runs["labels"]),
                     "--out", str(tuned), "--max-steps", "8", "--device", "cpu"]) == 0
        runs.append((run, tuned))
    pretrained = yaml.safe_load((runs[0][0] / "config.yaml").read_text())["pretrain"]
    assert pretrained["max_steps"] == 6 and pretrained["max_minutes"] is None
    assert pl.read_csv(runs[0][0] / "metrics.csv")["step"].to_list()[-1] == 6
    info = json.loads((runs[0][1] / "info.json").read_text())
    assert info["config"]["finetune"]["max_steps"] == 8 and info["config"]["finetune"]["max_minutes"] is None
    fold_runs = info["fit"].get("fold_runs", [])
    assert all(r["steps"] <= 8 for r in [info["fit"], *fold_runs]) and any(r["steps"] == 8 for r in [info["fit"], *fold_runs])
    first, second = (load_file(str(tuned / "model.safetensors")) for _, tuned in runs)
    assert all(np.array_equal(first[name].numpy(), second[name].numpy()) for name in first)
    assert pl.read_parquet(runs[0][1] / "predictions.parquet").equals(pl.read_parquet(runs[1][1] / "predictions.parquet"))


def test_finetuning_stops_on_tuning_when_it_holds_30_positive_subjects(masked_runs, tmp_path):
    from nextvisit.baselines import masked

    meds_dir, labels_dir = _signal_dataset(tmp_path, n_subjects=400)
    tuning = pl.read_parquet(labels_dir / "labels.parquet").filter(pl.col("split") == "tuning")
    assert selection.positive_counts(tuning)[0] >= selection.MIN_TUNING_POSITIVE_SUBJECTS
    tuned = masked.finetune(masked_runs["run"], meds_dir, labels_dir, tmp_path / "tuned")
    info = json.loads((tuned / "info.json").read_text())
    chosen = info["selection"]["toy@730"]
    assert chosen["method"] == "tuning" and chosen["folds"] is None and "fold_runs" not in info["fit"]
    metrics = pl.read_csv(tuned / "metrics.csv")
    best = metrics.row(int(metrics["tuning_auroc"].arg_max()), named=True)
    assert chosen["chosen"] == {"steps": best["step"]} and info["fit"]["best_step"] == best["step"]
    assert info["fit"]["best_tuning_auroc"] > info["fit"]["untuned_tuning_auroc"]
    assert _auroc(pl.read_parquet(tuned / "predictions.parquet")) > 0.75


def test_finetuned_model_sees_no_event_after_prediction_time(masked_runs, tmp_path):
    """A strongly predictive code added after every prediction time leaves every prediction unchanged."""
    from nextvisit.baselines import masked

    later_meds, later_labels = _signal_dataset(tmp_path, later_events=True)
    written = pl.read_parquet(masked_runs["tuned"] / "predictions.parquet").sort("subject_id")
    again = masked.predict(masked_runs["tuned"], masked_runs["meds"], masked_runs["labels"]).sort("subject_id")
    changed = masked.predict(masked_runs["tuned"], later_meds, later_labels).sort("subject_id")
    assert pl.read_parquet(later_meds / "data" / "0.parquet").filter(pl.col("time") > T0).height == 240
    p = written["predicted_boolean_probability"].to_numpy()
    np.testing.assert_allclose(again["predicted_boolean_probability"].to_numpy(), p, rtol=0, atol=1e-6)
    np.testing.assert_allclose(changed["predicted_boolean_probability"].to_numpy(), p, rtol=0, atol=1e-6)
    # the same change at exactly the prediction time is known (MEDS rule), so it does move predictions
    at_meds, at_labels = _signal_dataset(tmp_path / "at", at_time_events=True)
    at_time = masked.predict(masked_runs["tuned"], at_meds, at_labels).sort("subject_id")
    assert np.abs(at_time["predicted_boolean_probability"].to_numpy() - p).max() > 0.01


def test_count_cli_writes_a_predictions_folder_and_reports_bad_input(tmp_path, capsys):
    from nextvisit.cli import main

    meds_dir, labels_dir = _hand_dataset(tmp_path)
    config = tmp_path / "counts.yaml"
    config.write_text("min_code_count: 1\nc_values: [1.0]\n")
    out = tmp_path / "pred"
    assert main(["baseline", "counts", str(meds_dir), str(labels_dir), "--out", str(out), "--config", str(config)]) == 0
    predictions = pl.read_parquet(out / "predictions.parquet")
    assert predictions["split"].to_list() == ["held_out"]  # the censored tuning row is not predicted
    # a second run refuses to overwrite, and a missing labels folder is a one-line error naming it
    assert main(["baseline", "counts", str(meds_dir), str(labels_dir), "--out", str(out)]) == 2
    assert main(["baseline", "counts", str(meds_dir), str(tmp_path / "nolabels"), "--out", str(tmp_path / "p2")]) == 2
    assert "nolabels" in capsys.readouterr().err


def test_count_model_from_config_file_unless_given_on_the_command_line(tmp_path):
    from nextvisit.cli import build_parser

    path = tmp_path / "c.yaml"
    path.write_text("model: gbt\n")
    base = ["baseline", "counts", "MEDS", "LABELS", "--out", "PRED", "--config", str(path)]
    for extra, expected in (([], "gbt"), (["--model", "logistic"], "logistic")):
        args = build_parser().parse_args(base + extra)
        assert counts.CountsConfig.from_yaml(args.config, model=args.model).model == expected
    args = build_parser().parse_args(base[:-2])
    assert counts.CountsConfig.from_yaml(args.config, model=args.model).model == "logistic"
