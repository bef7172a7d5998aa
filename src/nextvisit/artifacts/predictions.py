"""The predictions folder: what every compared model writes and ``nextvisit evaluate`` reads.

On disk (docs/interfaces.md §6), one folder per model:

- ``predictions.parquet``: one row per scored label row, ``PREDICTION_COLUMNS`` (the label row's own
  columns) + ``predicted_boolean_probability`` (float64) + ``model`` (string) + the label's
  ``CARRIED_LABEL_COLUMNS`` where it has them, sorted by task, horizon, split, subject and prediction time.
  A stage may add columns (``nextvisit occurrence`` adds ``prior_occurrence``).
- ``info.json``: ``model``, ``kind`` (one of ``KINDS``), ``task`` (a name or a list), ``config`` (what made
  the predictions), ``label_counts`` (rows per task@horizon and split, censored ones included), and anything
  else the model reports.

Both are written together into a staging folder that replaces ``--out`` only when complete
(``nextvisit.artifacts.folders.atomic_folder``). ``read_predictions`` validates a folder at the boundary
of ``evaluate`` and returns one ``ModelPredictions`` per (task, horizon); ``split_predictions`` does the same for
rows held in memory (the Python API's, ``nextvisit.api``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import meds
import polars as pl

from nextvisit.artifacts.folders import atomic_folder
from nextvisit.errors import UserError

PREDICTIONS_FILE = "predictions.parquet"
INFO_FILE = "info.json"
PROBABILITY = "predicted_boolean_probability"  # meds-evaluation's name for the predicted risk
LABEL = "boolean_value"
PREDICTION_COLUMNS = ("subject_id", "prediction_time", LABEL, "task", "horizon_days", "split", "age_years", "sex")
PREDICTION_SPLITS = (meds.tuning_split, meds.held_out_split)  # rows every model scores (train fits them)
REQUIRED_COLUMNS = ("subject_id", "task", "horizon_days", "split", PROBABILITY)
ZERO_SHOT, FINE_TUNED, COUNT_FEATURES, ORACLE = "zero-shot", "fine-tuned", "count-features", "oracle"
# The best model of what is observable (all history, age, sex, time since each code's first occurrence):
# the reachable reference, beside the oracle's unreachable ceiling (it sees the simulator's latent state).
OBSERVABLE_REFERENCE = "observable-reference"
KINDS = (ZERO_SHOT, FINE_TUNED, COUNT_FEATURES, ORACLE, OBSERVABLE_REFERENCE)
SORT_KEYS = ("task", "horizon_days", "split", "subject_id", "prediction_time")
# Label columns carried into the predictions where the labels have them (nextvisit.tasks.FOLLOW_UP_SCHEMA):
# the censoring weight and the days of data after the horizon, for the weighted and sensitivity figures.
CENSORING_WEIGHT = "censoring_weight"
DAYS_AFTER_HORIZON = "days_after_horizon"
CARRIED_LABEL_COLUMNS = (CENSORING_WEIGHT, DAYS_AFTER_HORIZON)


def prediction_frame(rows: pl.DataFrame, probability, model: str, extra_columns=()) -> pl.DataFrame:
    """The schema's columns of label ``rows`` with ``probability`` (a column name of ``rows`` or an array of
    one value per row) and the model name, in the schema's order and sort."""
    risk = pl.col(probability) if isinstance(probability, str) else pl.Series(PROBABILITY, probability)
    carried = [c for c in CARRIED_LABEL_COLUMNS if c in rows.columns and c not in extra_columns]
    return rows.select(
        # NaN (a row a model could not score) is written as null, the schema's missing value
        *PREDICTION_COLUMNS, risk.cast(pl.Float64).fill_nan(None).alias(PROBABILITY), pl.lit(model).alias("model"), *carried,
        *extra_columns,
    ).sort(*SORT_KEYS)


