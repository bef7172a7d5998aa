"""Incidence tasks and labels: the cohort rules a user relies on (new onsets only, the at-time rule,
censoring and death counted, strict task files)."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

from nextvisit.cli import main
from nextvisit.errors import UserError
from nextvisit.tasks import (
    END_OF_DAY, FOLLOW_UP_SCHEMA, LABEL_SCHEMA, Task, builtin_tasks, load_task, make_labels, read_labels,
)


def shared_data() -> Path:
    """The read-only third-party data folder: $NEXTVISIT_SHARED_DATA, else ``shared/data`` beside the repository
    (as in CI), else /work/shared/data (for a checkout that sits elsewhere). Tests skip where it is absent."""
    if os.environ.get("NEXTVISIT_SHARED_DATA"):
        return Path(os.environ["NEXTVISIT_SHARED_DATA"])
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")


DATA = shared_data()
F03 = "ICD10CM//F03.90"


def write_meds(folder: Path, shards: list[list[tuple]], splits: dict[int, str]) -> Path:
    """A MEDS dataset: each shard a list of (subject_id, time or None, code); splits by subject."""
    (folder / "data").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for i, rows in enumerate(shards):
        frame = pl.DataFrame(
            {
                "subject_id": [r[0] for r in rows],
                "time": [r[1] for r in rows],
                "code": [r[2] for r in rows],
                "numeric_value": [r[3] if len(r) > 3 else None for r in rows],
            },
            schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32},
        ).sort("subject_id", "time", nulls_last=False)
        frame.write_parquet(folder / "data" / f"{i}.parquet")
    pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())},
                 schema={"subject_id": pl.Int64, "split": pl.String}).write_parquet(folder / "metadata" / "subject_splits.parquet")
    (folder / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "test", "meds_version": "0.4"}))
    return folder


def d(text: str) -> datetime:
    return datetime.fromisoformat(text)


def person(sid: int, birth: str | None, visits: list[str], extra: list[tuple] = (), sex: str = "F") -> list[tuple]:
    rows = [(sid, None, f"GENDER//{sex}")]
    if birth:
        rows.append((sid, d(birth), "MEDS_BIRTH"))
    rows += [(sid, d(v), "VISIT//OUTPATIENT") for v in visits]
    rows += [(sid, d(t), code) for t, code in extra]
    return rows


def simple_task(end_of_data=None, **landmarks) -> Task:
    rule = {"min_history_days": 365, "min_age_years": 50, "max_per_subject": 100, "sample_probability": 1.0, "seed": 0}
    rule.update(landmarks)
    return Task.from_dict({
        "name": "dementia_test",
        "condition": {"code_prefixes": ["ICD10CM//F03"], "codes": ["RXNORM//4637"]},
        "remove_from_inputs": {"code_prefixes": ["ICD10CM//R41.1"]},
        "horizons_days": [730],
        "landmarks": rule,
        "follow_up": {"end_of_data": end_of_data},
    })


def label_row(labels: pl.DataFrame, sid: int, day: str, horizon: int = 730) -> dict:
    rows = labels.filter((pl.col("subject_id") == sid) & (pl.col("prediction_time") == d(day) + END_OF_DAY)
                         & (pl.col("horizon_days") == horizon))
    assert rows.height == 1, rows
    return rows.row(0, named=True)


@pytest.fixture()
def cohort(tmp_path):
    subjects = [
        # 1: dementia 18 months after the 2011 landmark -> positive at 730 days
        person(1, "1940-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"], [("2012-07-01", F03)]),
        # 2: record ends half a year after the landmark -> censored
        person(2, "1940-03-01", ["2010-01-01", "2011-01-01", "2011-07-01"], sex="M"),
        # 3: dies a year after the landmark -> negative, competing death
        person(3, "1940-03-01", ["2010-01-01", "2011-01-01"], [("2012-01-01", "MEDS_DEATH")]),
        # 4: dementia before any landmark -> prevalent, excluded
        person(4, "1940-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"], [("2009-06-01", F03)]),
        # 5: too young at every visit
        person(5, "1990-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"]),
        # 6: no birth date
        person(6, None, ["2010-01-01", "2011-01-01", "2014-01-01"]),
        # 7: one visit only: never a year of history
        person(7, "1940-03-01", ["2010-01-01"]),
        # 8: not in the split file
        person(8, "1940-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"]),
        # 9: followed long enough, no dementia -> negative
        person(9, "1940-03-01", ["2010-01-01", "2011-01-01", "2013-01-01"]),
    ]
    splits = {i: "held_out" for i in range(1, 8)} | {9: "tuning"}
    return write_meds(tmp_path / "meds", [sum(subjects, [])], splits)


def test_reasons_and_exclusions_are_counted(cohort):
    result = make_labels(cohort, simple_task(), progress=False)
    labels, counts = result.labels, result.counts
    assert label_row(labels, 1, "2011-01-01")["reason"] == "positive"
    assert label_row(labels, 1, "2011-01-01")["boolean_value"] is True
    censored = label_row(labels, 2, "2011-01-01")
    assert censored["reason"] == "censored_lost_to_followup" and censored["boolean_value"] is None
    death = label_row(labels, 3, "2011-01-01")
    assert death["reason"] == "negative_competing_death" and death["boolean_value"] is False
    assert label_row(labels, 9, "2011-01-01")["reason"] == "negative"
    # subject 1's visit after the diagnosis is no landmark (prevalent there); subject 4 has none at all
    assert labels.filter(pl.col("subject_id") == 1)["prediction_time"].to_list() == [d("2011-01-01") + END_OF_DAY]
    assert 4 not in labels["subject_id"].to_list()

    excluded = counts["subjects"]["excluded"]
    assert excluded["prevalent"] == 1
    assert excluded["too_young"] == 1
    assert excluded["no_birth_date"] == 1
    assert excluded["insufficient_history"] == 1
    assert excluded["not_in_subject_splits"] == 1
    assert counts["subjects"]["total"] == 9
    assert counts["subjects"]["with_landmarks"] == 4
    by_reason = counts["horizons"]["730"]["by_reason"]
    # subject 2 also has a 2011-07-01 landmark (censored), subject 9 a 2013-01-01 one (record ends that day)
    assert by_reason == {"positive": 1, "negative": 1, "negative_competing_death": 1, "censored_lost_to_followup": 3}
    assert counts["horizons"]["730"]["labelled"] == 3 and counts["horizons"]["730"]["censored"] == 3


def test_landmarks_whose_horizon_passes_the_end_of_data_are_not_used(cohort):
    """Past the end of the data only events could be labelled, never plain negatives: a landmark serves a
    horizon only if the horizon ends within the data (by default the dataset's latest event)."""
    auto = make_labels(cohort, simple_task(end_of_data="auto"), progress=False)
    assert auto.counts["end_of_data"] == "2014-01-01T00:00:00"
    # subject 9's 2013-01-01 landmark would need data through 2015; its 2011 landmark stays
    assert auto.labels.filter(pl.col("subject_id") == 9)["prediction_time"].to_list() == [d("2011-01-01") + END_OF_DAY]
    assert auto.counts["horizons"]["730"]["by_reason"]["censored_lost_to_followup"] == 2
    early = make_labels(cohort, simple_task(end_of_data="2012-06-01"), progress=False)
    assert early.labels.height == 0
    # subjects 1, 2, 3 and 9 had eligible visits, but none whose horizon ends by 2012-06-01
    assert early.counts["subjects"]["excluded"]["horizon_past_end_of_data"] == 4
    assert early.counts["horizons"]["730"]["subjects_past_end_of_data"] == 4
    assert early.counts["subjects"]["excluded"]["prevalent"] == 1
    # two horizons: the 2011 landmark serves the short one only, although subject 1's onset (2012-07-01)
    # falls inside the long one: a negative could not have been observed there
    data = simple_task(end_of_data="2012-12-01").to_dict()
    data["horizons_days"] = [365, 730]
    both = make_labels(cohort, Task.from_dict(data), progress=False)
    assert label_row(both.labels, 1, "2011-01-01", 365)["reason"] == "negative"
    assert both.labels.filter(pl.col("horizon_days") == 730).height == 0
    assert both.counts["horizons"]["730"]["subjects_past_end_of_data"] == 4
    assert both.counts["subjects"]["excluded"]["horizon_past_end_of_data"] == 0


def test_horizons_choose_their_own_landmarks_sharing_where_they_can(tmp_path):
    visits = [f"{2000 + y}-0{m}-01" for y in range(12) for m in (1, 5, 9)]
    meds = write_meds(tmp_path / "meds", [person(1, "1930-01-01", visits)], {1: "held_out"})
    data = simple_task(end_of_data="auto", max_per_subject=3).to_dict()
    data["horizons_days"] = [365, 1825]
    labels = make_labels(meds, Task.from_dict(data), progress=False).labels
    short = set(labels.filter(pl.col("horizon_days") == 365)["prediction_time"].to_list())
    long = set(labels.filter(pl.col("horizon_days") == 1825)["prediction_time"].to_list())
    assert len(short) == len(long) == 3
    end = d("2011-09-01")
    assert all(t + timedelta(days=1825) <= end + timedelta(days=1) for t in long)
    # the seeded key ranks a visit the same for every horizon: a short-horizon landmark that the long
    # horizon could also use is one of the long horizon's landmarks too
    usable_for_long = {t for t in short if t + timedelta(days=1825) <= end + timedelta(days=1)}
    assert usable_for_long <= long


def test_label_columns(cohort):
    labels = make_labels(cohort, simple_task(), progress=False).labels
    assert dict(labels.schema) == {**LABEL_SCHEMA, **FOLLOW_UP_SCHEMA}
    row = label_row(labels, 2, "2011-01-01")
    assert row["sex"] == "M" and row["split"] == "held_out" and row["task"] == "dementia_test"
    assert row["age_years"] == pytest.approx((d("2011-01-01") + END_OF_DAY - d("1940-03-01")).days / 365.25, abs=0.01)
    assert label_row(labels, 9, "2011-01-01")["split"] == "tuning"


def test_condition_at_the_prediction_day_is_known(tmp_path):
    """Events on the landmark day, at any hour, are known at the prediction time (end of that day): a
    diagnosis that day makes the landmark prevalent; one the next morning makes it positive."""
    same_day = person(1, "1940-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"], [("2011-01-01 23:59:59.999999", F03)])
    next_day = person(2, "1940-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"], [("2011-01-02 00:00:00", F03)])
    meds = write_meds(tmp_path / "meds", [same_day + next_day], {1: "held_out", 2: "held_out"})
    result = make_labels(meds, simple_task(), progress=False)
    assert result.labels.filter(pl.col("subject_id") == 1).height == 0
    assert result.counts["subjects"]["excluded"]["prevalent"] == 1
    assert label_row(result.labels, 2, "2011-01-01")["reason"] == "positive"


