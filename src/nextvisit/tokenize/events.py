"""The event rules shared by fitting and tokenizing, so both see the very same kept events.

Contract: ``annotate(frame, config, max_time)`` takes MEDS core columns (lazy) and adds ``day`` (days since
1970-01-01, null for static rows), ``birth_day``, ``death_day``, ``demographic`` and ``reason``: 0 for a kept
event, else ``REASON_ID`` of the first of ``DROP_REASONS`` that applies among those that need no vocabulary.
``check_future`` raises ``UserError`` naming the first event after ``max_time`` when ``future_events: error``.
``DROP_REASONS`` / ``REPLACE_REASONS`` name every way an event loses its own token; the manifest counts them.
Depends only on ``nextvisit.tokenize.config``.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from nextvisit.data import meds
from nextvisit.errors import UserError
from nextvisit.tokenize.config import TokenizerConfig

# Why an event produced no token of its own. Order matters: an event gets the first reason that applies.
DROP_REASONS = (
    "birth_record",  # MEDS_BIRTH: becomes the subject's birth day, not a token
    "excluded_prefix",  # config exclude_prefixes
    "after_max_time",  # time after config max_time, with future_events: drop
    "before_birth",  # visit day earlier than the subject's birth day
    "after_death",  # visit day later than the subject's (first) death day
    "value_out_of_range",  # lab value with z outside the outer bin edges (|z| > 10 by default)
    "subject_without_visits",  # the subject has no timed event left, so no visit to hold anything
)
# Events that still give a token, but not the one their code alone would give.
REPLACE_REASONS = (
    "unknown_code",  # token is UNK: the code (or its lab bin) is not in the vocabulary
    "value_without_stats",  # a value on a code without train lab statistics: plain code token
    "nonfinite_value",  # NaN/inf value treated as no value
)
REASON_ID = {name: i + 1 for i, name in enumerate(DROP_REASONS)}  # 0 = kept


def _starts_with_any(prefixes) -> pl.Expr:
    expr = pl.lit(False)
    for prefix in prefixes:
        expr = expr | pl.col("code").str.starts_with(prefix)
    return expr


def annotate(frame: pl.LazyFrame, config: TokenizerConfig, max_time: datetime | None) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Add ``day`` (days since 1970-01-01, null for static rows), ``birth_day``, ``death_day``,
    ``demographic`` and ``reason`` (0 = kept; else an index into DROP_REASONS + 1) for the rules that do
    not need the vocabulary. Also returns the per-subject ``birth_day, death_day`` table."""
    frame = frame.with_columns(day=pl.col("time").dt.date().cast(pl.Int32))
    life = frame.group_by("subject_id").agg(
        birth_day=pl.col("day").filter(pl.col("code") == meds.BIRTH_CODE).min(),
        death_day=pl.col("day").filter(pl.col("code") == meds.DEATH_CODE).min(),
    )
    demographic = pl.col("time").is_null() | _starts_with_any(config.demographic_prefixes)
    future = pl.lit(False)
    if max_time is not None and config.future_events == "drop":
        future = pl.col("time") > pl.lit(max_time, dtype=pl.Datetime("us"))
    reason = (
        pl.when(pl.col("code") == meds.BIRTH_CODE).then(REASON_ID["birth_record"])
        .when(_starts_with_any(config.exclude_prefixes)).then(REASON_ID["excluded_prefix"])
        .when(future.fill_null(False)).then(REASON_ID["after_max_time"])
        .when(~pl.col("demographic") & (pl.col("day") < pl.col("birth_day")).fill_null(False)).then(REASON_ID["before_birth"])
        .when(~pl.col("demographic") & (pl.col("day") > pl.col("death_day")).fill_null(False)).then(REASON_ID["after_death"])
        .otherwise(0)
        .cast(pl.UInt8)
    )
    annotated = (
        frame.join(life, on="subject_id", how="left")
        .with_columns(demographic=demographic)
        .with_columns(reason=reason)
    )
    return annotated, life


def check_future(frame: pl.DataFrame, config: TokenizerConfig, max_time: datetime | None, source: str,
                 row_column: str | None = None) -> None:
    """With ``future_events: error``, stop at the first event after ``max_time``, naming its row."""
    if max_time is None or config.future_events != "error":
        return
    late = frame.get_column("time") > max_time
    if late.any():
        index = int(late.arg_true()[0])
        row = int(frame.get_column(row_column)[index]) if row_column else index
        raise UserError(
            f"{source}: row {row} (subject {frame['subject_id'][index]}) has time {frame['time'][index]}, after "
            f"max_time {max_time:%Y-%m-%d %H:%M}; if the dates are shifted (as in MIMIC), tokenize with "
            "`--max-time none` or `--max-time <a date after the data's end>` (or set max_time in the tokenizer "
            "config), or set future_events: drop to count and drop them"
        )

