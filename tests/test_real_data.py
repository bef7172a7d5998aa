"""End to end on real third-party MEDS data from ../shared/data, through the command line: the MIMIC-IV demo
(100 real patients, dates shifted into the 22nd century, undotted ICD-9/10 codes, labs) and a Synthea
population (7,424 subjects, SNOMED codes), each tokenize -> pretrain (a few steps) -> label -> forecast ->
evaluate. The model barely trains, so its figures mean nothing; what is tested is what each stage hands the
next on real data: a manifest that accounts for every event, new-onset labels that agree with the data's own
condition codes, predictions for every scored label row, and the evaluation's figures or its stated reason
for having none. Each stage's wall time is printed (``pytest -s`` shows it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from nextvisit.artifacts.predictions import PREDICTION_SPLITS, PROBABILITY
from nextvisit.cli import main
from nextvisit.data.meds import BIRTH_CODE
from nextvisit.tasks import POSITIVE, load_task, read_labels
from nextvisit.tokenize.store import SPLITS, TokenStore
from test_tasks import DATA

MIMIC = DATA / "mimic-iv-demo-meds"
SYNTHEA = DATA / "synthea-covid19-10k-meds"
# The smallest model and schedule the trainer tests use (tests/test_train.py tiny_config), three steps: seconds.
PRETRAIN_YAML = """\
model: {d_model: 32, n_layers: 2, n_heads: 2}
data: {context: 64}
train: {batch_contexts: 8, micro_batch: 4, warmup_steps: 2, eval_every: 1000, eval_contexts: 8,
        checkpoint_every: 1000, log_every: 1, precision: fp32, threads: 1}
"""
PRETRAIN_STEPS = 3
BOOTSTRAP = 50
RUN_NAME = "nextvisit"  # the run folder's name is the model name in predictions and reports


def needs(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"{path} is absent (third-party test data lives in ../shared/data; set NEXTVISIT_SHARED_DATA)")
    return path


class Stages:
    """Runs CLI verbs in this process, failing on a non-zero exit, and keeps each one's wall time."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.seconds: dict[str, float] = {}

    def run(self, name: str, argv: list) -> None:
        started = time.perf_counter()
        code = main([str(a) for a in argv])
        self.seconds[name] = time.perf_counter() - started
        print(f"[{self.dataset}] {name}: {self.seconds[name]:.2f} s", file=sys.stderr)
        assert code == 0, f"nextvisit {' '.join(map(str, argv))} exited {code}"

    def summary(self) -> str:
        stages = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"[{self.dataset}] stage timings: {stages}; total {sum(self.seconds.values()):.1f} s"


def tokenize_without_max_time(meds_dir: Path, out: Path, *options) -> subprocess.CompletedProcess:
    """`nextvisit tokenize` in a fresh process, so that its exit status and everything it prints are seen."""
    return subprocess.run([sys.executable, "-m", "nextvisit.cli", "tokenize", str(meds_dir), "--out", str(out),
                           *map(str, options)], capture_output=True, text=True)