def test_horizon_and_follow_up_boundaries(tmp_path):
    """Day-level windows: a diagnosis on day d+H is inside the horizon, d+H+1 is not; a record whose last
    event is on day d+H is followed through the horizon, one ending on d+H-1 is censored."""
    start = d("2011-01-01")
    on_edge = (start + timedelta(days=730)).isoformat()
    past_edge = (start + timedelta(days=731)).isoformat()
    short = (start + timedelta(days=729)).isoformat()
    rows = (
        person(1, "1940-03-01", ["2010-01-01", "2011-01-01", "2015-01-01"], [(on_edge, F03)])
        + person(2, "1940-03-01", ["2010-01-01", "2011-01-01", "2015-01-01"], [(past_edge, F03)])
        + person(3, "1940-03-01", ["2010-01-01", "2011-01-01", on_edge])
        + person(4, "1940-03-01", ["2010-01-01", "2011-01-01", short])
    )
    meds = write_meds(tmp_path / "meds", [rows], {i: "held_out" for i in range(1, 5)})
    labels = make_labels(meds, simple_task(), progress=False).labels
    assert label_row(labels, 1, "2011-01-01")["reason"] == "positive"
    assert label_row(labels, 2, "2011-01-01")["reason"] == "negative"
    assert label_row(labels, 3, "2011-01-01")["reason"] == "negative"
    assert label_row(labels, 4, "2011-01-01")["reason"] == "censored_lost_to_followup"