def write_predictions(out: Path, predictions: pl.DataFrame, info: dict, overwrite: bool = False,
                      also=None) -> Path:
    """``out/predictions.parquet`` and ``out/info.json``, both or neither (atomic folder). ``info`` must name
    the model and its kind; its ``task`` is filled from the rows when absent. ``also(folder)`` writes any
    other file of the folder (a fine-tuned model's weights) into the same atomic folder."""
    missing = [c for c in (*PREDICTION_COLUMNS, PROBABILITY, "model") if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack schema column(s) {missing}")
    if info.get("kind") not in KINDS or not info.get("model"):
        raise ValueError(f"info needs a model name and a kind of {KINDS}, got {info.get('model')!r}, {info.get('kind')!r}")
    tasks = predictions["task"].unique().sort().to_list()
    info = {"task": tasks[0] if len(tasks) == 1 else tasks, **info}
    with atomic_folder(out, overwrite) as staging:
        predictions.write_parquet(staging / PREDICTIONS_FILE)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        if also is not None:
            also(staging)
    return Path(out) / PREDICTIONS_FILE


# -- reading ---------------------------------------------------------------------------------------------------


@dataclass
class ModelPredictions:
    """The rows of one (file, task, horizon) and what info.json says about the model."""

    name: str
    kind: str
    task: str
    horizon_days: int
    frame: pl.DataFrame
    source: str
    config: dict = field(default_factory=dict)
    label_counts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # the whole info.json


@dataclass
class HeldPredictions:
    """A predictions folder's content held in memory (the Python API's, ``nextvisit.api``): the rows (the
    schema above), info.json's content, ``where`` they are named in messages and the ``source`` recorded."""

    frame: pl.DataFrame
    info: dict
    where: str
    source: str

    def split(self, warnings: list[str]) -> list[ModelPredictions]:
        """``read_predictions`` of rows held in memory: one ``ModelPredictions`` per (task, horizon)."""
        check_prediction_columns(self.frame, self.where)
        return split_predictions(self.frame, self.info, self.where, self.source, warnings)


def find_prediction_files(path: Path) -> list[Path]:
    """``path`` itself (a parquet file), its predictions.parquet, or every predictions.parquet below it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; pass prediction folders written by `nextvisit forecast`, "
                        "`oracle`, `occurrence` or `baseline`")
    if path.is_file():
        if path.suffix != ".parquet":
            raise UserError(f"{path}: not a predictions file (expected {PREDICTIONS_FILE} or a folder holding one)")
        return [path]
    if (path / PREDICTIONS_FILE).is_file():
        return [path / PREDICTIONS_FILE]
    found = sorted(path.rglob(PREDICTIONS_FILE))
    if not found:
        raise UserError(f"{path}: not a predictions folder (no {PREDICTIONS_FILE} in it or below it); pass folders "
                        "written by `nextvisit forecast`, `oracle`, `occurrence` or `baseline`")
    return found


def read_info(file: Path, warnings: list[str]) -> dict:
    """The ``info.json`` beside a predictions file ({} with a warning when there is none)."""
    info_path = Path(file).parent / INFO_FILE
    if not info_path.is_file():
        warnings.append(f"{file}: no {INFO_FILE} beside it; model name taken from the 'model' column, kind unknown")
        return {}
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{info_path}: not valid JSON ({exc}); rewrite the predictions folder") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: expected a JSON object with model, kind, task, config, label_counts")
    return info


def read_predictions(file: Path, warnings: list[str]) -> list[ModelPredictions]:
    """One ``ModelPredictions`` per (task, horizon) in the file; problems that leave metrics computable are
    appended to ``warnings``, structural ones raise ``UserError``."""
    file = Path(file)
    frame = read_prediction_file(file)
    source = str(file.parent if file.name == PREDICTIONS_FILE else file)
    return split_predictions(frame, read_info(file, warnings), file, source, warnings, fallback_name=file.parent.name)


def read_prediction_file(file: Path) -> pl.DataFrame:
    """The rows of one predictions parquet, with the columns every predictions file needs (else a ``UserError``)."""
    try:
        frame = pl.read_parquet(file)
    except Exception as exc:  # polars raises several types for a file that is not parquet
        raise UserError(f"{file}: cannot be read as parquet ({type(exc).__name__}: {exc}); "
                        "pass a predictions folder (docs/interfaces.md §6)") from None
    check_prediction_columns(frame, file)
    return frame


def check_prediction_columns(frame: pl.DataFrame, where) -> None:
    """A ``UserError`` naming ``where`` when ``frame`` lacks a column every predictions file needs."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{where}: missing column(s) {missing}; predictions need {list(REQUIRED_COLUMNS)} "
                        "plus boolean_value (docs/interfaces.md §6)")


def split_predictions(frame: pl.DataFrame, info: dict, where, source: str, warnings: list[str],
                      fallback_name: str = "model") -> list[ModelPredictions]:
    """The rows of one predictions file (or frame held in memory, ``check_prediction_columns`` passed) with its
    info.json content, one ``ModelPredictions`` per (task, horizon); ``where`` names them in warnings,
    ``source`` is what the entries record."""
    row_models = frame["model"].drop_nulls().unique().sort().to_list() if "model" in frame.columns else []
    name = info.get("model") or (row_models[0] if len(row_models) == 1 else None) or fallback_name
    if row_models and row_models != [name]:
        warnings.append(f"{where}: 'model' column holds {row_models} but {INFO_FILE} says {name!r}; using {name!r}")
    kind = str(info.get("kind") or "unknown")
    if kind not in KINDS:
        warnings.append(f"{where}: model kind {kind!r} is not one of {list(KINDS)}")

    frame = frame.with_columns(pl.col("task").cast(pl.Utf8), pl.col("horizon_days").cast(pl.Int64),
                               pl.col("split").cast(pl.Utf8))
    row_tasks = frame["task"].drop_nulls().unique().sort().to_list()
    info_tasks = info.get("task")
    info_tasks = sorted([info_tasks] if isinstance(info_tasks, str) else (info_tasks or []))
    if info_tasks and info_tasks != row_tasks:
        warnings.append(f"{where}: rows hold task(s) {row_tasks} but {INFO_FILE} says {info_tasks}; "
                        "evaluating the rows' tasks")
    null_keys = frame.filter(pl.col("task").is_null() | pl.col("horizon_days").is_null()).height
    if null_keys:
        warnings.append(f"{where}: {null_keys} row(s) with null task or horizon_days excluded")
        frame = frame.filter(pl.col("task").is_not_null() & pl.col("horizon_days").is_not_null())

    out = []
    for (task, horizon), part in sorted(frame.group_by(["task", "horizon_days"]), key=lambda kv: kv[0]):
        out.append(ModelPredictions(
            name=str(name), kind=kind, task=str(task), horizon_days=int(horizon), frame=part, source=source,
            config=info.get("config") or {}, label_counts=info.get("label_counts") or {}, info=info,
        ))
    if not out:
        warnings.append(f"{where}: no rows to evaluate")
    return out