def chain(root: Path, meds_dir: Path, tasks: list[str], stages: Stages, tokenize_options: list) -> dict:
    """tokenize, pretrain, then label + forecast per task, then one evaluate of every forecast."""
    store, run = root / "store", root / RUN_NAME
    stages.run("tokenize", ["tokenize", meds_dir, "--out", store, "--workers", 1, *tokenize_options])
    (root / "pretrain.yaml").write_text(PRETRAIN_YAML)
    stages.run(f"pretrain ({PRETRAIN_STEPS} steps)", ["pretrain", store, "--out", run, "--config", root / "pretrain.yaml",
                                                      "--max-steps", PRETRAIN_STEPS, "--device", "cpu"])
    for task in tasks:
        stages.run(f"label {task}", ["label", meds_dir, task, "--out", root / "labels" / task])
        stages.run(f"forecast {task}", ["forecast", run, meds_dir, root / "labels" / task,
                                        "--out", root / "predictions" / task, "--device", "cpu"])
    stages.run("evaluate", ["evaluate", *[root / "predictions" / task for task in tasks], "--out", root / "report",
                            "--bootstrap", BOOTSTRAP])
    return {"root": root, "meds": meds_dir, "store": store, "run": run, "tasks": tasks, "stages": stages}


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    """The MIMIC-IV demo: refused without --max-time (its dates lie in the 22nd century), then the chain with
    --max-time none. min_count 1, since the demo's 83 train subjects hold each dementia code only once or twice."""
    meds_dir = needs(MIMIC)
    root = tmp_path_factory.mktemp("mimic")
    (root / "tokenizer.yaml").write_text("tokenizer:\n  min_count: 1\n")
    stages = Stages("mimic-iv-demo")
    started = time.perf_counter()
    refused = tokenize_without_max_time(meds_dir, root / "refused", "--config", root / "tokenizer.yaml", "--workers", 1)
    stages.seconds["tokenize refused (subprocess)"] = time.perf_counter() - started
    result = chain(root, meds_dir, ["dementia"], stages, ["--config", root / "tokenizer.yaml", "--max-time", "none"])
    # a later --vocab-from the run (as for an external cohort) applies the run's recorded rule: no flag needed
    stages.run("tokenize --vocab-from run", ["tokenize", meds_dir, "--out", root / "store_again", "--vocab-from",
                                             result["run"], "--workers", 1])
    print(stages.summary(), file=sys.stderr)
    return {**result, "refused": refused}


@pytest.fixture(scope="module")
def synthea(tmp_path_factory):
    """The Synthea population, with max_time the data's own last event time (an ISO datetime) and both SNOMED
    tasks."""
    meds_dir = needs(SYNTHEA)
    root = tmp_path_factory.mktemp("synthea")
    end = pl.scan_parquet(meds_dir / "data" / "*.parquet").select(pl.col("time").max()).collect().item()
    stages = Stages("synthea")
    result = chain(root, meds_dir, ["dementia_snomed", "knee_oa_snomed"], stages,
                   ["--max-time", end.isoformat(timespec="seconds")])
    print(stages.summary(), file=sys.stderr)
    return {**result, "end": end}


# -- checks shared by both datasets ------------------------------------------------------------------------------


def check_manifest_accounts_for_every_event(meds_dir: Path, store_dir: Path) -> dict:
    """Every MEDS row is in one split's events_in (or unassigned), each split balances, the arrays hold the
    tokens the manifest counts, and the birth records dropped are the data's own MEDS_BIRTH rows per split."""
    manifest = json.loads((store_dir / "manifest.json").read_text())
    events = pl.read_parquet(meds_dir / "data", columns=["subject_id", "code"])
    splits = pl.read_parquet(meds_dir / "metadata" / "subject_splits.parquet")
    assert manifest["events_in"] == events.height
    assert sum(c["events_in"] for c in manifest["splits"].values()) + manifest["unassigned"]["events"] == events.height
    births = dict(events.filter(pl.col("code") == BIRTH_CODE).join(splits, on="subject_id")
                  .group_by("split").len().iter_rows())
    listed = dict(splits.group_by("split").len().iter_rows())
    store = TokenStore(store_dir)
    for split in SPLITS:
        c = manifest["splits"][split]
        assert c["events_in"] == c["tokens_from_events"] + c["duplicates_collapsed"] + sum(c["dropped"].values())
        assert c["balance_gap"] == 0
        assert c["tokens_out"] == c["tokens_from_events"] + c["age_tokens"] == store.split(split).n_tokens
        assert c["subjects_out"] == len(store.split(split))
        assert c["subjects_listed"] == listed.get(split, 0) == c["subjects_in"] + c["subjects_without_events"]
        assert c["dropped"]["birth_record"] == births.get(split, 0)
        assert c["dropped"]["after_max_time"] == 0  # the rule was an error, and nothing was refused
    return manifest


