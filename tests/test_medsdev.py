"""nextvisit as a MEDS-DEV model: the shipped model.yaml, filled and run the way MEDS-DEV runs a model in its
full mode (each command formatted with str.format, written to OUT/cmd.sh under `set -e` and run with bash,
output folders chained through model_initialization_dir), on a small simulated MEDS dataset whose labels are
plain MEDS label files. The predictions land where MEDS-DEV's evaluation reads them, cover every labelled row
of the split, have meds-evaluation's schema and are scored by meds-evaluation-cli."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from nextvisit.artifacts.meds_evaluation import MEDS_EVALUATION_SCHEMA
from nextvisit.cli import main as cli_main
from nextvisit.data.meds import read_label_files
from nextvisit.errors import UserError
from nextvisit.evaluate.metrics import auroc
from nextvisit.medsdev import DEMO_STEPS, ENVIRONMENT, MODEL_README, MODEL_YAML, PREDICTIONS, RUN, STAGE_FILE, STORE
from nextvisit.medsdev.stages import predict, resolve_task

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUBJECTS, SEED = 300, 3  # a cohort whose knee OA labels at 730 days hold both classes in held_out
TASK, HORIZON = "knee_oa", 730
DATASET, TASK_NAME = "simulated", "knee_oa_730d"  # MEDS-DEV names the output folders after them
UNLISTED_SUBJECT = 10**9  # a label subject the dataset's subject_splits.parquet does not list
# MEDS-DEV's stage order in full mode (MEDS_DEV.models.model_commands): every run mode, then every dataset type.
RUN_MODES, DATASET_TYPES = ("train", "predict"), ("unsupervised", "supervised")


@pytest.fixture(scope="module")
def commands():
    spec = yaml.safe_load(MODEL_YAML.read_text())
    # MEDS-DEV reads metadata.description and at least one contact with a name (MEDS_DEV.utils.Metadata)
    assert isinstance(spec["metadata"]["description"], str) and spec["metadata"]["contacts"][0]["name"]
    return spec["commands"]


def _meds_dev_stages(commands: dict, root: Path, dataset_dir: Path, labels_dir: Path):
    """(command, output folder) per stage, filled as MEDS-DEV fills them with mode=full, dataset_type=full."""
    kwargs = {"dataset_dir": str(dataset_dir), "model_dir": str(MODEL_YAML.parent), "demo": True}
    for run_mode, dataset_type in itertools.product(RUN_MODES, DATASET_TYPES):
        template = (commands.get(dataset_type) or {}).get(run_mode)
        if not template:
            continue
        out = root / DATASET
        if dataset_type == "supervised":
            out = out / TASK_NAME
            kwargs["labels_dir"] = str(labels_dir)
        else:
            out = out / dataset_type
        out = out / run_mode
        kwargs["output_dir"] = str(out)
        if run_mode == "predict":
            kwargs["split"] = "held_out"
        else:
            kwargs.pop("split", None)
        yield f"{dataset_type} {run_mode}", template.format(**kwargs), out  # KeyError: a variable MEDS-DEV lacks
        if run_mode != "predict":
            kwargs["model_initialization_dir"] = str(out)


def _run_like_meds_dev(command: str, out: Path, env: dict) -> None:
    """MEDS_DEV.utils.run_in_env: the folder first, then cmd.sh under `set -e`, run with bash; .done on success."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "cmd.sh"
    script.write_text("\n".join(["#!/bin/bash", "set -e", command]))
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    (out / ".done").touch()


