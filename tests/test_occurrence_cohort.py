"""The occurrence analysis on the task's landmark cohort, and the age-and-sex reference beside it: a boundary
under the minimum age or history is left out and counted, the new-onset rows are the task's own landmarks
(the same seeded draw and cap), and the reference is fit on train rows only. The model is test_forecast's
small random-init network: these tests are about which rows are scored, not about skill."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
import numpy as np
import polars as pl
import pytest
import yaml

from nextvisit.artifacts.predictions import PROBABILITY
from nextvisit.cli import main
from nextvisit.errors import UserError
from nextvisit.predict.occurrence import (
    BOUNDARY_REASONS, AgeSexReferenceConfig, OccurrenceConfig, age_sex_reference, boundary_rows, occurrence,
)
from nextvisit.tasks import Task, make_labels
from nextvisit.tokenize.store import SplitWriter, TokenStore, write_store_info
from nextvisit.units import DAYS_PER_YEAR
from test_forecast import N_SUBJECTS, TASK, world  # noqa: F401 - world is a fixture
from test_tasks import write_meds

# Train subjects too (the reference is fit on them); every third subject has dementia (test_forecast).
SPLITS = {sid: ("train" if sid % 2 == 0 else "tuning" if sid % 4 == 1 else "held_out")
          for sid in range(1, N_SUBJECTS + 1)}
MIN_AGE = 60.0  # the cohort is 51-70 at its first visits, so some boundaries are too young


def cohort_task(seed: int = 0, sample_probability: float = 0.6, max_per_subject: int = 4) -> Task:
    data = TASK.to_dict()
    data["landmarks"] = {"min_history_days": 365, "min_age_years": MIN_AGE, "max_per_subject": max_per_subject,
                         "sample_probability": sample_probability, "seed": seed}
    return Task.from_dict(data)


@pytest.fixture(scope="module")
def cohort(world, tmp_path_factory):  # noqa: F811 - the imported fixture
    root = tmp_path_factory.mktemp("occurrence_cohort")
    meds = write_meds(root / "meds", [world["rows"]], SPLITS)
    store = root / "store"
    events = pl.read_parquet(meds / "data")
    sizes = {}
    for split in ("train", "tuning", "held_out"):
        writer = SplitWriter(store / split)
        ids = [sid for sid, s in SPLITS.items() if s == split]
        world["tokenizer"].tokenize_frame(events.filter(pl.col("subject_id").is_in(ids))).write(writer)
        sizes[split] = writer.close()
    world["tokenizer"].save(store)
    write_store_info(store, sizes, len(world["vocab"]))
    return {**world, "meds": meds, "store": TokenStore(store), "store_path": store, "root": root}


def score(world_, task: Task, **options):
    config = OccurrenceConfig(splits=("train", "tuning", "held_out"), **options)
    return occurrence(world_["model"], world_["vocab"], world_["store"], task, config, max_window=64,
                      model_name="test", progress=False)


def visit_table(meds) -> pl.DataFrame:
    """Per visit day (MEDS: any timed event but birth): day, first visit day and birth day, from the raw events."""
    events = pl.read_parquet(meds / "data")
    birth = events.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", birth=pl.col("time").dt.date())
    visits = (events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH"))
              .select("subject_id", day=pl.col("time").dt.date()).unique().sort("subject_id", "day"))
    return visits.join(birth, on="subject_id").with_columns(
        first=pl.col("day").min().over("subject_id"), last=pl.col("day").max().over("subject_id"))


def test_boundaries_under_min_age_or_history_are_left_out_and_counted(cohort):
    task = cohort_task(sample_probability=1.0, max_per_subject=1000)  # only the age and history rules bite
    every = score(cohort, task, cohort="all").predictions
    chosen = score(cohort, task)
    rows = chosen.predictions
    # from the raw events: history since the first visit, age at the end of the landmark day
    table = visit_table(cohort["meds"]).with_columns(
        history=(pl.col("day") - pl.col("first")).dt.total_days(),
        age=((pl.col("day") - pl.col("birth")).dt.total_days() + 1) / DAYS_PER_YEAR,
    )
    boundaries = table.filter(pl.col("day") < pl.col("last"))  # a visit with a next one
    short = boundaries.filter(pl.col("history") < 365)
    young = boundaries.filter((pl.col("history") >= 365) & (pl.col("age") < MIN_AGE))
    kept = boundaries.filter((pl.col("history") >= 365) & (pl.col("age") >= MIN_AGE))
    assert short.height >= N_SUBJECTS and young.height > 0 and kept.height > 0  # each rule bites here
    assert rows.height == kept.height
    assert set(rows.select("subject_id", pl.col("prediction_time").dt.date()).iter_rows()) == set(
        kept.select("subject_id", "day").iter_rows())
    assert rows["age_years"].min() >= MIN_AGE
    counted = {split: b["excluded"] for split, b in chosen.info["cohort"]["boundaries"].items()}
    assert sum(c["insufficient_history"] for c in counted.values()) == short.height
    assert sum(c["too_young"] for c in counted.values()) == young.height
    assert sum(c["not_sampled"] + c["beyond_max_per_subject"] for c in counted.values()) == 0
    for split, b in chosen.info["cohort"]["boundaries"].items():  # every boundary counted once
        assert b["total"] == every.filter(pl.col("split") == split).height
        assert b["scored"] == rows.filter(pl.col("split") == split).height
        assert b["total"] == b["scored"] + sum(b["excluded"].values())
        assert set(b["excluded"]) == set(BOUNDARY_REASONS)
    # the cohort's rows are scored exactly as they are among every boundary
    same = rows.join(every, on=["subject_id", "prediction_time"], suffix="_all")
    assert same.height == rows.height
    np.testing.assert_allclose(same[PROBABILITY], same[f"{PROBABILITY}_all"], rtol=1e-5, atol=1e-6)
    assert same["boolean_value"].equals(same["boolean_value_all"], check_names=False)


@pytest.mark.parametrize("seed", [0, 7])
def test_new_onset_rows_are_the_task_landmarks(cohort, seed):
    """Same seed, same draw and cap: the new-onset rows are the landmarks `nextvisit label` chooses, less those
    on a subject's last visit (no next visit), which are counted. The labels keep, per horizon, the landmarks
    whose horizon ends within the data (a later suffix of each subject's visits), so they are compared there."""
    task = cohort_task(seed=seed, sample_probability=0.6, max_per_subject=3)
    result = score(cohort, task)
    rows = result.predictions
    labelled = make_labels(cohort["meds"], task, progress=False)
    horizon = min(task.horizons_days)
    end = datetime.fromisoformat(labelled.counts["end_of_data"]).date()
    labels = labelled.labels.filter(pl.col("horizon_days") == horizon)
    landmarks = set(labels.select("subject_id", "prediction_time").iter_rows())
    last = visit_table(cohort["meds"]).filter(pl.col("day") == pl.col("last"))
    last_days = set(last.select("subject_id", "day").iter_rows())
    with_next = {(s, t) for s, t in landmarks if (s, t.date()) not in last_days}
    new_onsets = rows.filter(~pl.col("prior_occurrence")
                             & (pl.col("prediction_time").dt.date() + timedelta(days=horizon) <= end))
    assert len(with_next) > 20
    assert set(new_onsets.select("subject_id", "prediction_time").iter_rows()) == with_next
    counted = {r: sum(b["excluded"][r] for b in result.info["cohort"]["boundaries"].values()) for r in BOUNDARY_REASONS}
    assert counted["not_sampled"] > 0 and counted["beyond_max_per_subject"] > 0  # the draw and the cap bite
    assert rows.group_by("subject_id").len()["len"].max() <= 3


def test_eligible_cohort_is_the_age_and_history_rules_without_the_draw(cohort):
    sampled = cohort_task(sample_probability=0.3, max_per_subject=2)
    unsampled = cohort_task(sample_probability=1.0, max_per_subject=1000)
    eligible = score(cohort, sampled, cohort="eligible")
    assert eligible.predictions.equals(score(cohort, unsampled).predictions)
    assert eligible.predictions.height > score(cohort, sampled).predictions.height
    excluded = eligible.info["cohort"]["boundaries"]["train"]["excluded"]
    assert excluded["not_sampled"] == excluded["beyond_max_per_subject"] == 0 < excluded["too_young"]


def test_landmarks_on_a_last_visit_are_counted(cohort):
    """With every eligible visit a landmark, each subject old enough at its last visit has one landmark with no
    boundary after it."""
    task = cohort_task(sample_probability=1.0, max_per_subject=1000)
    result = score(cohort, task)
    table = visit_table(cohort["meds"]).filter(pl.col("day") == pl.col("last")).with_columns(
        history=(pl.col("day") - pl.col("first")).dt.total_days(),
        age=((pl.col("day") - pl.col("birth")).dt.total_days() + 1) / DAYS_PER_YEAR)
    expected = table.filter((pl.col("history") >= 365) & (pl.col("age") >= MIN_AGE)).height
    assert expected > 0
    assert sum(result.info["cohort"]["landmarks_without_boundary"].values()) == expected


def test_prevalent_boundaries_are_the_recurrences_and_seeds_differ(cohort):
    task = cohort_task(seed=0, sample_probability=1.0, max_per_subject=1000)
    rows = score(cohort, task).predictions
    prior = rows.filter(pl.col("prior_occurrence"))
    assert prior.height > 0 and prior["subject_id"].is_in([s for s in SPLITS if s % 3 == 0]).all()
    drawn = [set(score(cohort, cohort_task(seed=seed, sample_probability=0.5)).predictions
                 .select("subject_id", "prediction_time").iter_rows()) for seed in (0, 1)]
    assert drawn[0] != drawn[1]


def test_recent_mode_counts_the_boundaries_it_leaves_out(cohort):
    task = cohort_task(sample_probability=1.0, max_per_subject=1000)
    result = occurrence(cohort["model"], cohort["vocab"], cohort["store"], task,
                        OccurrenceConfig(mode="recent"), max_window=24, model_name="test", progress=False)
    for split, b in result.info["cohort"]["boundaries"].items():
        assert b["excluded"]["outside_recent_window"] > 0
        assert b["scored"] == result.predictions.filter(pl.col("split") == split).height
        assert b["total"] == b["scored"] + sum(b["excluded"].values())


# -- the age-and-sex reference -------------------------------------------------------------------------------


def reference_rows(seed: int = 0, n: int = 4000) -> pl.DataFrame:
    """Occurrence-like rows whose onset rate climbs with age; recurrences are nearly always positive."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(40, 95, n)
    prior = rng.random(n) < 0.2
    onset = rng.random(n) < 1 / (1 + np.exp(-(age - 80) / 5))
    return pl.DataFrame({
        "subject_id": np.arange(n), "split": rng.choice(["train", "tuning", "held_out"], n, p=[0.6, 0.2, 0.2]),
        "age_years": age, "sex": rng.choice(["F", "M"], n), "prior_occurrence": prior,
        "boolean_value": np.where(prior, rng.random(n) < 0.9, onset),
    })


def test_reference_is_fit_on_train_new_onsets_only():
    rows = reference_rows()
    risk, fit = age_sex_reference(rows)
    train_new = rows.filter((pl.col("split") == "train") & ~pl.col("prior_occurrence"))
    assert fit["rows"] == train_new.height and fit["positives"] == int(train_new["boolean_value"].sum())
    rng = np.random.default_rng(1)
    other = pl.col("split") != "train"
    permuted = rows.with_columns(
        pl.when(other).then(pl.Series(rng.permutation(rows[column].to_numpy()))).otherwise(column).alias(column)
        for column in ("boolean_value", "prior_occurrence")
    )
    assert not permuted["boolean_value"].equals(rows["boolean_value"])
    np.testing.assert_array_equal(age_sex_reference(permuted)[0], risk)
    # train recurrences do not enter the fit either; train new onsets do
    flip_prior = rows.with_columns(pl.when(pl.col("prior_occurrence")).then(~pl.col("boolean_value"))
                                   .otherwise("boolean_value").alias("boolean_value"))
    np.testing.assert_array_equal(age_sex_reference(flip_prior)[0], risk)
    flip_train = rows.with_columns(pl.when(~pl.col("prior_occurrence") & (pl.col("split") == "train"))
                                   .then(~pl.col("boolean_value")).otherwise("boolean_value").alias("boolean_value"))
    assert not np.allclose(age_sex_reference(flip_train)[0], risk)
    # the fitted risk follows the onset rate with age
    by_age = rows.with_columns(risk=risk).sort("age_years")
    assert by_age.head(500)["risk"].mean() < 0.05 < 0.5 < by_age.tail(500)["risk"].mean()


def test_reference_refuses_train_without_both_outcomes():
    rows = reference_rows().with_columns(
        pl.when(pl.col("split") == "train").then(False).otherwise("boolean_value").alias("boolean_value"))
    with pytest.raises(UserError, match="train split's new-onset boundaries"):
        age_sex_reference(rows, AgeSexReferenceConfig(), source="STORE/train")


def test_cli_writes_the_reference_beside_the_model_on_the_same_rows(cohort, tmp_path):
    task_file = tmp_path / "task.yaml"
    task = cohort_task(sample_probability=1.0, max_per_subject=1000)
    task_file.write_text(yaml.safe_dump(task.to_dict()))
    out, ref = tmp_path / "occ" / "model", tmp_path / "occ" / "age_sex"
    argv = ["occurrence", str(cohort["run"]), str(cohort["store_path"]), str(task_file), "--out", str(out),
            "--reference-out", str(ref), "--splits", "held_out", "--device", "cpu"]
    assert main(argv) == 0
    model, reference = pl.read_parquet(out / "predictions.parquet"), pl.read_parquet(ref / "predictions.parquet")
    keys = ["subject_id", "prediction_time", "boolean_value", "prior_occurrence", "age_years", "sex", "split"]
    assert model.height > 0 and model.select(keys).equals(reference.select(keys))
    assert reference[PROBABILITY].is_between(0, 1).all()
    assert reference["model"].unique().to_list() == ["age_sex_reference"]
    info = json.loads((ref / "info.json").read_text())
    assert info["kind"] == "count-features" and info["model"] == "age_sex_reference"
    assert info["task"] == "dementia_test_next_visit"
    # fit on the store's train boundaries of the same cohort (none of them scored here)
    train, _ = boundary_rows(cohort["vocab"], cohort["store"], task, OccurrenceConfig(), "train", progress=False)
    assert info["config"]["fit"]["rows"] == train.filter(~pl.col("prior_occurrence")).height > 0
    assert set(model["split"]) == {"held_out"}
    model_info = json.loads((out / "info.json").read_text())
    assert model_info["cohort"]["rule"] == "task" and model_info["cohort"]["landmarks"]["min_age_years"] == MIN_AGE
    # a second run into the same folders is refused before any work
    assert main(argv) == 2
    assert main([*argv[:6], "--reference-out", str(out), "--overwrite"]) == 2