def onset_delays(meds_dir: Path, labels: pl.DataFrame, task_name: str) -> pl.DataFrame:
    """The label rows with ``delay_days``: days from the prediction day to the subject's first code of the task's
    condition in the MEDS data (null when it has none)."""
    task = load_task(task_name)
    onsets = (pl.scan_parquet(meds_dir / "data" / "*.parquet").filter(task.condition.expr())
              .group_by("subject_id").agg(onset=pl.col("time").min()).collect())
    return labels.join(onsets, on="subject_id", how="left").with_columns(
        delay_days=(pl.col("onset").dt.date() - pl.col("prediction_time").dt.date()).dt.total_days())


def check_labels(meds_dir: Path, labels_dir: Path, task_name: str) -> pl.DataFrame:
    """Every subject counted once (with landmarks or excluded by a reason); no landmark at or after a subject's
    first condition code; a row is positive exactly when that code falls within its horizon."""
    labels = read_labels(labels_dir)
    counts = json.loads((labels_dir / "counts.json").read_text())
    subjects = counts["subjects"]
    n_subjects = pl.scan_parquet(meds_dir / "data" / "*.parquet").select(pl.col("subject_id").n_unique()).collect().item()
    assert subjects["total"] == n_subjects == subjects["with_landmarks"] + sum(subjects["excluded"].values())
    assert labels["subject_id"].n_unique() == subjects["with_landmarks"]
    rows = onset_delays(meds_dir, labels, task_name)
    assert rows.filter(pl.col("onset") <= pl.col("prediction_time")).height == 0  # new onsets only
    within = pl.col("delay_days").is_not_null() & (pl.col("delay_days") <= pl.col("horizon_days"))
    assert rows.filter((pl.col("reason") == POSITIVE) != within).height == 0
    assert rows.filter((pl.col("reason") == POSITIVE) != pl.col("boolean_value").fill_null(False)).height == 0
    for horizon, h in counts["horizons"].items():
        at = labels.filter(pl.col("horizon_days") == int(horizon))
        assert h["rows"] == at.height and h["positive"] == at.filter(pl.col("reason") == POSITIVE).height
        assert h["labelled"] == at.filter(pl.col("boolean_value").is_not_null()).height
    # subjects with the condition but no label row include every prevalent one
    with_condition = set(rows.filter(pl.col("onset").is_not_null())["subject_id"].to_list())
    task = load_task(task_name)
    all_with_condition = set(pl.scan_parquet(meds_dir / "data" / "*.parquet").filter(task.condition.expr())
                             .select("subject_id").unique().collect()["subject_id"].to_list())
    assert with_condition <= all_with_condition
    assert len(all_with_condition - with_condition) >= subjects["excluded"]["prevalent"]
    return labels


def check_predictions(labels: pl.DataFrame, predictions_dir: Path) -> pl.DataFrame:
    """One prediction per labelled row of the scored splits, with the label's value, and a finite probability."""
    predictions = pl.read_parquet(predictions_dir / "predictions.parquet")
    keys = ["subject_id", "prediction_time", "horizon_days", "split", "boolean_value"]
    scored = labels.filter(pl.col("boolean_value").is_not_null() & pl.col("split").is_in(list(PREDICTION_SPLITS)))
    assert scored.height > 0
    assert predictions.select(keys).sort(keys).equals(scored.select(keys).sort(keys))
    risk = predictions[PROBABILITY]
    assert risk.null_count() == 0 and risk.is_finite().all() and risk.is_between(0, 1).all()
    assert set(predictions["model"].unique()) == {RUN_NAME}
    return predictions