@pytest.fixture(scope="module")
def world(tmp_path_factory, commands):
    from nextvisit.data.simulate.dataset import simulate
    from nextvisit.tasks import load_task, make_labels

    root = tmp_path_factory.mktemp("medsdev")
    dataset_dir = root / "meds"
    simulate(SUBJECTS, dataset_dir, seed=SEED, workers=1, progress=False)
    ours = make_labels(dataset_dir, load_task(TASK), progress=False).labels
    ours = ours.filter((pl.col("horizon_days") == HORIZON) & pl.col("boolean_value").is_not_null())
    held_out = ours.filter(pl.col("split") == "held_out")
    assert 0 < held_out["boolean_value"].sum() < held_out.height, "held_out needs both classes for an AUROC"
    labels_dir = root / "labels"
    for split, part in ours.group_by("split"):  # ACES's layout: LABELS/<split>/<shard>.parquet
        (labels_dir / split[0]).mkdir(parents=True)
        part.select("subject_id", "prediction_time", "boolean_value").write_parquet(labels_dir / split[0] / "0.parquet")
    first = held_out.row(0, named=True)
    extra = pl.DataFrame({  # a held_out row without a label, and two rows of a subject the dataset does not list
        "subject_id": [first["subject_id"], UNLISTED_SUBJECT, UNLISTED_SUBJECT],
        "prediction_time": [first["prediction_time"]] * 3, "boolean_value": [None, True, False],
    }, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean})
    extra.write_parquet(labels_dir / "extra.parquet")

    inherited = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}  # unset: the options' defaults
    env = {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "NEXTVISIT_TASK": TASK, "NEXTVISIT_HORIZON_DAYS": str(HORIZON), "NEXTVISIT_DEVICE": "cpu"}
    stages = {}
    for name, command, out in _meds_dev_stages(commands, root / "experiment", dataset_dir, labels_dir):
        _run_like_meds_dev(command, out, env)
        stages[name] = out
    return {"root": root, "dataset_dir": dataset_dir, "labels_dir": labels_dir, "labels": ours, "stages": stages}


def test_every_stage_runs_and_the_commands_use_only_meds_devs_variables(world):
    assert list(world["stages"]) == ["unsupervised train", "supervised train", "supervised predict"]
    for out in world["stages"].values():
        assert (out / ".done").is_file() and (out / STAGE_FILE).is_file()


def test_unsupervised_train_tokenizes_and_pretrains_a_short_demo_run(world):
    out = world["stages"]["unsupervised train"]
    assert (out / STORE / "manifest.json").is_file()
    metrics = pl.read_csv(out / RUN / "metrics.csv")
    assert metrics["step"].max() == DEMO_STEPS  # {demo}: tiny and short
    record = json.loads((out / STAGE_FILE).read_text())
    assert record["demo"] is True and record["preset"] == "tiny"


def test_supervised_train_fits_nothing_and_hands_the_pretrained_run_on(world):
    pretrained = world["stages"]["unsupervised train"] / RUN
    out = world["stages"]["supervised train"]
    assert (out / RUN / "model.safetensors").read_bytes() == (pretrained / "model.safetensors").read_bytes()
    assert not (out / RUN / "checkpoint").exists()
    record = json.loads((out / STAGE_FILE).read_text())
    assert record["fitted"].startswith("nothing") and Path(record["pretrained_run"]) == pretrained.resolve()


def test_predictions_cover_every_labelled_row_of_the_split_in_meds_evaluations_schema(world):
    out = world["stages"]["supervised predict"]
    assert sorted(p.relative_to(out) for p in out.rglob("*.parquet")) == [Path(PREDICTIONS)]  # what MEDS-DEV reads
    predictions = pl.read_parquet(out / PREDICTIONS)
    # MEDS-DEV scores with its pinned meds-evaluation 0.0.3, whose check wants the probability as float64
    assert predictions.schema == pl.Schema({**MEDS_EVALUATION_SCHEMA, "predicted_boolean_probability": pl.Float64})
    assert predictions["predicted_boolean_value"].null_count() == predictions.height
    risk = predictions["predicted_boolean_probability"]
    assert risk.is_between(0, 1).all() and not risk.is_nan().any() and risk.std() > 0
    expected = world["labels"].filter(pl.col("split") == "held_out").select("subject_id", "prediction_time",
                                                                            "boolean_value")
    assert predictions.select(expected.columns).sort(pl.all()).equals(expected.sort(pl.all()))

    rows = json.loads((out / STAGE_FILE).read_text())["rows"]
    labels = world["labels"]
    assert rows == {"read": labels.height + 3, "not_in_subject_splits": 2,
                    "other_splits": labels.filter(pl.col("split") != "held_out").height, "unlabelled": 1,
                    "missing_score": 0, "predicted": expected.height}


