"""One interface for every model that is compared, and the one driver that runs it.

A compared model answers, for the label rows of one task (one or more horizons): given what each history
knew at its prediction time, the probability of a new onset within the row's horizon. Every model speaks
the same verbs, in the scikit-learn spirit:

    inputs = model.read(meds_dir, labels)      what it reads of each history (cut at the prediction time)
    model.fit(inputs, train, tuning)           fit on the train rows' labels, select on the tuning rows
    p = model.predict_proba(inputs, rows)      one probability per row
    model.info()                               its config and what fitting found, for info.json

``run`` is the driver: labels -> history cut -> read -> fit -> select -> predict (``score``) -> write. The held_out rows
never reach ``fit`` (it is handed the train and tuning rows only), and every history reaches a model only
through the one cut (``nextvisit.data.histories``). Zero-shot models and the oracle take no task labels:
their ``fit`` learns nothing, and they need no train rows (``needs_train_labels = False``).
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
import time
from dataclasses import dataclass
from pathlib import Path

import meds
import numpy as np
import polars as pl

from nextvisit.artifacts.folders import check_out
from nextvisit.artifacts.predictions import PREDICTION_SPLITS, prediction_frame, write_predictions
from nextvisit.data.histories import history_table
from nextvisit.data.meds import SPLITS
from nextvisit.errors import UserError
from nextvisit.tasks import CodeSet, Task, label_counts, labels_path, read_labels, read_labels_task


@dataclass
class Labels:
    """The labelled rows of a labels folder (censored rows excluded, and counted in ``counts``), each with its
    ``row`` index and ``history_id``; the distinct histories; the task (``task.yaml``), whose
    ``remove_from_inputs`` codes no model may read. ``load`` refuses unknown splits, null keys, a repeated
    (task, subject_id, prediction_time, horizon_days) and a subject in two splits."""

    source: Path
    rows: pl.DataFrame
    histories: pl.DataFrame
    counts: dict
    task: Task | None

    @property
    def remove_from_inputs(self) -> CodeSet:
        return self.task.remove_from_inputs if self.task is not None else CodeSet()

    def split(self, name: str) -> pl.DataFrame:
        return self.rows.filter(pl.col("split") == name)

    @classmethod
    def load(cls, labels_dir: Path, require_train: bool = True, require_task: bool = True) -> "Labels":
        labels = read_labels(labels_dir)
        path = labels_path(labels_dir)
        bad = labels.filter(~pl.col("split").is_in(list(SPLITS)))
        if bad.height:
            row = bad.row(0, named=True)
            raise UserError(f"{path}: subject {row['subject_id']} has split {row['split']!r}; expected "
                            f"{', '.join(SPLITS)}")
        for column in ("subject_id", "prediction_time", "split"):
            nulls = labels.filter(pl.col(column).is_null()).height
            if nulls:
                raise UserError(f"{path}: {nulls} row(s) with a null {column}; every label row needs one")
        key = ["task", "subject_id", "prediction_time", "horizon_days"]
        repeated = labels.group_by(key).len().filter(pl.col("len") > 1).sort(key)
        if repeated.height:
            row = repeated.row(0, named=True)
            raise UserError(f"{path}: subject {row['subject_id']} at {row['prediction_time']} has {row['len']} rows for "
                            f"horizon {row['horizon_days']} days ({int((repeated['len'] - 1).sum())} duplicated row(s) "
                            "in all); each (subject_id, prediction_time, horizon_days) needs one row: drop the "
                            "duplicates, or write the labels again with `nextvisit label`")
        mixed = labels.group_by("subject_id").agg(pl.col("split").n_unique().alias("n")).filter(pl.col("n") > 1)
        if mixed.height:
            raise UserError(f"{path}: subject {mixed['subject_id'].min()} has rows in more than one split "
                            f"({mixed.height} such subject(s)); a subject belongs to one split, or held-out labels "
                            "could reach a fit")
        labelled = labels.filter(pl.col("boolean_value").is_not_null()).with_row_index("row")
        if require_train and labelled.filter(pl.col("split") == meds.train_split).height == 0:
            raise UserError(f"{path}: no labelled train-split rows; a baseline needs train labels to fit")
        histories = history_table(labelled)
        rows = labelled.join(histories, on=["subject_id", "prediction_time"]).sort("row")
        task = read_labels_task(labels_dir) if require_task or (path.parent / "task.yaml").exists() else None
        return cls(source=path, rows=rows, histories=histories, counts=label_counts(labels), task=task)


class ComparedModel(ABC):
    """The interface (see the module docstring). Subclasses set ``name`` and ``kind`` (one of
    ``nextvisit.artifacts.predictions.KINDS``) and implement ``read`` and ``predict_proba``."""

    name: str = "model"
    kind: str = ""
    needs_train_labels: bool = True
    needs_task: bool = True  # the task's remove_from_inputs codes must be known before reading histories

    @abstractmethod
    def read(self, meds_dir: Path, labels: Labels):
        """What the model reads of each history (cut at its prediction time)."""

    def fit(self, inputs, train: pl.DataFrame, tuning: pl.DataFrame) -> "ComparedModel":
        return self

    @abstractmethod
    def predict_proba(self, inputs, rows: pl.DataFrame) -> np.ndarray:
        """One probability per row of ``rows``, in their order."""

    def info(self) -> dict:
        return {}

    def save(self, folder: Path) -> None:
        """Write what the model wants kept beside its predictions (e.g. fine-tuned weights); default nothing."""


@dataclass
class Scored:
    """What ``score`` returns: the labels, the scored rows (of the chosen splits), one probability per row."""

    labels: Labels
    rows: pl.DataFrame
    probability: np.ndarray


def score(model: ComparedModel, meds_dir: Path, labels_dir: Path, splits=PREDICTION_SPLITS) -> Scored:
    """The driver's work without its output folder: labels -> history cut -> read -> fit -> select -> predict.
    ``run`` writes what it returns; the other processes of a distributed forecast, which write nothing, call it
    alone."""
    labels = Labels.load(labels_dir, require_train=model.needs_train_labels, require_task=model.needs_task)
    inputs = model.read(Path(meds_dir), labels)
    model.fit(inputs, labels.split(meds.train_split), labels.split(meds.tuning_split))
    scored = labels.rows.filter(pl.col("split").is_in(list(splits)))
    probability = np.asarray(model.predict_proba(inputs, scored), np.float64)
    if probability.shape != (scored.height,):
        raise RuntimeError(f"{model.name}: {probability.shape} probabilities for {scored.height} rows")
    return Scored(labels, scored, probability)


def run(model: ComparedModel, meds_dir: Path, labels_dir: Path, out: Path, overwrite: bool = False,
        splits=PREDICTION_SPLITS) -> Path:
    """The driver: score the labelled rows of ``splits`` with ``model`` and write its predictions folder."""
    started = time.monotonic()
    check_out(out, overwrite)
    result = score(model, meds_dir, labels_dir, splits)
    labels, scored = result.labels, result.rows
    info = {"model": model.name, "kind": model.kind, **model.info(), "label_counts": labels.counts,
            "inputs_from": {"meds_dir": str(meds_dir), "labels": str(labels_dir)},
            "removed_from_inputs": {"code_prefixes": list(labels.remove_from_inputs.code_prefixes),
                                    "codes": list(labels.remove_from_inputs.codes)},
            "rows": {"labelled": labels.rows.height, "scored": scored.height, "splits": list(splits)},
            "seconds": round(time.monotonic() - started, 1)}
    path = write_predictions(out, prediction_frame(scored, result.probability, model.name), info, overwrite,
                             also=model.save)
    sys.stderr.write(f"{model.name}: wrote {scored.height:,} predictions to {path} in {info['seconds']} s\n")
    return path
