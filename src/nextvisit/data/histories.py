"""The one cut of MEDS history at a prediction time, used by every model that is compared.

A *history* is one distinct (subject_id, prediction_time) of the labels; rows for several horizons of the
same landmark share it. An event is known at the prediction time iff its time is null (static rows) or
``time <= prediction_time`` (events at exactly the prediction time are known: the same rule as
``nextvisit label``). Codes of the task's ``remove_from_inputs`` set are dropped. Nothing after the
prediction time reaches any model: the zero-shot forecast, the masked baseline and the count baseline all
read their inputs through ``read_histories``.

``read_histories`` reads the MEDS shards one at a time: for each shard, in chunks of at most
``histories_per_chunk`` histories, the chunk's subjects' events (only the row groups holding them, in a shard
sorted by subject), cut per history (a subject found in two shards is an error:
MEDS shards hold whole subjects, and each history is cut from one). Histories that do not fit the data are an
error when it is called, before any work (``check_histories_in_data``): a label subject the data does not
hold, a prediction time before the subject's ``MEDS_BIRTH``, or at or after its ``MEDS_DEATH`` (``nextvisit
label`` never makes such a landmark). Every event not passed on is counted (``after_prediction_time``,
``removed_from_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from nextvisit.data.meds import BIRTH_CODE, DEATH_CODE, data_files
from nextvisit.errors import UserError

HISTORY_COLUMNS = ("history_id", "subject_id", "prediction_time")
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")


def history_table(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per distinct (subject_id, prediction_time) of ``rows``: ``history_id`` (0.., by subject then
    time), ``subject_id``, ``prediction_time``."""
    return (
        rows.select("subject_id", "prediction_time").unique().sort("subject_id", "prediction_time")
        .with_row_index("history_id").with_columns(pl.col("history_id").cast(pl.Int64))
    )


def cut(events: pl.DataFrame, histories: pl.DataFrame, remove_from_inputs=None) -> tuple[pl.DataFrame, dict]:
    """The events of ``events`` (MEDS core columns) known at each history's prediction time, minus
    ``remove_from_inputs`` (a ``CodeSet`` or None): ``history_id, subject_id, prediction_time, time, code,
    numeric_value`` sorted by history and time (static rows first), and the counts of what was cut."""
    joined = events.join(histories.select(HISTORY_COLUMNS), on="subject_id", how="inner")
    known = pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time"))
    removed = remove_from_inputs.expr() if remove_from_inputs else pl.lit(False)
    after, dropped = joined.select((~known).sum().alias("after"), (known & removed).sum().alias("removed")).row(0)
    kept = (
        joined.filter(known & ~removed)
        .select(*HISTORY_COLUMNS, "time", "code", "numeric_value")
        .sort("history_id", "time", nulls_last=False, maintain_order=True)
    )
    return kept, {"after_prediction_time": int(after), "removed_from_inputs": int(dropped)}


def check_histories_in_data(meds_dir: Path, histories: pl.DataFrame) -> None:
    """Fail before any work when ``histories`` (``subject_id, prediction_time``) do not fit the data: a subject
    it does not hold, a prediction time before the subject's birth, or at or after its death (reads three
    columns of the label subjects' rows, one shard at a time: memory bounded by a shard, not the dataset)."""
    ids = histories["subject_id"].unique()
    # a subject's birth and death are the earliest of its shards' (one shard per subject in MEDS; min is exact
    # either way)
    life = (
        pl.concat([_life_in_shard(path, ids) for path in data_files(meds_dir)])
        .group_by("subject_id").agg(pl.col("birth").min(), pl.col("death").min())
    )
    missing = set(ids.to_list()) - set(life["subject_id"].to_list())
    if missing:
        raise UserError(f"{meds_dir}: subject {min(missing)} of the labels is not in the data "
                        f"({len(missing)} such subject(s)); give the MEDS dataset the labels were made from")
    times = histories.select("subject_id", "prediction_time").join(life, on="subject_id").sort("subject_id", "prediction_time")
    for wrong, column, relation in ((pl.col("prediction_time") < pl.col("birth"), "birth", "before its birth"),
                                    (pl.col("prediction_time") >= pl.col("death"), "death", "at or after its death")):
        bad = times.filter(wrong.fill_null(False))
        if bad.height:
            subject, time, event = bad.select("subject_id", "prediction_time", column).row(0)
            raise UserError(f"{meds_dir}: subject {subject}'s prediction_time {time} is {relation} ({event}) "
                            f"({bad.height} such prediction time(s)); check the labels' prediction_time, or give the "
                            "MEDS dataset the labels were made from")