def test_exact_codes_do_not_match_longer_ids(tmp_path):
    rows = person(1, "1940-03-01", ["2010-01-01", "2011-01-01", "2015-01-01"], [("2012-01-01", "RXNORM//46370")])
    rows += person(2, "1940-03-01", ["2010-01-01", "2011-01-01", "2015-01-01"], [("2012-01-01", "RXNORM//4637")])
    meds = write_meds(tmp_path / "meds", [rows], {1: "held_out", 2: "held_out"})
    labels = make_labels(meds, simple_task(), progress=False).labels
    assert label_row(labels, 1, "2011-01-01")["reason"] == "negative"
    assert label_row(labels, 2, "2011-01-01")["reason"] == "positive"


def test_death_not_competing_censors(cohort):
    data = simple_task().to_dict()
    data["follow_up"]["death_is_competing"] = False
    result = make_labels(cohort, Task.from_dict(data), progress=False)
    row = label_row(result.labels, 3, "2011-01-01")
    assert row["reason"] == "censored_death" and row["boolean_value"] is None
    assert result.counts["horizons"]["730"]["by_reason"]["censored_death"] == 1


def test_landmark_choice_is_seeded_and_shard_independent(tmp_path):
    visits = [f"{2000 + y}-0{m}-01" for y in range(10) for m in (1, 5, 9)]
    subjects = [person(i, "1930-01-01", visits) for i in range(1, 7)]
    splits = {i: "held_out" for i in range(1, 7)}
    one = write_meds(tmp_path / "one", [sum(subjects, [])], splits)
    three = write_meds(tmp_path / "three", [sum(subjects[:2], []), sum(subjects[2:5], []), subjects[5]], splits)
    task = simple_task(max_per_subject=2, sample_probability=0.5)
    a = make_labels(one, task, progress=False)
    b = make_labels(three, task, progress=False)
    assert a.labels.equals(b.labels)
    assert a.labels.group_by("subject_id").len()["len"].to_list() == [2] * 6
    assert a.counts["landmarks"]["chosen"] == 12
    other_seed = make_labels(one, simple_task(max_per_subject=2, sample_probability=0.5, seed=1), progress=False)
    assert not other_seed.labels["prediction_time"].equals(a.labels["prediction_time"])