def test_meds_evaluation_scores_the_predictions_as_meds_dev_reads_them(world, tmp_path):
    from meds_evaluation.schema import PredictionSchema

    out = world["stages"]["supervised predict"]
    predictions = pl.read_parquet(out / PREDICTIONS)
    PredictionSchema.align(predictions.to_arrow())  # the installed version's check, as its evaluation runs it
    results = tmp_path / "results.json"
    # MEDS-DEV's evaluation passes predictions_path=<predict folder>/**/*.parquet
    subprocess.run([str(BIN / "meds-evaluation-cli"), f"predictions_path={out}/**/*.parquet",
                    f"output_file={results}"], check=True, capture_output=True, text=True, timeout=120)
    reported = json.loads(results.read_text())["samples_equally_weighted"]["roc_auc_score"]
    ours = auroc(predictions["boolean_value"].to_numpy(), predictions["predicted_boolean_probability"].to_numpy())
    assert np.isfinite(ours) and reported == pytest.approx(ours, abs=1e-12)


def test_the_condition_must_be_given_once_with_its_horizon():
    with pytest.raises(UserError, match="passes no task configuration.*NEXTVISIT_TASK"):
        resolve_task(None, None, None)
    with pytest.raises(UserError, match="not both"):
        resolve_task("knee_oa", "ICD10CM//M17", 730)
    with pytest.raises(UserError, match=r"task knee_oa has horizons \[730, 1825\] days; set --horizon-days"):
        resolve_task("knee_oa", None, None)
    with pytest.raises(UserError, match="--condition-codes needs --horizon-days"):
        resolve_task(None, "ICD10CM//M17", None)
    task, horizon = resolve_task(None, "ICD10CM//M17, ICD10CM//M18", 365)
    assert task.condition.code_prefixes == ("ICD10CM//M17", "ICD10CM//M18") and horizon == 365


def test_labels_without_a_row_of_the_split_are_refused_by_name(world, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    world["labels"].filter(pl.col("split") == "train").select("subject_id", "prediction_time", "boolean_value") \
        .write_parquet(labels / "train.parquet")
    with pytest.raises(UserError, match=rf"{labels}: no labelled row of split held_out .* \d+ other_splits"):
        predict(world["dataset_dir"], labels, world["stages"]["supervised train"], tmp_path / "out", "held_out",
                task=TASK, horizon_days=HORIZON)
    assert not (tmp_path / "out").exists()


def test_a_label_file_without_a_label_schema_column_is_refused_by_name(tmp_path):
    pl.DataFrame({"subject_id": [1], "prediction_time": [None]}).write_parquet(tmp_path / "0.parquet")
    with pytest.raises(UserError, match=r"0\.parquet: column\(s\) \['boolean_value'\] missing"):
        read_label_files(tmp_path)


def test_model_dir_writes_the_folder_to_add_to_meds_dev(tmp_path, capsys):
    out = tmp_path / "nextvisit"
    assert cli_main(["medsdev", "model-dir", str(out), "--requirement", "nextvisit @ file:///src/nextvisit"]) == 0
    assert (out / "model.yaml").read_text() == MODEL_YAML.read_text()
    assert (out / "README.md").read_text() == MODEL_README.read_text()
    assert (out / "requirements.txt").read_text() == "nextvisit @ file:///src/nextvisit\n"
    assert cli_main(["medsdev", "model-dir", str(out), "--requirement", "x"]) == 2  # not empty, no --overwrite
    assert "not empty" in capsys.readouterr().err