def _life_in_shard(path: Path, ids: pl.Series) -> pl.DataFrame:
    """``subject_id, birth, death`` (the earliest ``MEDS_BIRTH`` / ``MEDS_DEATH`` time, null when none) of the
    subjects of ``ids`` that the shard at ``path`` holds, streamed: only these three columns of one shard."""
    return (
        pl.scan_parquet(path).select("subject_id", "time", "code")
        .filter(pl.col("subject_id").is_in(ids.implode()))
        .group_by("subject_id")
        .agg(birth=pl.col("time").filter(pl.col("code") == BIRTH_CODE).min().cast(pl.Datetime("us")),
             death=pl.col("time").filter(pl.col("code") == DEATH_CODE).min().cast(pl.Datetime("us")))
        .collect(engine="streaming")
    )


@dataclass
class HistoryChunk:
    source: Path  # the MEDS shard
    histories: pl.DataFrame  # HISTORY_COLUMNS, sorted by subject and time
    events: pl.DataFrame  # the cut (``cut``'s columns)
    counts: dict  # events not passed on, by reason


def read_histories(meds_dir: Path, histories: pl.DataFrame, remove_from_inputs=None,
                   histories_per_chunk: int | None = None) -> Iterator[HistoryChunk]:
    """The cut of every history of ``histories`` (``history_table``), shard by shard, in chunks; the histories
    are checked against the data when it is called (``check_histories_in_data``), the shards read as it is
    iterated."""
    check_histories_in_data(meds_dir, histories)
    return _chunks(meds_dir, histories, remove_from_inputs, histories_per_chunk)


def _chunks(meds_dir: Path, histories: pl.DataFrame, remove_from_inputs,
            histories_per_chunk: int | None) -> Iterator[HistoryChunk]:
    ids = histories["subject_id"].unique().sort()
    seen: set[int] = set()
    for path in data_files(meds_dir):
        here = (
            pl.scan_parquet(path).select("subject_id").filter(pl.col("subject_id").is_in(ids.implode())).unique()
            .collect(engine="streaming")["subject_id"]
        )
        if here.len() == 0:
            continue
        # a history is cut from one shard: a subject split over two would be cut twice, each time in part
        again = seen.intersection(here.to_list())
        if again:
            raise UserError(f"{path}: subject {min(again)} also appears in an earlier shard; MEDS shards must hold "
                            "whole subjects (each history is cut from one shard)")
        seen.update(here.to_list())
        shard = histories.filter(pl.col("subject_id").is_in(here.implode()))
        size = histories_per_chunk or max(shard.height, 1)
        for begin in range(0, shard.height, size):
            chunk = shard.slice(begin, size)
            kept, counts = cut(_events_of(path, chunk["subject_id"].unique()), chunk, remove_from_inputs)
            yield HistoryChunk(source=path, histories=chunk, events=kept, counts=counts)


def _events_of(path: Path, subjects: pl.Series) -> pl.DataFrame:
    """The ``EVENT_COLUMNS`` rows of ``subjects`` in the shard at ``path``, by subject, each subject's in file
    order. The range filter comes first so that the row groups' subject_id statistics skip the rest of a
    shard sorted by subject: memory follows the chunk, not the shard."""
    return (
        pl.scan_parquet(path).select(EVENT_COLUMNS)
        .filter(pl.col("subject_id").is_between(subjects.min(), subjects.max()))
        .filter(pl.col("subject_id").is_in(subjects.implode()))
        .collect()
        .sort("subject_id", maintain_order=True)
    )


def add_counts(total: dict, part: dict) -> dict:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value
    return total