def test_landmark_choice_never_looks_ahead(tmp_path):
    """Whether a visit becomes a landmark depends on its past only: a record extended by later visits and an
    onset keeps every landmark it had before. (A cap chosen over all of a subject's eligible visits would
    re-draw them, and tie short histories to onsets.)"""
    early = [f"{2000 + y}-0{m}-01" for y in range(6) for m in (1, 5, 9)]
    later = [f"{2006 + y}-0{m}-01" for y in range(6) for m in (1, 5, 9)]
    splits = {i: "held_out" for i in range(1, 9)}
    short = write_meds(tmp_path / "short", [sum((person(i, "1930-01-01", early) for i in range(1, 9)), [])], splits)
    extended = write_meds(tmp_path / "long", [sum((person(i, "1930-01-01", early + later, [("2011-06-01", "ICD10CM//F03.90")])
                                                   for i in range(1, 9)), [])], splits)
    task = simple_task(max_per_subject=3, sample_probability=0.3)
    before = make_labels(short, task, progress=False).labels
    after = make_labels(extended, task, progress=False).labels
    cutoff = pl.datetime(2006, 1, 1)
    kept_before = before.select("subject_id", "prediction_time").sort(pl.all())
    kept_after = after.filter(pl.col("prediction_time") < cutoff).select("subject_id", "prediction_time").sort(pl.all())
    assert kept_before.height > 0
    assert kept_after.equals(kept_before)


def test_subject_split_across_shards_is_an_error(tmp_path):
    rows = person(1, "1940-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"])
    meds = write_meds(tmp_path / "meds", [rows[:3], rows[3:]], {1: "held_out"})
    with pytest.raises(UserError, match="subject 1 also appears"):
        make_labels(meds, simple_task(), progress=False)


# -- task files --------------------------------------------------------------------------------------------


def test_builtin_tasks_load_and_round_trip():
    assert {"dementia", "knee_oa", "dementia_snomed", "knee_oa_snomed"} <= set(builtin_tasks())
    for name in builtin_tasks():
        task = load_task(name)
        assert task.horizons_days == (730, 1825)
        assert Task.from_dict(task.to_dict()) == task
    dementia = load_task("dementia")
    for code in ("ICD10CM//F03.90", "ICD10CM//G30.9", "DIAGNOSIS//ICD//10//F0390", "RXNORM//135447", "RXNORM//6719"):
        assert dementia.condition.matches(code), code
    assert not dementia.condition.matches("RXNORM//67190")
    assert not dementia.condition.matches("ICD10CM//G31.2")
    assert dementia.remove_from_inputs.matches("ICD10CM//R41.3") and not dementia.remove_from_inputs.matches("ICD10CM//R41.4")
    knee = load_task("knee_oa")
    assert knee.condition.matches("ICD10CM//M17.11") and not knee.condition.matches("ICD10CM//M17.6")
    assert load_task("knee_oa_snomed").condition.matches("SNOMED//239873007")


