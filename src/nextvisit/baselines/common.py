"""What every baseline shares with the zero-shot forecast, so that all of them see identical cohorts:
the labels (``nextvisit.tasks.read_labels``; censored rows excluded and counted), the task's
``remove_from_inputs`` codes (``nextvisit.tasks.read_labels_task``), the history cut (the forecast's own
``nextvisit.predict.forecast.history_events``: events with ``time <= prediction_time`` plus static rows), and the
predictions folder (docs/interfaces.md §5-6)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl

from nextvisit.data import meds
from nextvisit.errors import UserError
from nextvisit.tasks import CodeSet, check_out, label_counts, read_labels, read_labels_task

LABEL_COLUMNS = ("subject_id", "prediction_time", "boolean_value", "task", "horizon_days", "split", "age_years", "sex")
PREDICTION_SPLITS = ("tuning", "held_out")
PROBABILITY = "predicted_boolean_probability"


def prepare_out(out: Path, overwrite: bool) -> Path:
    """An output folder to write into: refuses a non-empty one unless ``overwrite`` (then empties it)."""
    out = Path(out)
    check_out(out, overwrite)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True)
    return out


def load_labels(labels_dir: Path) -> tuple[pl.DataFrame, dict]:
    """The labelled rows of ``LABELS/labels.parquet`` with a ``row`` index, and counts per (task, horizon,
    split) of labelled, positive and censored rows. Censored rows (null ``boolean_value``) are neither trained
    on nor predicted; they are counted here and reported, never dropped silently."""
    labels = read_labels(labels_dir)
    path = Path(labels_dir) / "labels.parquet"
    bad_splits = labels.filter(~pl.col("split").is_in(["train", "tuning", "held_out"]))
    if bad_splits.height:
        row = bad_splits.row(0, named=True)
        raise UserError(f"{path}: subject {row['subject_id']} has split {row['split']!r}; expected train, tuning or held_out")
    counts = label_counts(labels)
    labelled = labels.filter(pl.col("boolean_value").is_not_null()).with_row_index("row")
    if labelled.filter(pl.col("split") == "train").height == 0:
        raise UserError(f"{path}: no labelled train-split rows; a baseline needs train labels to fit")
    return labelled, counts


def removed_input_codes(labels_dir: Path) -> CodeSet:
    """The task's ``remove_from_inputs`` codes (e.g. amnesia codes for dementia) from ``LABELS/task.yaml``,
    so the baselines drop the same input codes as the zero-shot forecast."""
    return read_labels_task(labels_dir).remove_from_inputs


def code_set_json(code_set: CodeSet) -> dict:
    return {"code_prefixes": list(code_set.code_prefixes), "codes": list(code_set.codes)}


def histories(labelled: pl.DataFrame) -> pl.DataFrame:
    """One row per distinct (subject_id, prediction_time): ``history_id, subject_id, prediction_time``.
    Rows for several horizons of the same landmark share one history."""
    return (
        labelled.select("subject_id", "prediction_time")
        .unique()
        .sort("subject_id", "prediction_time")
        .with_row_index("history_id")
        .with_columns(pl.col("history_id").cast(pl.Int64))
    )


def history_events(meds_dir: Path, history: pl.DataFrame, removed: CodeSet | None = None) -> tuple[pl.DataFrame, dict]:
    """The events each history may see, shard by shard through the forecast's own cut
    (``nextvisit.predict.forecast.history_events``: static rows plus ``time <= prediction_time``, minus ``removed``).
    Returns ``history_id, subject_id, prediction_time, time, code, numeric_value`` (rows of one history in
    time order, histories in shard order), and counts of what was cut. A label subject missing from the data
    is an error."""
    from nextvisit.predict.forecast import history_events as known_events

    removed = removed or CodeSet()
    wanted = history.select("subject_id").unique()
    ids = wanted["subject_id"]
    parts, found = [], set()
    counts = {"after_prediction_time": 0, "removed_from_inputs": 0}
    for path in meds.data_files(meds_dir):
        events = (pl.scan_parquet(path).select("subject_id", "time", "code", "numeric_value")
                  .filter(pl.col("subject_id").is_in(ids.implode())).collect())
        if events.height == 0:
            continue
        found.update(events["subject_id"].unique().to_list())
        shard_history = history.filter(pl.col("subject_id").is_in(events["subject_id"].unique().implode()))
        joined = events.join(shard_history, on="subject_id")
        after = pl.col("time").is_not_null() & (pl.col("time") > pl.col("prediction_time"))
        stats = joined.select(after.sum().alias("after"), (~after & removed.expr()).sum().alias("removed")).row(0)
        counts["after_prediction_time"] += int(stats[0])
        counts["removed_from_inputs"] += int(stats[1])
        parts.append(known_events(events, shard_history, removed).rename({"subject_id": "history_id"}))
    missing = set(ids.to_list()) - found
    if missing:
        raise UserError(f"{meds_dir}: subject {min(missing)} of the labels is not in the data ({len(missing)} such "
                        "subject(s)); give the MEDS dataset the labels were made from")
    kept = (
        pl.concat(parts)
        .join(history, on="history_id")
        .select("history_id", "subject_id", "prediction_time", "time", "code", "numeric_value")
    )
    found_histories = kept.select(pl.col("history_id").n_unique()).item()
    counts.update(histories=history.height, histories_without_events=history.height - found_histories,
                  events_kept=kept.height)
    return kept, counts


def write_predictions(out: Path, rows: pl.DataFrame, model: str, kind: str, config: dict, label_counts: dict,
                      extra_info: dict | None = None) -> Path:
    """``out/predictions.parquet`` (label columns + probability + model) and ``out/info.json``, each written
    to a temporary sibling and renamed into place."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = rows.select(
        *[pl.col(c) for c in LABEL_COLUMNS],
        pl.col(PROBABILITY).cast(pl.Float64),
        pl.lit(model).alias("model"),
    ).sort("task", "horizon_days", "split", "subject_id", "prediction_time")
    tasks = frame["task"].unique().sort().to_list()
    info = {
        "model": model,
        "kind": kind,
        "task": tasks[0] if len(tasks) == 1 else tasks,
        "config": config,
        "label_counts": label_counts,
    }
    info.update(extra_info or {})
    tmp = out / ".predictions.parquet.tmp"
    frame.write_parquet(tmp)
    os.replace(tmp, out / "predictions.parquet")
    tmp = out / ".info.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, out / "info.json")
    return out / "predictions.parquet"
