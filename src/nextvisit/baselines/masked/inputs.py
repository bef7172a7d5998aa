"""What the fine-tuned masked model reads of each history: the label rows' histories cut at their
prediction times (``nextvisit.data.histories.read_histories``, the one cut every compared model uses),
tokenized with the run's own tokenizer (one surrogate subject per history), as model windows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from nextvisit.artifacts.predictions import PREDICTION_SPLITS
from nextvisit.baselines.masked.config import MaskedModelConfig
from nextvisit.baselines.masked.windows import history_window
from nextvisit.compare import Labels
from nextvisit.data.histories import add_counts, read_histories
from nextvisit.errors import UserError
from nextvisit.model.run import read_tokenizer
from nextvisit.tokenize.store import Subject


@dataclass
class Histories:
    """The tokenized histories of a labels folder, by ``history_id``; no label values (those reach the
    model only through ``fit``'s train and tuning rows)."""

    frame: pl.DataFrame  # history_id, subject_id, prediction_time, split; sorted by history_id
    windows: list  # (tokens, days, types) per history, ``history_window``
    outputs: list[str]  # "task@horizon" of the label rows, sorted: one head logit each
    counts: dict = field(default_factory=dict)

    @property
    def n_predicted(self) -> int:
        """Histories of the splits every model scores (tuning, held_out)."""
        return int(self.frame["split"].is_in(list(PREDICTION_SPLITS)).sum())


def output_key() -> pl.Expr:
    """``task@horizon_days`` of a label row."""
    return pl.concat_str("task", pl.lit("@"), pl.col("horizon_days").cast(pl.String))


def sorted_outputs(rows: pl.DataFrame) -> list[str]:
    """The distinct ``task@horizon`` of ``rows``, by task then horizon."""
    return sorted({f"{t}@{h}" for t, h in rows.select("task", "horizon_days").unique().iter_rows()},
                  key=lambda key: (key.split("@")[0], int(key.split("@")[1])))


def tokenize_histories(run: Path, meds_dir: Path, labels: Labels, vocab_size: int) -> tuple[list[Subject | None], dict]:
    """Every history of ``labels`` cut at its prediction time (minus the task's removed input codes) and
    tokenized with the run's vocabulary: subjects by history_id (None = no event known), and the counts of
    what was cut."""
    tokenizer = read_tokenizer(run)
    if len(tokenizer.vocab) != vocab_size:
        raise UserError(f"{run}/vocab.json holds {len(tokenizer.vocab)} tokens but the model embeds {vocab_size}; "
                        "the run folder is inconsistent, re-run `nextvisit baseline masked pretrain`")
    n = labels.histories.height
    parts, counts = [], {}
    for chunk in read_histories(meds_dir, labels.histories, labels.remove_from_inputs):
        parts.append(chunk.events)
        add_counts(counts, chunk.counts)
    events = pl.concat(parts) if parts else pl.DataFrame()
    subjects: list[Subject | None] = [None] * n
    if events.height:
        surrogate = events.select(pl.col("history_id").alias("subject_id"), "time", "code", "numeric_value")
        for subject in tokenizer.subjects(surrogate):
            subjects[int(subject.subject_id)] = subject
    counts = {"after_prediction_time": counts.get("after_prediction_time", 0),
              "removed_from_inputs": counts.get("removed_from_inputs", 0), "histories": n,
              "histories_without_events": n - (events["history_id"].n_unique() if events.height else 0),
              "events_kept": events.height,
              "histories_without_visits": sum(s is None or s.n_visits == 0 for s in subjects)}
    return subjects, counts


def read_inputs(run: Path, meds_dir: Path, labels: Labels, config: MaskedModelConfig) -> Histories:
    """The ``Histories`` of ``labels`` for a model of ``config`` whose tokenizer is in ``run``."""
    subjects, counts = tokenize_histories(run, meds_dir, labels, config.vocab_size)
    splits = labels.rows.group_by("history_id").agg(pl.col("split").first())
    frame = labels.histories.join(splits, on="history_id").sort("history_id")
    days = frame["prediction_time"].dt.epoch("d").to_numpy()
    windows = [history_window(s, int(d), config) for s, d in zip(subjects, days)]
    return Histories(frame=frame, windows=windows, outputs=sorted_outputs(labels.rows), counts=counts)


def label_matrix(histories: Histories, rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Targets (float32) and the labelled mask (bool), both [n_histories, K outputs], from ``rows``."""
    column = {key: k for k, key in enumerate(histories.outputs)}
    n = histories.frame.height
    targets = np.zeros((n, len(column)), np.float32)
    labelled = np.zeros((n, len(column)), bool)
    h = rows["history_id"].to_numpy()
    k = np.array([column[key] for key in rows.select(output_key()).to_series().to_list()], dtype=np.int64)
    targets[h, k] = rows["boolean_value"].to_numpy().astype(np.float32)
    labelled[h, k] = True
    return targets, labelled