BASE = {"name": "t", "condition": {"code_prefixes": ["ICD10CM//F03"]}, "horizons_days": [730]}


@pytest.mark.parametrize("change, field", [
    ({"horizon_days": [730]}, "horizon_days"),  # misspelt top-level field
    ({"landmarks": {"max_per_subjet": 2}}, "landmarks.max_per_subjet"),
    ({"condition": {"code_prefixes": []}}, "condition"),
    ({"condition": {"codes": [""]}}, "condition.codes"),
    ({"horizons_days": [0]}, "horizons_days"),
    ({"horizons_days": [730, -5]}, "horizons_days"),
    ({"horizons_days": [365.5]}, "horizons_days"),
    ({"horizons_days": []}, "horizons_days"),
    ({"landmarks": {"min_age_years": -1}}, "landmarks.min_age_years"),
    ({"landmarks": {"max_per_subject": 0}}, "landmarks.max_per_subject"),
    ({"follow_up": {"death_is_competing": "yes"}}, "follow_up.death_is_competing"),
    ({"name": "bad name"}, "name"),
    ({"follow_up": {"end_of_data": "soon"}}, "follow_up.end_of_data"),
])
def test_bad_task_yaml_names_the_field(tmp_path, change, field):
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({**BASE, **change}))
    with pytest.raises(UserError) as info:
        load_task(path)
    message = str(info.value)
    assert str(path) in message and f"'{field}'" in message


def test_unknown_task_name_lists_builtins():
    with pytest.raises(UserError, match="dementia_snomed"):
        load_task("dementa")


# -- command line ------------------------------------------------------------------------------------------


