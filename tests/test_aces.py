"""ACES task configs: our dementia task exported to ACES and labelled by es-aces agrees with our own labels on
the rows both define, and differs exactly where ACES cannot express our rule; every trigger ACES excludes is
counted; every shard is labelled; the labels go through forecast and evaluate; bad inputs stop with one line
naming the option."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from nextvisit.cli import main
from nextvisit.data.meds import BIRTH_CODE, DEATH_CODE
from nextvisit.tasks import END_OF_DAY, Task, load_task, make_labels, read_labels, read_labels_task
from nextvisit.tasks.aces import load_config, window_horizon
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.tokenizer import Tokenizer
from nextvisit.units import DAYS_PER_YEAR
from test_forecast import make_run

HORIZON = 730
N_SUBJECTS = 400
N_SHARDS = 3


def dementia_every_visit() -> Task:
    """The built-in dementia task at one horizon with every eligible visit a landmark (ACES has no sampling)."""
    data = load_task("dementia").to_dict()
    data["landmarks"].update(sample_probability=1.0, max_per_subject=100_000)
    data["horizons_days"] = [HORIZON]
    return Task.from_dict(data)


def label(meds: Path, config: Path, out: Path, *options: str) -> int:
    return main(["label", str(meds), str(config), "--out", str(out), *options])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("aces")
    assert main(["simulate", "--subjects", str(N_SUBJECTS), "--seed", "0", "--out", str(root / "sim"),
                 "--workers", "1"]) == 0
    # the same records in three shards of whole subjects
    meds = root / "meds"
    shutil.copytree(root / "sim" / "metadata", meds / "metadata")
    (meds / "data").mkdir()
    events = pl.read_parquet(root / "sim" / "data")
    ids = np.sort(events["subject_id"].unique().to_numpy())
    for i, chunk in enumerate(np.array_split(ids, N_SHARDS)):
        events.filter(pl.col("subject_id").is_in(chunk.tolist())).write_parquet(meds / "data" / f"{i}.parquet")
    task = dementia_every_visit()
    task_file = root / "dementia_task.yaml"
    task_file.write_text(yaml.safe_dump(task.to_dict(), sort_keys=False))
    config = root / "dementia.yaml"
    assert main(["export-aces", str(task_file), "--horizon-days", str(HORIZON), "--out", str(config)]) == 0
    removed = ",".join(p + "*" for p in task.remove_from_inputs.code_prefixes)
    assert label(meds, config, root / "labels", "--remove-from-inputs", removed) == 0
    return {"root": root, "meds": meds, "events": events, "task": task, "config": config, "labels": root / "labels",
            "ours": make_labels(meds, task, progress=False).labels}


def test_exported_config_gives_the_query_back(world):
    """The labels folder holds the horizon query the exported config came from: its code set (prefixes stay
    prefixes, exact codes stay exact), the horizon from the target window, the removed codes, the task name."""
    task = read_labels_task(world["labels"])
    assert task.name == "dementia"
    assert task.condition == world["task"].condition
    assert task.horizons_days == (HORIZON,)
    assert task.remove_from_inputs == world["task"].remove_from_inputs
    assert (world["labels"] / "aces.yaml").read_text() == world["config"].read_text()
    counts = json.loads((world["labels"] / "counts.json").read_text())
    assert counts["query"]["horizon_source"].startswith("the label window 'target'")
    assert counts["query"]["condition"]["source"] == "predicate 'condition' (the label predicate)"


def test_aces_labels_agree_with_ours_where_both_define_a_row(world):
    """On the simulator (every event at midnight, so a visit day has one timestamp):

    - ACES's prediction time is the visit's event time, ours the end of that day;
    - every row ACES labels is one of ours, with the same label (positives and negatives both occur);
    - the rows only we label are exactly those ACES cannot express: the record ends before the horizon's last
      day (our censored rows, and onsets and deaths with no later event, which we label and ACES's censoring
      protection window drops), or the subject turns 50 during the visit day (we take the age at the end of
      the day, ACES at the trigger's time).
    """
    aces = read_labels(world["labels"])
    ours = world["ours"]
    assert (aces["prediction_time"] == aces["prediction_time"].dt.truncate("1d")).all()  # the visits' midnight
    keys = ["subject_id", "day"]
    aces = aces.with_columns(day=pl.col("prediction_time").dt.date())
    ours = ours.with_columns(day=pl.col("prediction_time").dt.date())
    both = ours.join(aces, on=keys, suffix="_aces")
    assert both.height == aces.height  # no row ACES labels is missing from ours
    assert (both["prediction_time_aces"] + END_OF_DAY == both["prediction_time"]).all()
    assert (both["boolean_value"] == both["boolean_value_aces"]).all()
    assert both["boolean_value"].sum() >= 10 and (~both["boolean_value"]).sum() >= 100
    only_ours = ours.join(aces, on=keys, how="anti")
    age_at_trigger = pl.col("age_years") - END_OF_DAY / timedelta(days=DAYS_PER_YEAR)
    inexpressible = (pl.col("followup_days") < HORIZON) | (age_at_trigger < world["task"].landmarks.min_age_years)
    assert only_ours.filter(~inexpressible).height == 0
    assert ours.filter(inexpressible).height == only_ours.height > 0
    # what the censoring protection window costs: onsets without follow-up to the horizon are among them
    assert only_ours.filter(pl.col("reason") == "positive").height > 0


def test_every_trigger_is_counted_and_every_shard_labelled(world, tmp_path, capsys):
    counts = json.loads((world["labels"] / "counts.json").read_text())
    events = world["events"]
    # a trigger is a (subject, time) with a timed code other than birth and death: the exported visit predicate
    visits = events.filter(pl.col("time").is_not_null() & ~pl.col("code").is_in([BIRTH_CODE, DEATH_CODE]))
    assert counts["triggers"] == visits.select("subject_id", "time").n_unique()
    labels = read_labels(world["labels"])
    assert counts["rows_from_aces"] == labels.height and counts["rows_dropped"] == {"not_in_subject_splits": 0}
    assert counts["triggers_excluded_by_aces"] == counts["triggers"] - counts["rows_from_aces"] > 0
    assert len(counts["shards"]) == N_SHARDS and all(s["rows"] > 0 for s in counts["shards"])
    assert sum(s["triggers"] for s in counts["shards"]) == counts["triggers"]
    # one shard or three: the same labels
    assert label(world["root"] / "sim", world["config"], tmp_path / "one") == 0
    assert read_labels(tmp_path / "one").drop("task").equals(labels.drop("task"))
    # a subject missing from the splits: its rows are dropped and counted, and said so on stdout
    meds = tmp_path / "meds"
    shutil.copytree(world["meds"], meds)
    splits = pl.read_parquet(meds / "metadata" / "subject_splits.parquet")
    gone = labels["subject_id"][0]
    splits.filter(pl.col("subject_id") != gone).write_parquet(meds / "metadata" / "subject_splits.parquet")
    capsys.readouterr()
    assert label(meds, world["config"], tmp_path / "split") == 0
    out = capsys.readouterr().out
    counts = json.loads((tmp_path / "split" / "counts.json").read_text())
    dropped = labels.filter(pl.col("subject_id") == gone).height
    assert counts["rows_dropped"]["not_in_subject_splits"] == dropped > 0
    assert read_labels(tmp_path / "split").height == labels.height - dropped
    assert f"triggers found {counts['triggers']:,}" in out and f"not_in_subject_splits {dropped:,}" in out


def test_aces_labels_go_through_forecast_and_evaluate(world, tmp_path):
    tokenizer = Tokenizer.fit(pl.read_parquet(world["meds"] / "data"), TokenizerConfig(min_count=1, max_time=None))
    run = make_run(tmp_path / "run", tokenizer)
    pred = tmp_path / "pred"
    assert main(["forecast", str(run), str(world["meds"]), str(world["labels"]), "--out", str(pred),
                 "--device", "cpu"]) == 0
    predictions = pl.read_parquet(pred / "predictions.parquet")
    labels = read_labels(world["labels"]).filter(pl.col("split").is_in(["tuning", "held_out"]))
    assert predictions.height == labels.height > 0
    assert set(predictions["task"]) == {"dementia"} and set(predictions["horizon_days"]) == {HORIZON}
    assert main(["evaluate", str(pred), "--out", str(tmp_path / "report"), "--bootstrap", "20"]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    group = next(g for g in metrics["tasks"] if g["task"] == "dementia" and g["horizon_days"] == HORIZON)
    held = predictions.filter(pl.col("split") == "held_out")
    expected = roc_auc_score(held["boolean_value"].to_numpy(), held["predicted_boolean_probability"].to_numpy())
    assert group["rows"][0]["auroc"]["value"] == pytest.approx(expected)


ACES_EVENT_BOUND = """\
predicates:
  dementia: {code: {regex: "^ICD10CM//(F03|G30)"}}
  lab: {code: "LOINC//4548-4", value_min: 6.5}
  death: {code: MEDS_DEATH}
trigger: _ANY_EVENT
windows:
  input: {start: null, end: trigger, start_inclusive: true, end_inclusive: true, index_timestamp: end}
  target: {start: trigger, end: start -> death, start_inclusive: false, end_inclusive: true, label: dementia}
"""


def test_a_regex_condition_resolves_to_the_dataset_codes_and_an_event_bound_window_needs_a_horizon(world, tmp_path, capsys):
    config = tmp_path / "until_death.yaml"
    config.write_text(ACES_EVENT_BOUND)
    assert label(world["meds"], config, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert "--horizon-days" in err and "bounded by an event" in err and len(err.strip().splitlines()) == 1
    assert label(world["meds"], config, tmp_path / "b", "--horizon-days", "365") == 0
    task = read_labels_task(tmp_path / "b")
    codes = world["events"].filter(pl.col("code").str.contains("^ICD10CM//(F03|G30)"))["code"].unique().sort()
    assert task.condition.codes == tuple(codes) and not task.condition.code_prefixes and len(codes) > 0
    assert task.horizons_days == (365,) and task.name == "until_death"


WINDOWS = {
    # the prediction time at the end of a one-day input window, the target right after it (docs/sampling.md)
    "after_input": ("input: {start: trigger, end: start + 1d, start_inclusive: true, end_inclusive: true, "
                    "index_timestamp: end}\n  target: {start: input.end, end: start + 730d, start_inclusive: false, "
                    "end_inclusive: true, label: dementia}", 730),
    # a target window that ends at the prediction time (a window placed from its end)
    "backwards": ("target: {start: end - 365d, end: trigger + 1d, start_inclusive: false, end_inclusive: true, "
                  "label: dementia, index_timestamp: start}", 365),
    # a gap of a day between the prediction time and the target
    "gap": ("input: {start: null, end: trigger, start_inclusive: true, end_inclusive: true, index_timestamp: end}\n  "
            "gap: {start: input.end, end: start + 1d, start_inclusive: false, end_inclusive: true}\n  "
            "target: {start: gap.end, end: start + 730d, start_inclusive: false, end_inclusive: true, label: dementia}",
            None),
    # twelve hours is no whole number of days
    "hours": ("input: {start: null, end: trigger, start_inclusive: true, end_inclusive: true, index_timestamp: end}\n  "
              "target: {start: input.end, end: start + 12h, start_inclusive: false, end_inclusive: true, "
              "label: dementia}", None),
}


@pytest.mark.parametrize("name", WINDOWS)
def test_the_horizon_is_the_label_window_only_where_that_is_unambiguous(tmp_path, name):
    windows, expected = WINDOWS[name]
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"predicates:\n  dementia: {{code: ICD10CM//F03.90}}\ntrigger: _ANY_EVENT\nwindows:\n  {windows}\n")
    horizon, why = window_horizon(load_config(config)[0])
    assert horizon == expected, why


@pytest.mark.parametrize("options, message", [
    (["--condition-predicate", "nosuch"], "no predicate 'nosuch' (--condition-predicate)"),
    (["--condition-predicate", "visit", "--codes", "X"], "give one"),
    (["--horizon-days", "365"], "--horizon-days 365 differs from the label window 'target'"),
    (["--codes", "ICD10CM//F03*,,"], "--codes"),
])
def test_bad_options_for_an_aces_config(world, tmp_path, capsys, options, message):
    assert label(world["meds"], world["config"], tmp_path / "l", *options) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "l").exists()


def test_bad_inputs_elsewhere(world, tmp_path, capsys):
    # a predicate with a value bound has no code set
    config = tmp_path / "lab.yaml"
    config.write_text(ACES_EVENT_BOUND)
    assert label(world["meds"], config, tmp_path / "l", "--condition-predicate", "lab", "--horizon-days", "365") == 2
    assert "predicate 'lab' bounds values" in capsys.readouterr().err
    # ACES options with a nextvisit task
    assert label(world["meds"], "dementia", tmp_path / "l", "--horizon-days", "730") == 2
    assert "--horizon-days: only for ACES task configs" in capsys.readouterr().err
    # an ACES config without a trigger
    broken = tmp_path / "broken.yaml"
    broken.write_text(ACES_EVENT_BOUND.replace("trigger: _ANY_EVENT\n", ""))
    assert label(world["meds"], broken, tmp_path / "l") == 2
    assert "field 'trigger' is missing" in capsys.readouterr().err
    # a task with two horizons exports one at a time
    assert main(["export-aces", "dementia", "--out", str(tmp_path / "d.yaml")]) == 2
    assert "choose one with --horizon-days" in capsys.readouterr().err
    assert main(["export-aces", "dementia", "--horizon-days", "1825", "--out", str(tmp_path / "d.yaml")]) == 0
    assert main(["export-aces", "dementia", "--horizon-days", "1825", "--out", str(tmp_path / "d.yaml")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_doctests_of_the_aces_module():
    """The code-list parser, the literal-regex reader and the complement regex (every code but birth and death
    matches it, and neither of those) behave as their examples say."""
    import doctest

    import nextvisit.tasks.aces as aces_module

    assert doctest.testmod(aces_module).failed == 0