def check_evaluation(report: Path, task_name: str, labels: pl.DataFrame) -> list[float | None]:
    """Per horizon, the report's held-out counts are the labels' own; an AUROC in [0, 1] where held_out holds both
    classes, else none and the reason. Returns the AUROCs."""
    metrics = json.loads((report / "metrics.json").read_text())
    aurocs = []
    for horizon in sorted(labels["horizon_days"].unique().to_list()):
        (group,) = [g for g in metrics["tasks"] if g["task"] == task_name and g["horizon_days"] == horizon]
        (row,) = [r for r in group["rows"] if r["model"] == RUN_NAME]
        held = labels.filter((pl.col("split") == "held_out") & (pl.col("horizon_days") == horizon)
                             & pl.col("boolean_value").is_not_null())
        positives = int(held["boolean_value"].sum())
        assert (row["counts"]["rows"], row["counts"]["positives"]) == (held.height, positives)
        auroc = row["auroc"]
        if 0 < positives < held.height:
            assert auroc["reason"] is None and 0.0 <= auroc["value"] <= 1.0
        else:
            missing = "positives" if positives == 0 else "negatives"
            assert auroc["value"] is None and auroc["reason"] == f"held_out has 0 {missing} among {held.height} rows"
        assert math.isfinite(row["brier"]["value"])
        aurocs.append(auroc["value"])
    return aurocs


# -- MIMIC-IV demo ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mimic_shifted_dates_are_refused_without_max_time_naming_the_flag(mimic):
    refused = mimic["refused"]
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar's redraws
    assert last.startswith("nextvisit tokenize: error:") and "after max_time" in last
    remedies = last.split("if the dates are shifted (as in MIMIC), ", 1)[1]
    assert remedies.startswith("tokenize with `--max-time none` or `--max-time <a date after the data's end>`")
    assert not (mimic["root"] / "refused").exists()
    assert not [p.name for p in mimic["root"].iterdir() if "refused" in p.name]  # no staging folder left behind


@pytest.mark.slow
def test_mimic_store_records_no_max_time_and_accounts_for_every_event(mimic):
    manifest = check_manifest_accounts_for_every_event(mimic["meds"], mimic["store"])
    assert manifest["splits"]["train"]["subjects_out"] > 0
    recorded = yaml.safe_load((mimic["store"] / "tokenizer.yaml").read_text())["tokenizer"]
    assert recorded["max_time"] is None and recorded["min_count"] == 1  # the flag, and the config file's other field
    assert yaml.safe_load((mimic["run"] / "tokenizer.yaml").read_text()) == {"tokenizer": recorded}
    # re-tokenizing with the run's vocabulary saw the same rule and the same events
    again = check_manifest_accounts_for_every_event(mimic["meds"], mimic["root"] / "store_again")
    assert yaml.safe_load((mimic["root"] / "store_again" / "tokenizer.yaml").read_text()) == {"tokenizer": recorded}
    assert again["splits"] == manifest["splits"]


@pytest.mark.slow
def test_mimic_dementia_labels_predictions_and_evaluation(mimic):
    labels = check_labels(mimic["meds"], mimic["root"] / "labels" / "dementia", "dementia")
    # the undotted ICD-10 / ICD-9 codes are matched: the demo's dementia subjects give incident cases
    assert labels.filter(pl.col("reason") == POSITIVE).height > 0
    check_predictions(labels, mimic["root"] / "predictions" / "dementia")
    check_evaluation(mimic["root"] / "report", "dementia", labels)


# -- Synthea ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_synthea_store_records_its_max_time_and_accounts_for_every_event(synthea):
    check_manifest_accounts_for_every_event(synthea["meds"], synthea["store"])
    recorded = yaml.safe_load((synthea["store"] / "tokenizer.yaml").read_text())["tokenizer"]
    assert recorded["max_time"] == synthea["end"].isoformat(timespec="seconds")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["dementia_snomed", "knee_oa_snomed"])
def test_synthea_snomed_labels_predictions_and_evaluation(synthea, task):
    labels = check_labels(synthea["meds"], synthea["root"] / "labels" / task, task)
    check_predictions(labels, synthea["root"] / "predictions" / task)
    aurocs = check_evaluation(synthea["root"] / "report", task, labels)
    # 7,424 subjects give held-out cases at some horizon, so the chain ends in at least one AUROC
    assert any(value is not None for value in aurocs)