def test_label_cli_writes_labels_counts_and_task(cohort, tmp_path, capsys):
    out = tmp_path / "labels"
    task_file = tmp_path / "t.yaml"
    task_file.write_text(yaml.safe_dump(simple_task().to_dict()))
    assert main(["label", str(cohort), str(task_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prevalent 1" in printed
    # one table row per horizon, under a header naming each reason
    header = next(line.split() for line in printed.splitlines() if line.strip().startswith("horizon "))
    row = next(line.split() for line in printed.splitlines() if line.strip().startswith("730 d"))
    cells = dict(zip(header, [" ".join(row[:2]), *row[2:]]))
    assert cells["censored_lost_to_followup"] == "3" and cells["positive"] == "1"
    labels = read_labels(out)
    assert labels.height == 6
    counts = json.loads((out / "counts.json").read_text())
    assert counts["horizons"]["730"]["positive"] == 1
    assert load_task(out / "task.yaml") == simple_task()
    # a second run refuses to overwrite, with a one-line error
    assert main(["label", str(cohort), str(task_file), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# -- third-party data --------------------------------------------------------------------------------------


def _needs(folder: str) -> Path:
    path = DATA / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent (third-party test data lives in ../shared/data)")
    return path


def _check_cohort(meds: Path, task: Task):
    result = make_labels(meds, task, progress=False)
    labels, counts = result.labels, result.counts
    subjects = counts["subjects"]
    assert subjects["total"] == subjects["with_landmarks"] + sum(subjects["excluded"].values())
    events = pl.read_parquet(meds / "data").filter(task.condition.expr())
    first = events.group_by("subject_id").agg(first=pl.col("time").min())
    joined = labels.join(first, on="subject_id", how="left")
    # new onsets only: no landmark at or after a subject's first condition code
    assert joined.filter(pl.col("first") <= pl.col("prediction_time")).height == 0
    for horizon, h in counts["horizons"].items():
        rows = labels.filter(pl.col("horizon_days") == int(horizon))
        assert sum(h["by_reason"].values()) == rows.height
        pos = rows.filter(pl.col("reason") == "positive").join(first, on="subject_id")
        delay = (pos["first"] - pos["prediction_time"]).dt.total_days()
        assert ((delay >= 0) & (delay <= int(horizon))).all()
    return result


def test_synthea_snomed_tasks():
    meds = _needs("synthea-covid19-10k-meds")
    dementia = _check_cohort(meds, load_task("dementia_snomed"))
    assert dementia.counts["horizons"]["1825"]["positive"] > 50
    knee = _check_cohort(meds, load_task("knee_oa_snomed"))
    assert knee.counts["horizons"]["1825"]["positive"] > 50


def test_mimic_demo_icd_tasks():
    meds = _needs("mimic-iv-demo-meds")
    dementia = _check_cohort(meds, load_task("dementia"))
    knee = _check_cohort(meds, load_task("knee_oa"))
    # the MIMIC spellings (undotted ICD-10 and ICD-9) are matched: the demo's dementia subjects are prevalent
    # or positive somewhere, not invisible
    assert dementia.counts["subjects"]["excluded"]["prevalent"] + dementia.counts["horizons"]["1825"]["positive"] > 0
    assert knee.counts["horizons"]["730"]["positive"] > 0


def test_label_cli_bad_meds_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    good = [person(1, "1940-03-01", ["2010-01-01", "2011-01-01", "2014-01-01"])]
    cases = {
        "corrupt shard": (lambda m: (m / "data" / "0.parquet").write_bytes(b"not parquet"), "not a readable parquet"),
        "wrong dtype": (lambda m: pl.read_parquet(m / "data" / "0.parquet").with_columns(pl.col("subject_id").cast(pl.String))
                        .write_parquet(m / "data" / "0.parquet"), "column 'subject_id' has type"),
        "unknown split": (lambda m: pl.DataFrame({"subject_id": [1], "split": ["test"]})
                          .write_parquet(m / "metadata" / "subject_splits.parquet"), "split 'test'"),
        "empty dataset": (lambda m: pl.read_parquet(m / "data" / "0.parquet").head(0)
                          .write_parquet(m / "data" / "0.parquet"), "the dataset is empty"),
    }
    for i, (damage, expected) in enumerate(cases.values()):
        meds = write_meds(tmp_path / f"meds{i}", [sum(good, [])], {1: "held_out"})
        damage(meds)
        out = tmp_path / f"labels{i}"
        assert main(["label", str(meds), "dementia", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
        assert not out.exists()
    # a damaged labels file is named, not a traceback
    (tmp_path / "bad_labels").mkdir()
    (tmp_path / "bad_labels" / "labels.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="labels.parquet: not a readable parquet file"):
        read_labels(tmp_path / "bad_labels")


def test_label_cli_warns_when_the_condition_never_occurs(cohort, tmp_path, capsys):
    task = simple_task().to_dict()
    task["condition"] = {"code_prefixes": ["SNOMED//26929004"]}  # a coding the ICD-10 cohort does not use
    task_file = tmp_path / "snomed.yaml"
    task_file.write_text(yaml.safe_dump(task))
    assert main(["label", str(cohort), str(task_file), "--out", str(tmp_path / "l1")]) == 0
    assert "0 prevalent, 0 positive" in capsys.readouterr().err
    task_file.write_text(yaml.safe_dump(simple_task().to_dict()))
    assert main(["label", str(cohort), str(task_file), "--out", str(tmp_path / "l2")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_follow_up_columns_and_censoring_weights(cohort):
    result = make_labels(cohort, simple_task(), progress=False)
    labels = result.labels
    censored = labels.filter(pl.col("boolean_value").is_null())
    labelled = labels.filter(pl.col("boolean_value").is_not_null())
    assert censored.height and labelled.height
    assert censored["censoring_weight"].is_null().all()
    assert (labelled["censoring_weight"] >= 1).all()
    positive = labels.filter(pl.col("reason") == "positive")
    assert ((positive["event_days"] >= 1) & (positive["event_days"] <= positive["horizon_days"])).all()
    assert (labels.filter(pl.col("reason") == "negative").select(pl.col("followup_days") >= pl.col("horizon_days"))
            .to_series().all())
    assert (censored["followup_days"] < censored["horizon_days"]).all()
    assert (labels["days_after_horizon"] >= 0).all()  # every horizon ends inside the data
    assert set(result.counts["censoring_model"]) == {str(h) for h in simple_task().horizons_days}


def test_sensitivity_tasks_differ_from_dementia_only_where_they_say():
    main, no_mci, death = load_task("dementia"), load_task("dementia_no_mci"), load_task("dementia_death_censors")
    assert set(main.condition.code_prefixes) - set(no_mci.condition.code_prefixes) == {
        "ICD10CM//G31.84", "DIAGNOSIS//ICD//10//G3184", "DIAGNOSIS//ICD//9//33183"}
    assert set(no_mci.condition.code_prefixes) < set(main.condition.code_prefixes)
    assert no_mci.condition.codes == main.condition.codes and no_mci.horizons_days == main.horizons_days
    assert main.follow_up.death_is_competing and not death.follow_up.death_is_competing
    assert death.condition == main.condition and death.landmarks == main.landmarks
