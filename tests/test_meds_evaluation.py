"""`nextvisit export-meds-eval`: a predictions folder (docs/interfaces.md §6) becomes files that the installed
meds-evaluation validates strictly and scores with our AUROC and average precision; rows it cannot score
are counted, not dropped; bad columns are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from flexible_schema import SchemaValidationError
from meds_evaluation.evaluate import evaluate_binary_classification
from meds_evaluation.schema import PredictionSchema

from nextvisit.artifacts.meds_evaluation import MANIFEST_FILE, MEDS_EVALUATION_SCHEMA, export
from nextvisit.artifacts.predictions import PREDICTIONS_FILE, prediction_frame, write_predictions
from nextvisit.cli import main as cli_main
from nextvisit.errors import UserError
from nextvisit.evaluate.metrics import auroc, average_precision

GROUPS = (("dementia", 730), ("dementia", 1825), ("knee_oa", 730))
N_ROWS = 240  # per (task, horizon); two label rows per subject
CENSORED_EVERY = 11  # every 11th label row is censored (null boolean_value)
NAN_SCORES = 3  # labelled held-out rows of dementia@730 whose model gave no risk


def label_rows(task: str, horizon: int, seed: int) -> pl.DataFrame:
    """Label rows in the labels schema (docs/interfaces.md §5), some censored, with a risk column that
    ranks the labels imperfectly."""
    rng = np.random.default_rng(seed)
    subject_id = np.arange(N_ROWS) // 2
    age = rng.uniform(40, 95, N_ROWS)
    log_odds = -2.0 + 0.05 * (age - 65) + rng.normal(0, 1.0, N_ROWS)
    label = rng.random(N_ROWS) < 1 / (1 + np.exp(-log_odds))
    censored = np.arange(N_ROWS) % CENSORED_EVERY == 0
    return pl.DataFrame({
        "subject_id": subject_id.astype(np.int64),
        "prediction_time": [datetime(2015, 1, 1) + timedelta(days=int(3 * i)) for i in range(N_ROWS)],
        "boolean_value": pl.Series([None if c else bool(y) for c, y in zip(censored, label)], dtype=pl.Boolean),
        "reason": np.where(censored, "censored_lost_to_followup", np.where(label, "positive", "negative")),
        "task": [task] * N_ROWS, "horizon_days": np.full(N_ROWS, horizon, np.int32),
        "split": np.where(subject_id % 3 == 0, "tuning", "held_out"), "age_years": age,
        "sex": rng.choice(["F", "M"], N_ROWS),
        "risk": 1 / (1 + np.exp(-(log_odds + rng.normal(0, 1.0, N_ROWS)))),
    })


def predictions_folder(folder: Path) -> Path:
    """A predictions folder written by our own writer: three (task, horizon) groups, extra columns, censored
    rows and a few missing risks."""
    rows = pl.concat([label_rows(task, horizon, seed) for seed, (task, horizon) in enumerate(GROUPS)])
    frame = prediction_frame(rows, "risk", "nextvisit", extra_columns=(pl.col("reason"),))
    frame = frame.with_row_index("row")
    no_risk = frame.filter((pl.col("task") == "dementia") & (pl.col("horizon_days") == 730)
                           & (pl.col("split") == "held_out") & pl.col("boolean_value").is_not_null())["row"]
    no_risk = no_risk[:NAN_SCORES]
    frame = frame.with_columns(pl.when(pl.col("row").is_in(no_risk.to_list())).then(float("nan"))
                               .otherwise(pl.col("predicted_boolean_probability"))
                               .alias("predicted_boolean_probability")).drop("row")
    write_predictions(folder, frame, {"model": "nextvisit", "kind": "zero-shot"})
    return folder


def expected_rows(source: pl.DataFrame, task: str, horizon: int, split: str) -> pl.DataFrame:
    """The rows meds-evaluation can score, chosen from the source file independently of the export."""
    part = source.filter((pl.col("task") == task) & (pl.col("horizon_days") == horizon) & (pl.col("split") == split))
    return part.filter(pl.col("boolean_value").is_not_null() & pl.col("predicted_boolean_probability").is_not_nan())


@pytest.fixture()
def exported(tmp_path):
    folder = predictions_folder(tmp_path / "pred")
    manifest = export(folder, tmp_path / "meds_eval")
    return folder, tmp_path / "meds_eval", manifest


def test_every_file_is_meds_evaluations_schema_and_its_auroc_is_ours(exported):
    folder, out, manifest = exported
    source = pl.read_parquet(folder / PREDICTIONS_FILE)
    with pytest.raises(SchemaValidationError, match="Disallowed extra columns"):  # why the export exists
        PredictionSchema.validate(source.to_arrow())
    assert [(f["task"], f["horizon_days"], f["split"]) for f in manifest["files"]] == \
        [(task, horizon, "held_out") for task, horizon in GROUPS]
    for entry in manifest["files"]:
        table = pl.read_parquet(out / entry["path"])
        PredictionSchema.validate(table.to_arrow())  # strict: raises on an extra column, a dtype or a null label
        assert table.columns == list(MEDS_EVALUATION_SCHEMA)
        ours = expected_rows(source, entry["task"], entry["horizon_days"], "held_out")
        assert entry["rows"] == table.height == ours.height
        assert entry["positives"] == int(ours["boolean_value"].sum())

        result = evaluate_binary_classification(table)["samples_equally_weighted"]
        labels, risks = ours["boolean_value"].to_numpy(), ours["predicted_boolean_probability"].to_numpy()
        assert entry["probability_ties_from_float32"] == 0  # so float32 ranks equal the float64 ones
        assert result["roc_auc_score"] == pytest.approx(auroc(labels, risks), abs=1e-12)
        assert result["average_precision_score"] == pytest.approx(average_precision(labels, risks), abs=1e-12)
        assert result["brier_score"] == pytest.approx(np.mean((risks - labels) ** 2), abs=1e-6)  # float32 risks


def test_skipped_and_unexported_rows_are_counted(exported):
    folder, out, manifest = exported
    source = pl.read_parquet(folder / PREDICTIONS_FILE)
    held_out = source.filter(pl.col("split") == "held_out")
    by_file = {(f["task"], f["horizon_days"]): f for f in manifest["files"]}
    assert by_file[("dementia", 730)]["rows_skipped"]["missing_score"] == NAN_SCORES
    assert by_file[("dementia", 1825)]["rows_skipped"]["missing_score"] == 0
    for (task, horizon), entry in by_file.items():
        part = held_out.filter((pl.col("task") == task) & (pl.col("horizon_days") == horizon))
        assert entry["rows_skipped"]["unlabelled"] == part["boolean_value"].null_count() > 0
        assert entry["rows"] + sum(entry["rows_skipped"].values()) == part.height
    assert manifest["rows_skipped"] == {"unlabelled": held_out["boolean_value"].null_count(),
                                        "missing_score": NAN_SCORES}
    assert manifest["rows_not_exported"] == {"tuning": source.filter(pl.col("split") == "tuning").height}
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest
    assert manifest["columns"] == {"subject_id": "int64", "prediction_time": "timestamp[us]", "boolean_value": "bool",
                                   "predicted_boolean_value": "bool", "predicted_boolean_probability": "float"}


def test_the_schema_is_the_installed_meds_evaluations():
    theirs = PredictionSchema.schema()
    ours = pl.DataFrame(schema=MEDS_EVALUATION_SCHEMA).to_arrow().schema
    for field in ours:
        assert theirs.field(field.name).type == field.type, field.name
    assert set(PredictionSchema.required_columns()) <= set(ours.names)


def test_meds_evaluation_cli_scores_an_exported_file(exported, tmp_path):
    folder, out, manifest = exported
    entry = manifest["files"][1]
    results = tmp_path / "results.json"
    cli = Path(sys.executable).parent / "meds-evaluation-cli"
    subprocess.run([str(cli), f"predictions_path={out / entry['path']}", f"output_file={results}"],
                   check=True, capture_output=True, text=True, timeout=120)
    ours = expected_rows(pl.read_parquet(folder / PREDICTIONS_FILE), entry["task"], entry["horizon_days"], "held_out")
    reported = json.loads(results.read_text())["samples_equally_weighted"]["roc_auc_score"]
    assert reported == pytest.approx(auroc(ours["boolean_value"].to_numpy(),
                                           ours["predicted_boolean_probability"].to_numpy()), abs=1e-12)
    first = out / manifest["files"][0]["path"]
    assert manifest["evaluate"].startswith(f"meds-evaluation-cli predictions_path={first} ")


def test_the_verb_writes_each_requested_split(tmp_path, capsys):
    folder = predictions_folder(tmp_path / "pred")
    out = tmp_path / "export"
    assert cli_main(["export-meds-eval", str(folder), "--out", str(out), "--split", "tuning,held_out"]) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        f"{task}/{horizon}d/{split}.parquet" for task, horizon in GROUPS for split in ("tuning", "held_out"))
    assert manifest["rows_not_exported"] == {}
    assert "Score a file with: meds-evaluation-cli" in capsys.readouterr().out
    assert cli_main(["export-meds-eval", str(folder), "--out", str(out)]) == 2  # not empty, no --overwrite
    assert cli_main(["export-meds-eval", str(folder), "--out", str(out), "--overwrite"]) == 0
    assert {f["split"] for f in json.loads((out / MANIFEST_FILE).read_text())["files"]} == {"held_out"}
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export-meds-eval", "--help"])
    assert exit_info.value.code == 0 and "meds-evaluation" in capsys.readouterr().out


def test_a_group_with_no_scorable_row_is_listed_not_written(tmp_path):
    folder = predictions_folder(tmp_path / "pred")
    frame = pl.read_parquet(folder / PREDICTIONS_FILE)
    knee = (pl.col("task") == "knee_oa") & (pl.col("split") == "held_out")
    frame.with_columns(pl.when(knee).then(None).otherwise(pl.col("boolean_value")).alias("boolean_value")) \
        .write_parquet(folder / PREDICTIONS_FILE)
    manifest = export(folder, tmp_path / "out")
    assert [f["task"] for f in manifest["files"]] == ["dementia", "dementia"]
    assert manifest["not_written"] == [{"task": "knee_oa", "horizon_days": 730, "split": "held_out",
                                        "reason": f"every row skipped ({frame.filter(knee).height} unlabelled)"}]
    assert not (tmp_path / "out" / "knee_oa").exists()


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop("boolean_value"), r"predictions\.parquet: missing column\(s\) \['boolean_value'\]"),
    (lambda f: f.drop("prediction_time"), r"predictions\.parquet: missing column\(s\) \['prediction_time'\]"),
    (lambda f: f.with_columns(pl.when(pl.col("split") == "held_out").then(None).otherwise(pl.col("prediction_time"))
                              .alias("prediction_time")),
     r"predictions\.parquet: column prediction_time is null in \d+ row\(s\) \(dementia, 730 days, split held_out\)"),
    (lambda f: f.with_columns(pl.col("predicted_boolean_probability") * 4 - 2),
     r"predictions\.parquet: column predicted_boolean_probability holds \d+ value\(s\) outside \[0, 1\]"),
    (lambda f: f.with_columns(pl.lit("high").alias("predicted_boolean_probability")),
     r"predictions\.parquet: column predicted_boolean_probability has type String"),
])
def test_a_bad_column_is_refused_by_name_and_nothing_is_written(tmp_path, change, message):
    folder = predictions_folder(tmp_path / "pred")
    change(pl.read_parquet(folder / PREDICTIONS_FILE)).write_parquet(folder / PREDICTIONS_FILE)
    with pytest.raises(UserError, match=message):
        export(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_split_the_file_lacks_is_refused(tmp_path):
    folder = predictions_folder(tmp_path / "pred")
    with pytest.raises(UserError, match=r"no rows in split\(s\) \['train'\]; the file holds \['held_out', 'tuning'\]"):
        export(folder, tmp_path / "out", splits=("train",))
    with pytest.raises(UserError, match="holds the predictions it would export"):
        export(folder, folder, overwrite=True)
    assert (folder / PREDICTIONS_FILE).is_file()


def test_importing_the_export_needs_neither_torch_nor_meds_evaluation():
    code = ("import sys, nextvisit.artifacts.meds_evaluation; "
            "print('torch' in sys.modules, 'meds_evaluation' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
