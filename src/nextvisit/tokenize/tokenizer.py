"""MEDS events to visit-structured tokens (METHOD.md §1-3), and the token store that `nextvisit tokenize`
writes.

One code path turns events into tokens: ``Tokenizer.tokenize_frame``. The command line runs it shard by
shard (``tokenize_dataset``); forecasting and the baselines run it on in-memory histories through
``Tokenizer.subjects``. What it does, per subject:

- a visit is one calendar day of timed events; ``MEDS_BIRTH`` gives the birth day and is not a visit;
  ``MEDS_DEATH`` is an ordinary code token on its day (a valid next-visit target);
- every event becomes one token: its code, or for a value-carrying code with train statistics the fused lab
  token ``CODE|z[a,b)`` (or ``CODE|q3/7`` with quantile bins); unknown codes become ``UNK``;
- within a visit: the age-bucket token, the demographics (first visit only), then the clinical tokens, each
  once, in id order;
- dropped events are counted by reason, so that per split
  ``events_in = tokens_from_events + duplicates_collapsed + sum(dropped)``.

The vocabulary and the lab statistics are fit on the ``train`` split only (``fit_statistics``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import yaml

from nextvisit.data import meds
from nextvisit.config import merge, read_yaml
from nextvisit.errors import UserError
from nextvisit.tokenize.store import (
    NO_DAY,
    SPECIAL_TOKENS,
    SPLITS,
    UNK,
    SplitWriter,
    Subject,
    TokenStore,
    Vocabulary,
    write_store_info,
)

AGE_PREFIX = "AGE//"
UNKNOWN_AGE_TOKEN = "AGE//unknown"
DAYS_PER_YEAR = 365.25

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
_REASON_ID = {name: i + 1 for i, name in enumerate(DROP_REASONS)}  # 0 = kept
_KEY_BITS = 63  # events sort on one int64 key (subject, day, kind, token) when their ranges fit in it
# Without --workers, one worker process per this many events (up to the CPUs): starting a process (about
# 0.4 CPU-seconds of imports) costs more than it saves on smaller datasets.
ROWS_PER_WORKER = 2_000_000


@dataclass
class TokenizerConfig:
    """Every number of the tokenizer. Defaults follow METHOD.md §2; ``docs/tokenizer.md`` explains each."""

    min_count: int = 10  # train events a token needs to enter the vocabulary
    lab_binning: str = "zscore"  # "zscore" (paper) or "quantile"
    z_edges: tuple = (-10.0, -3.0, -1.0, -0.5, 0.5, 1.0, 3.0, 10.0)  # paper: 7 bins; outside -> dropped
    quantile_bins: int = 7  # lab_binning: quantile; edges from train quantiles of z within the outer z edges
    quantile_resolution: float = 0.01  # z-width of the train histogram the quantile edges are read from
    # paper: 1-5, 5-10, 10-20, ..., 50-60, then 5-year buckets to 100, then 100+ (0-1 for infants)
    age_edges_years: tuple = (0, 1, 5, 10, 20, 30, 40, 50, 60, 65, 70, 75, 80, 85, 90, 95, 100)
    demographic_prefixes: tuple = ("GENDER//", "RACE//", "ETHNICITY//")  # plus every static (null-time) row
    exclude_prefixes: tuple = ()  # codes dropped from the inputs (e.g. amnesia codes for dementia tasks)
    always_include: tuple = (meds.DEATH_CODE,)  # codes in the vocabulary whatever their train count
    max_time: str | None = "now"  # events after this are in the future; "now", an ISO date, or null (no check)
    future_events: str = "error"  # "error" (stop and name the row) or "drop" (count as after_max_time)
    chunk_rows: int = 250_000  # rows read at a time from a shard (bounds memory per worker)

    def validate(self) -> "TokenizerConfig":
        if self.min_count < 1:
            raise UserError(f"tokenizer min_count must be at least 1, got {self.min_count}")
        if self.lab_binning not in ("zscore", "quantile"):
            raise UserError(f"tokenizer lab_binning is {self.lab_binning!r}; expected 'zscore' or 'quantile'")
        edges = [float(e) for e in self.z_edges]
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise UserError(f"tokenizer z_edges must increase strictly, got {list(self.z_edges)}")
        if self.quantile_bins < 2 or self.quantile_resolution <= 0:
            raise UserError("tokenizer quantile_bins must be at least 2 and quantile_resolution positive")
        ages = list(self.age_edges_years)
        if len(ages) < 2 or ages[0] != 0 or any(b <= a for a, b in zip(ages, ages[1:])):
            raise UserError(f"tokenizer age_edges_years must start at 0 and increase, got {ages}")
        if self.future_events not in ("error", "drop"):
            raise UserError(f"tokenizer future_events is {self.future_events!r}; expected 'error' or 'drop'")
        if self.chunk_rows < 1:
            raise UserError("tokenizer chunk_rows must be positive")
        self.max_time_value()
        return self

    def max_time_value(self) -> datetime | None:
        if self.max_time is None:
            return None
        if self.max_time == "now":
            return datetime.now(timezone.utc).replace(tzinfo=None)
        try:
            return datetime.fromisoformat(str(self.max_time))
        except ValueError:
            raise UserError(f"tokenizer max_time {self.max_time!r} is not 'now', null or an ISO date") from None

    def resolved(self) -> "TokenizerConfig":
        """A copy with ``max_time: now`` fixed to the current time, so re-tokenizing later (forecast) applies
        the very same cut-off as the store."""
        result = TokenizerConfig(**asdict(self))
        if result.max_time == "now":
            result.max_time = self.max_time_value().isoformat(timespec="seconds")
        return result

    def bin_labels(self) -> list[str]:
        """Lab bin labels, in bin order.

        >>> TokenizerConfig().bin_labels()[:2]
        ['z[-10,-3)', 'z[-3,-1)']
        """
        if self.lab_binning == "zscore":
            edges = [float(e) for e in self.z_edges]
            return [f"z[{a:g},{b:g})" for a, b in zip(edges, edges[1:])]
        return [f"q{i + 1}/{self.quantile_bins}" for i in range(self.quantile_bins)]

    def age_tokens(self) -> list[str]:
        """Age-bucket tokens in bucket order, then the token for an unknown birth day.

        >>> TokenizerConfig().age_tokens()[8:10], TokenizerConfig().age_tokens()[-2:]
        (['AGE//60-65', 'AGE//65-70'], ['AGE//100+', 'AGE//unknown'])
        """
        edges = [int(e) if float(e).is_integer() else float(e) for e in self.age_edges_years]
        tokens = [f"{AGE_PREFIX}{a}-{b}" for a, b in zip(edges, edges[1:])]
        return tokens + [f"{AGE_PREFIX}{edges[-1]}+", UNKNOWN_AGE_TOKEN]

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokenizer config", base: "TokenizerConfig | None" = None) -> "TokenizerConfig":
        """``base`` (default: the defaults) with the fields of ``data`` applied; unknown fields are errors."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping of tokenizer fields")
        data = dict(data.get("tokenizer", data))  # accept a file with or without a `tokenizer:` section
        return merge(base or cls(), data, source).validate()

    @classmethod
    def load(cls, path: Path, base: "TokenizerConfig | None" = None) -> "TokenizerConfig":
        return cls.from_dict(read_yaml(path), source=str(path), base=base)


# Fields that define what a token means; a store's vocabulary can only be reused with the same values.
VOCABULARY_FIELDS = ("lab_binning", "z_edges", "quantile_bins", "age_edges_years", "demographic_prefixes")


# -- tokenized output of one frame ------------------------------------------------------------------------
@dataclass
class TokenBatch:
    """Tokens of several subjects, in subject_id order. Subjects with no visit have ``visit_counts == 0``."""

    subject_ids: np.ndarray  # int64 [S]
    birth_days: np.ndarray  # int32 [S], NO_DAY if unknown
    visit_counts: np.ndarray  # int64 [S]
    visit_days: np.ndarray  # int32 [V]
    visit_lengths: np.ndarray  # int64 [V]
    tokens: np.ndarray  # int32 [N]
    counts: dict = field(default_factory=dict)

    def subjects(self) -> Iterator[Subject]:
        visit_ends = np.cumsum(self.visit_counts)
        token_offsets = np.concatenate([[0], np.cumsum(self.visit_lengths)]).astype(np.int64)
        first_visit = 0
        for i, subject_id in enumerate(self.subject_ids.tolist()):
            last_visit = int(visit_ends[i])
            offsets = token_offsets[first_visit : last_visit + 1]
            yield Subject(
                subject_id=subject_id,
                birth_day=int(self.birth_days[i]),
                visit_days=self.visit_days[first_visit:last_visit],
                visit_offsets=offsets - offsets[0],
                tokens=self.tokens[offsets[0] : offsets[-1]],
            )
            first_visit = last_visit

    def write(self, writer: SplitWriter) -> None:
        """Append the subjects that have at least one visit."""
        keep = self.visit_counts > 0
        writer.append_batch(self.subject_ids[keep], self.birth_days[keep], self.visit_counts[keep],
                            self.visit_days, self.visit_lengths, self.tokens)


def empty_counts() -> dict:
    return {
        "events_in": 0,
        "tokens_from_events": 0,
        "duplicates_collapsed": 0,
        "dropped": {reason: 0 for reason in DROP_REASONS},
        "replaced": {reason: 0 for reason in REPLACE_REASONS},
        "age_tokens": 0,
        "tokens_out": 0,
        "subjects_in": 0,
        "subjects_out": 0,
        "subjects_without_visits": 0,
        "visits": 0,
    }


def add_counts(total: dict, part: dict) -> dict:
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def balance_gap(counts: dict) -> int:
    """``events_in - (tokens_from_events + duplicates_collapsed + dropped)``; 0 when nothing was lost."""
    return counts["events_in"] - counts["tokens_from_events"] - counts["duplicates_collapsed"] - sum(counts["dropped"].values())


# -- the shared event annotation (used by fitting and by tokenizing) ---------------------------------------
def _starts_with_any(prefixes) -> pl.Expr:
    expr = pl.lit(False)
    for prefix in prefixes:
        expr = expr | pl.col("code").str.starts_with(prefix)
    return expr


def _annotate(frame: pl.LazyFrame, config: TokenizerConfig, max_time: datetime | None) -> tuple[pl.LazyFrame, pl.LazyFrame]:
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
        pl.when(pl.col("code") == meds.BIRTH_CODE).then(_REASON_ID["birth_record"])
        .when(_starts_with_any(config.exclude_prefixes)).then(_REASON_ID["excluded_prefix"])
        .when(future.fill_null(False)).then(_REASON_ID["after_max_time"])
        .when(~pl.col("demographic") & (pl.col("day") < pl.col("birth_day")).fill_null(False)).then(_REASON_ID["before_birth"])
        .when(~pl.col("demographic") & (pl.col("day") > pl.col("death_day")).fill_null(False)).then(_REASON_ID["after_death"])
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
            f"max_time {max_time:%Y-%m-%d %H:%M}; if the dates are shifted (as in MIMIC), set max_time in the "
            "tokenizer config to the data's end or null, or set future_events: drop to count and drop them"
        )


# -- fitting: counts and lab statistics on train -----------------------------------------------------------
_STAT_SCHEMA = {"code": pl.String, "n_events": pl.Int64, "n_values": pl.Int64, "mean": pl.Float64,
                "m2": pl.Float64, "demographic": pl.Boolean}


def code_statistics(events: pl.DataFrame, config: TokenizerConfig, max_time: datetime | None) -> pl.DataFrame:
    """Per code over the kept events of ``events``: event count, count / mean / sum of squared deviations
    (``m2``) of the finite values, and whether it is a demographic. Mergeable with ``merge_statistics``."""
    kept = _annotate(events.lazy(), config, max_time)[0].filter(pl.col("reason") == 0)
    value = pl.col("numeric_value").cast(pl.Float64)
    usable = pl.when(value.is_finite() & ~pl.col("demographic")).then(value)  # null otherwise
    stats = kept.with_columns(usable=usable).group_by("code").agg(
        n_events=pl.len().cast(pl.Int64),
        n_values=pl.col("usable").count().cast(pl.Int64),
        mean=pl.col("usable").mean(),
        m2=pl.col("usable").var(ddof=0) * pl.col("usable").count(),
        demographic=pl.col("demographic").any(),
    )
    return stats.collect().cast(_STAT_SCHEMA)


def merge_statistics(parts: list[pl.DataFrame]) -> pl.DataFrame:
    """Combine per-chunk ``code_statistics`` exactly (parallel mean/variance update)."""
    if not parts:
        return pl.DataFrame(schema=_STAT_SCHEMA)
    frame = pl.concat(parts).with_columns(pl.col("mean").fill_null(0.0), pl.col("m2").fill_null(0.0))
    total = frame.group_by("code").agg(
        pl.col("n_events").sum(),
        pl.col("n_values").sum().alias("n_total"),
        (pl.col("mean") * pl.col("n_values")).sum().alias("weighted"),
        pl.col("demographic").any(),
    ).with_columns(mean=pl.when(pl.col("n_total") > 0).then(pl.col("weighted") / pl.col("n_total")))
    frame = frame.join(total.select("code", pl.col("mean").alias("grand_mean")), on="code")
    m2 = frame.group_by("code").agg(
        m2=(pl.col("m2") + pl.col("n_values") * (pl.col("mean") - pl.col("grand_mean").fill_null(0.0)) ** 2).sum()
    )
    return (
        total.join(m2, on="code")
        .select("code", "n_events", pl.col("n_total").alias("n_values"), "mean", "m2", "demographic")
        .sort("code")
        .cast(_STAT_SCHEMA)
    )


def lab_statistics(stats: pl.DataFrame, config: TokenizerConfig) -> pl.DataFrame:
    """Lab codes from merged statistics: non-demographic codes with at least ``min_count`` (and 2) finite
    train values and a positive SD. Columns ``code, count, mean, std`` (sample SD)."""
    need = max(config.min_count, 2)
    labs = stats.filter(~pl.col("demographic") & (pl.col("n_values") >= need)).with_columns(
        std=(pl.col("m2") / (pl.col("n_values") - 1)).sqrt()
    )
    labs = labs.filter(pl.col("std").is_finite() & (pl.col("std") > 0))
    return labs.select("code", pl.col("n_values").alias("count"), "mean", "std").sort("code")


def fit_vocabulary(stats: pl.DataFrame, labs: pl.DataFrame, config: TokenizerConfig) -> Vocabulary:
    """Specials, age buckets, demographics, then clinical codes sorted by code, each followed by its lab bins.

    A code's plain token needs ``min_count`` train events without a usable value (or with a value when the
    code has no lab statistics); a lab code enters with all its bins."""
    lab_codes = set(labs.get_column("code").to_list())
    tokens = list(SPECIAL_TOKENS)
    kinds = ["special"] * len(tokens)
    for token in config.age_tokens():
        tokens.append(token)
        kinds.append("age")
    always = set(config.always_include)
    rows = stats.with_columns(
        plain_count=pl.col("n_events") - pl.when(pl.col("code").is_in(list(lab_codes))).then(pl.col("n_values")).otherwise(0)
    ).sort("code")
    for code, plain_count in rows.filter(pl.col("demographic")).select("code", "plain_count").iter_rows():
        if plain_count >= config.min_count or code in always:
            tokens.append(code)
            kinds.append("demographic")
    clinical = {code: count for code, count in rows.filter(~pl.col("demographic")).select("code", "plain_count").iter_rows()}
    for code in sorted(set(clinical) | (always - set(tokens))):
        if clinical.get(code, 0) >= config.min_count or code in always:
            tokens.append(code)
            kinds.append("code")
        if code in lab_codes:
            for label in config.bin_labels():
                tokens.append(f"{code}|{label}")
                kinds.append("lab")
    return Vocabulary(tokens=tokens, kinds=kinds)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each of ``ids`` in ``sorted_ids`` (which holds them all); linear when ``ids`` is sorted, as
    in a MEDS shard."""
    if len(ids) and np.all(ids[1:] >= ids[:-1]):
        return np.cumsum(np.concatenate([[0], ids[1:] != ids[:-1]])) + np.searchsorted(sorted_ids, ids[0])
    return np.searchsorted(sorted_ids, ids)


# -- the tokenizer ----------------------------------------------------------------------------------------
class Tokenizer:
    """A fitted vocabulary plus lab statistics plus the config: turns MEDS events into tokens.

    ``Tokenizer.load(STORE_OR_RUN)`` reads ``vocab.json``, ``lab_stats.parquet`` and ``tokenizer.yaml``
    from a token store or a model run folder."""

    def __init__(self, config: TokenizerConfig, vocab: Vocabulary, lab_stats: pl.DataFrame):
        self.config = config.validate()
        self.vocab = vocab
        self.lab_stats = lab_stats
        self.max_time = config.max_time_value()
        self.last_counts: dict = {}
        self._build_tables()

    # tables that turn a code into token ids with array lookups
    def _build_tables(self) -> None:
        labels = self.config.bin_labels()
        label_index = {label: i for i, label in enumerate(labels)}
        codes: dict[str, int] = {}
        plain: list[int] = []
        lab_ids: list[list[int]] = []

        def row_of(code: str) -> int:
            if code not in codes:
                codes[code] = len(codes)
                plain.append(UNK)
                lab_ids.append([UNK] * len(labels))
            return codes[code]

        for token_id, (token, kind) in enumerate(zip(self.vocab.tokens, self.vocab.kinds)):
            if kind in ("code", "demographic"):
                plain[row_of(token)] = token_id
            elif kind == "lab":
                code, _, label = token.partition("|")
                if label in label_index:
                    lab_ids[row_of(code)][label_index[label]] = token_id
        n_codes = len(codes)
        self._code_frame = pl.DataFrame(
            {"code": list(codes), "code_row": np.arange(n_codes, dtype=np.int32)},
            schema={"code": pl.String, "code_row": pl.Int32},
        )
        self._plain_id = np.asarray(plain, dtype=np.int32).reshape(n_codes)
        self._lab_ids = np.asarray(lab_ids, dtype=np.int32).reshape(n_codes, len(labels))
        self._is_lab = np.zeros(n_codes, dtype=bool)
        self._mean = np.zeros(n_codes)
        self._std = np.ones(n_codes)
        n_inner = len(labels) - 1
        self._inner_edges = np.zeros((n_codes, n_inner))
        z_edges = np.asarray(self.config.z_edges, dtype=float)
        self._z_range = (z_edges[0], z_edges[-1])
        stats = self.lab_stats
        for row in stats.iter_rows(named=True):
            if row["code"] not in codes:
                continue
            i = codes[row["code"]]
            self._is_lab[i] = True
            self._mean[i] = row["mean"]
            self._std[i] = row["std"]
            if self.config.lab_binning == "quantile":
                self._inner_edges[i] = np.asarray(row["edges"], dtype=float)
        self._is_lab &= (self._lab_ids != UNK).any(axis=1)
        age_tokens = self.config.age_tokens()
        self._age_ids = np.asarray([self.vocab.id(t) for t in age_tokens], dtype=np.int32)
        self._age_edges = np.asarray(self.config.age_edges_years, dtype=float)

    # -- loading and saving
    @classmethod
    def load(cls, path: Path) -> "Tokenizer":
        path = Path(path)
        needed = ["vocab.json", "lab_stats.parquet", "tokenizer.yaml"]
        missing = [name for name in needed if not (path / name).exists()]
        if missing:
            raise UserError(f"{path}: {', '.join(missing)} missing; expected a token store (`nextvisit tokenize`) "
                            "or a model run folder (`nextvisit pretrain`)")
        config = TokenizerConfig.load(path / "tokenizer.yaml")
        vocab = Vocabulary.load(path / "vocab.json")
        lab_stats = pl.read_parquet(path / "lab_stats.parquet")
        return cls(config, vocab, lab_stats)

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.vocab.save(folder / "vocab.json")
        self.lab_stats.write_parquet(folder / "lab_stats.parquet")
        (folder / "tokenizer.yaml").write_text(yaml.safe_dump({"tokenizer": self.config.to_dict()}, sort_keys=False))

    # -- the one tokenizing path
    def subjects(self, events: pl.DataFrame) -> Iterator[Subject]:
        """Tokenize in-memory events (any row order) and return an iterator of ``Subject`` in subject_id
        order, one per subject present in ``events``; a subject whose events leave no visit (e.g. only
        static rows) comes with zero visits. Counts of the call are in ``self.last_counts``."""
        frame = meds.normalize_events(events, "events frame")
        meds.check_events(frame, "events frame", require_sorted=False)
        check_future(frame, self.config, self.max_time, "events frame")
        batch = self.tokenize_frame(frame)
        self.last_counts = batch.counts
        return batch.subjects()

    def tokenize_frame(self, events: pl.DataFrame) -> TokenBatch:
        """Tokens of ``events`` (MEDS core columns, normalized dtypes, any row order; whole subjects)."""
        return self.tokenize_groups(events, np.zeros(events.height, dtype=np.int8), 1)[0]

    def tokenize_groups(self, events: pl.DataFrame, groups: np.ndarray, n_groups: int) -> list[TokenBatch]:
        """Tokens of ``events`` in one pass, returned as one ``TokenBatch`` (with its own counts) per group;
        ``groups`` [rows] gives each row's group (e.g. its split; constant within a subject)."""
        annotated, life = _annotate(
            events.lazy().select(meds.CORE_COLUMNS).with_columns(group=pl.Series(groups, dtype=pl.Int8)),
            self.config, self.max_time)
        frame, life = pl.collect_all([
            annotated.join(self._code_frame.lazy(), on="code", how="left").select(
                "subject_id", "day", "demographic", "reason", "code_row", "group",
                pl.col("numeric_value").is_null().alias("value_null"), "numeric_value"),
            life.sort("subject_id"),
        ])
        subject_ids = life.get_column("subject_id").to_numpy()
        birth = life.get_column("birth_day")
        birth_days = birth.fill_null(NO_DAY).to_numpy().astype(np.int32)
        birth_known = birth.is_not_null().to_numpy()

        # token ids: lab token for a finite value on a lab code, else the code's plain token, else UNK
        reason = frame.get_column("reason").to_numpy().copy()
        demographic = frame.get_column("demographic").to_numpy()
        known = frame.get_column("code_row").is_not_null().to_numpy()
        code_row = frame.get_column("code_row").fill_null(0).to_numpy()
        value = frame.get_column("numeric_value").cast(pl.Float64).fill_null(np.nan).to_numpy()
        finite = np.isfinite(value)
        nonfinite = ~frame.get_column("value_null").to_numpy() & ~finite & ~demographic
        lab = known & finite & ~demographic & self._is_lab[code_row]
        token = np.where(known, self._plain_id[code_row], UNK).astype(np.int64)
        lab_rows = np.flatnonzero(lab)
        if lab_rows.size:
            rows = code_row[lab_rows]
            z = (value[lab_rows] - self._mean[rows]) / self._std[rows]
            low, high = self._z_range
            out_of_range = (z < low) | (z > high)
            reason[lab_rows[out_of_range & (reason[lab_rows] == 0)]] = _REASON_ID["value_out_of_range"]
            if self.config.lab_binning == "zscore":
                bins = np.searchsorted(np.asarray(self.config.z_edges, dtype=float)[1:-1], z, side="right")
            else:
                bins = (z[:, None] >= self._inner_edges[rows]).sum(axis=1)
            token[lab_rows] = self._lab_ids[rows, bins]
        replaced = (
            (token == UNK).astype(np.uint8)
            | ((known & finite & ~demographic & ~lab).astype(np.uint8) << 1)
            | (nonfinite.astype(np.uint8) << 2)
        )

        # kept events; a subject with no timed event left has no visit to hold its demographics
        kept = reason == 0
        subject_row = _positions(subject_ids, frame.get_column("subject_id").to_numpy())
        row_group = frame.get_column("group").to_numpy().astype(np.int64)
        subject_group = np.zeros(len(subject_ids), dtype=np.int64)
        subject_group[subject_row] = row_group
        has_visit = np.zeros(len(subject_ids), dtype=bool)
        has_visit[subject_row[kept & ~demographic]] = True
        orphan = kept & ~has_visit[subject_row]
        reason = np.where(orphan, _REASON_ID["subject_without_visits"], reason)
        kept &= ~orphan

        def per_group(values: np.ndarray, weights=None) -> np.ndarray:
            return np.bincount(values, weights=weights, minlength=n_groups).astype(np.int64)

        counts = [empty_counts() for _ in range(n_groups)]
        events_in = per_group(row_group)
        reason_counts = np.bincount(row_group * (len(DROP_REASONS) + 1) + reason,
                                    minlength=n_groups * (len(DROP_REASONS) + 1)).reshape(n_groups, -1)
        flags, kept_group = replaced[kept], row_group[kept]
        for g, c in enumerate(counts):
            c["events_in"] = int(events_in[g])
            for name, index in _REASON_ID.items():
                c["dropped"][name] = int(reason_counts[g, index])
        for bit, name in enumerate(REPLACE_REASONS):
            flagged = per_group(kept_group[((flags >> bit) & 1).astype(bool)])
            for g, c in enumerate(counts):
                c["replaced"][name] = int(flagged[g])
        kept_per_group = per_group(kept_group)

        # one sortable key per event: subject, day (demographics first, day 0), demographic-before-clinical, token
        row = subject_row[kept]
        is_clinical = ~demographic[kept]
        day = frame.get_column("day").fill_null(0).to_numpy()[kept]
        first_day = int(day[is_clinical].min()) if is_clinical.any() else 0
        day_key = np.where(is_clinical, day.astype(np.int64) - first_day + 1, 0)
        token = token[kept]
        widths = [max(1, int(x).bit_length()) for x in (len(subject_ids), day_key.max(initial=0), len(self.vocab))]
        if sum(widths) + 1 <= _KEY_BITS:
            shift_day, shift_rank = widths[2] + 1, widths[2]
            key = (row.astype(np.int64) << (shift_day + widths[1])) | (day_key << shift_day) \
                | (is_clinical.astype(np.int64) << shift_rank) | token
            key = np.sort(key, kind="stable")
            key = key[np.concatenate([[True], key[1:] != key[:-1]])] if len(key) else key
            row = key >> (shift_day + widths[1])
            day_key = (key >> shift_day) & ((1 << widths[1]) - 1)
            token = key & ((1 << widths[2]) - 1)
        else:  # a frame too wide for one 64-bit key: sort by columns
            order = np.lexsort((token, is_clinical, day_key, row))
            row, day_key, token, is_clinical = row[order], day_key[order], token[order], is_clinical[order]
            first = np.concatenate([[True], (row[1:] != row[:-1]) | (day_key[1:] != day_key[:-1])
                                    | (token[1:] != token[:-1]) | (is_clinical[1:] != is_clinical[:-1])]) if len(row) else row.astype(bool)
            row, day_key, token = row[first], day_key[first], token[first]

        # demographics (day key 0) join their subject's first visit: the next clinical row's day
        if not np.all(day_key > 0):
            index = np.where(day_key > 0, np.arange(len(day_key)), len(day_key))
            following = np.minimum.accumulate(index[::-1])[::-1]  # the next clinical row (same subject: sorted)
            day_key = day_key[following]
        visit_days = (day_key + first_day - 1).astype(np.int32)
        n = len(token)
        starts = np.flatnonzero(np.concatenate([[True], (row[1:] != row[:-1]) | (visit_days[1:] != visit_days[:-1])])) if n else np.zeros(0, np.int64)
        visit_subject = row[starts]
        visit_day = visit_days[starts]

        # the age-bucket token opens every visit
        age_years = (visit_day - birth_days[visit_subject]) / DAYS_PER_YEAR
        bucket = np.clip(np.searchsorted(self._age_edges, age_years, side="right") - 1, 0, len(self._age_edges) - 1)
        bucket = np.where(birth_known[visit_subject], bucket, len(self._age_edges))
        tokens = np.insert(token.astype(np.int32), starts, self._age_ids[bucket])
        visit_lengths = np.diff(np.concatenate([starts, [n]])).astype(np.int64) + 1
        visit_counts = np.bincount(visit_subject, minlength=len(subject_ids)).astype(np.int64)

        # one batch per group; every array keeps subject order
        tokens_from_events = per_group(subject_group[row])
        visit_group = subject_group[visit_subject]
        token_group = np.repeat(visit_group, visit_lengths)
        batches = []
        for g, c in enumerate(counts):
            in_subjects, in_visits = subject_group == g, visit_group == g
            c["tokens_from_events"] = int(tokens_from_events[g])
            c["duplicates_collapsed"] = int(kept_per_group[g] - tokens_from_events[g])
            c["age_tokens"] = c["visits"] = int(in_visits.sum())
            c["subjects_in"] = int(in_subjects.sum())
            c["subjects_out"] = int((in_subjects & (visit_counts > 0)).sum())
            c["subjects_without_visits"] = c["subjects_in"] - c["subjects_out"]
            if n_groups == 1:
                group_tokens = tokens
                group_visits = slice(None)
            else:
                group_tokens = tokens[token_group == g]
                group_visits = in_visits
            c["tokens_out"] = len(group_tokens)
            batches.append(TokenBatch(
                subject_ids[in_subjects].astype(np.int64), birth_days[in_subjects], visit_counts[in_subjects],
                visit_day[group_visits].astype(np.int32), visit_lengths[group_visits], group_tokens, c,
            ))
        return batches

    # -- fitting
    @classmethod
    def fit(cls, train_events: pl.DataFrame, config: TokenizerConfig | None = None) -> "Tokenizer":
        """Fit vocabulary and lab statistics on in-memory train events (tests, small cohorts). The command
        line fits the same way, shard by shard (``fit_statistics``)."""
        config = (config or TokenizerConfig()).validate().resolved()
        frame = meds.normalize_events(train_events, "train events")
        max_time = config.max_time_value()
        stats = merge_statistics([code_statistics(frame, config, max_time)])
        labs = lab_statistics(stats, config)
        if config.lab_binning == "quantile":
            labs = with_quantile_edges(labs, [z_histogram(frame, labs, config, max_time)], config)
        return cls.from_statistics(stats, labs, config)

    @classmethod
    def from_statistics(cls, stats: pl.DataFrame, labs: pl.DataFrame, config: TokenizerConfig) -> "Tokenizer":
        if config.lab_binning == "zscore":
            inner = [float(e) for e in config.z_edges[1:-1]]
            labs = labs.with_columns(edges=pl.lit(inner, dtype=pl.List(pl.Float64)))
        return cls(config, fit_vocabulary(stats, labs, config), labs)


# -- quantile bins: a fine train histogram of z per lab code ----------------------------------------------
def _histogram_bins(config: TokenizerConfig) -> int:
    low, high = float(config.z_edges[0]), float(config.z_edges[-1])
    return int(math.ceil((high - low) / config.quantile_resolution))


def z_histogram(events: pl.DataFrame, labs: pl.DataFrame, config: TokenizerConfig, max_time) -> np.ndarray:
    """Counts [n_labs, n_bins] of in-range train z values on a grid of width ``quantile_resolution``;
    rows follow ``labs`` order. Summing the arrays of several chunks gives the dataset's histogram."""
    n_bins = _histogram_bins(config)
    low = float(config.z_edges[0])
    table = labs.select("code", "mean", "std").with_row_index("lab_row")
    kept = (
        _annotate(events.lazy().select(meds.CORE_COLUMNS), config, max_time)[0]
        .filter((pl.col("reason") == 0) & ~pl.col("demographic"))
        .join(table.lazy(), on="code")
        .select("lab_row", z=(pl.col("numeric_value").cast(pl.Float64) - pl.col("mean")) / pl.col("std"))
        .filter(pl.col("z").is_finite() & (pl.col("z") >= low) & (pl.col("z") <= float(config.z_edges[-1])))
        .collect()
    )
    rows = kept.get_column("lab_row").to_numpy().astype(np.int64)
    grid = np.clip(((kept.get_column("z").to_numpy() - low) / config.quantile_resolution).astype(np.int64), 0, n_bins - 1)
    return np.bincount(rows * n_bins + grid, minlength=labs.height * n_bins).reshape(labs.height, n_bins)


def with_quantile_edges(labs: pl.DataFrame, histograms: list[np.ndarray], config: TokenizerConfig) -> pl.DataFrame:
    """Inner bin edges (in z) at the train quantiles k / quantile_bins, read from the summed histograms."""
    histogram = np.sum(histograms, axis=0) if histograms else np.zeros((labs.height, _histogram_bins(config)))
    low = float(config.z_edges[0])
    quantiles = np.arange(1, config.quantile_bins) / config.quantile_bins
    edges = []
    for counts in np.atleast_2d(histogram)[: labs.height]:
        cumulative = np.cumsum(counts)
        total = cumulative[-1] if len(cumulative) else 0
        if total == 0:
            edges.append([float(e) for e in np.linspace(low, float(config.z_edges[-1]), config.quantile_bins + 1)[1:-1]])
            continue
        grid_bin = np.searchsorted(cumulative, quantiles * total, side="left")
        edges.append([low + (b + 1) * config.quantile_resolution for b in grid_bin])
    return labs.with_columns(edges=pl.Series(edges, dtype=pl.List(pl.Float64)))


# -- reading shards: validated chunks of whole subjects ---------------------------------------------------
def read_chunks(path: Path, chunk_rows: int, row_groups: tuple[int, int] | None = None,
                validate: bool = True) -> Iterator[pl.DataFrame]:
    """Validated, normalized frames of about ``chunk_rows`` rows from one shard, each holding whole subjects
    (a subject cut by a batch boundary is carried into the next frame). Each frame has an extra ``row``
    column: the row's 0-based position in the file, for error messages.

    ``row_groups=(a, b)`` reads the subjects whose first row lies in row groups ``a..b-1``: rows continuing
    a subject that started before row group ``a`` are left to the previous range, and the last subject is
    followed into later row groups. Ranges that cover a file's row groups therefore split it into disjoint
    sets of whole subjects that workers can read in parallel. ``validate=False`` skips the null and order
    checks, for a second pass over rows an earlier pass has checked."""
    import pyarrow.parquet as pq

    source = str(path)
    try:
        metadata = pq.read_metadata(path)
        n_groups = metadata.num_row_groups
        first, stop = row_groups if row_groups is not None else (0, n_groups)
        group_rows = [metadata.row_group(i).num_rows for i in range(n_groups)]
        offset = sum(group_rows[:first])
        end_row = offset + sum(group_rows[first:stop])  # rows past this only finish the last subject
        total_rows = metadata.num_rows
        scan = pl.scan_parquet(path).select(meds.CORE_COLUMNS)
        previous_subject = None
        if offset > 0:
            previous_subject = scan.select("subject_id").slice(offset - 1, 1).collect().item()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}); re-export this shard") from None

    def batches():
        position = offset
        while position < total_rows:
            try:
                batch = scan.slice(position, chunk_rows).collect()
            except Exception as exc:
                raise UserError(f"{path}: damaged after row {position} ({type(exc).__name__}: {exc}); "
                                "re-export this shard") from None
            if batch.height == 0:
                return
            yield position, batch
            position += batch.height

    carry: pl.DataFrame | None = None
    skipping = previous_subject is not None
    owned_last = None  # subject of the range's last row, once read: it is followed past the range's end
    for position, batch in batches():
        frame = meds.normalize_events(batch, source)
        frame = frame.with_columns(row=pl.int_range(position, position + frame.height, dtype=pl.Int64))
        if skipping:  # leading rows of a subject that started in the previous range
            meds.check_events(frame, source, row_offset=int(frame["row"][0]))
            if frame["subject_id"][0] < previous_subject:
                raise UserError(f"{source}: rows are not sorted by subject_id: row {frame['row'][0]} (subject "
                                f"{frame['subject_id'][0]}) comes after subject {previous_subject}; sort each shard "
                                "by subject_id, time")
            frame = frame.slice(frame["subject_id"].search_sorted(previous_subject, "right"))  # sorted: a leading block
            skipping = frame.height == 0
            if frame.height and frame["row"][0] >= end_row:
                return  # the range held nothing but the previous range's subject
        if carry is not None:
            frame = pl.concat([carry, frame])
            carry = None
        if frame.height == 0:
            continue
        if validate:
            meds.check_events(frame, source, row_offset=int(frame["row"][0]))  # sorted from here on
        subjects = frame.get_column("subject_id")
        first_row = int(frame["row"][0])
        if first_row + frame.height > end_row:
            if owned_last is None:
                owned_last = subjects[end_row - 1 - first_row]
            cut = subjects.search_sorted(owned_last, "right")
            if cut < frame.height:  # the range's last subject ends in this batch
                yield frame.slice(0, cut)
                return
        cut = subjects.search_sorted(subjects[-1], "left")
        carry = frame.slice(cut)
        if cut:
            yield frame.slice(0, cut)
    if carry is not None and carry.height:
        yield carry


def shard_ranges(path: Path, rows_per_task: int) -> list[tuple[int, int]]:
    """Consecutive row-group ranges of about ``rows_per_task`` rows that cover a shard."""
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(path)
    ranges, start, rows = [], 0, 0
    for i in range(metadata.num_row_groups):
        rows += metadata.row_group(i).num_rows
        if rows >= rows_per_task:
            ranges.append((start, i + 1))
            start, rows = i + 1, 0
    if start < metadata.num_row_groups or not ranges:
        ranges.append((start, metadata.num_row_groups))
    return ranges


# -- worker functions (module level so that spawned processes can run them) ------------------------------
_WORKER_CACHE: dict = {}


class SplitLookup:
    """Split of each event's subject by binary search in the sorted subject ids of the splits file: cost per
    chunk grows with the chunk, not with the number of subjects in the dataset."""

    def __init__(self, splits: pl.DataFrame):
        splits = splits.sort("subject_id")
        self.subject_ids = splits.get_column("subject_id").to_numpy()
        code = {name: i for i, name in enumerate(SPLITS)}
        self.codes = splits.get_column("split").replace_strict(code, return_dtype=pl.Int8).to_numpy()

    def of(self, subject_ids: np.ndarray) -> np.ndarray:
        """Index into SPLITS per event, -1 for a subject without a split."""
        if len(self.subject_ids) == 0:
            return np.full(len(subject_ids), -1, dtype=np.int8)
        position = np.minimum(np.searchsorted(self.subject_ids, subject_ids), len(self.subject_ids) - 1)
        return np.where(self.subject_ids[position] == subject_ids, self.codes[position], -1).astype(np.int8)


def _split_lookup(meds_dir: str) -> SplitLookup:
    key = ("splits", meds_dir)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = SplitLookup(meds.read_splits_checked(Path(meds_dir)))
    return _WORKER_CACHE[key]


def _chunk_splits(chunk: pl.DataFrame, lookup: SplitLookup) -> np.ndarray:
    """Split index per row of a chunk sorted by subject: looked up once per subject."""
    subjects = chunk.get_column("subject_id").to_numpy()
    if len(subjects) == 0:
        return np.zeros(0, dtype=np.int8)
    starts = np.flatnonzero(np.concatenate([[True], subjects[1:] != subjects[:-1]]))
    return np.repeat(lookup.of(subjects[starts]), np.diff(np.concatenate([starts, [len(subjects)]])))


def _statistics_task(task: dict) -> dict:
    """Pass 1 over one shard: validate every row, and per-code statistics of the train split."""
    config = TokenizerConfig.from_dict(task["config"])
    max_time = config.max_time_value()
    lookup = _split_lookup(task["meds_dir"])
    labs = pl.DataFrame(task["labs"]) if task.get("labs") is not None else None
    parts, histograms, rows = [], [], 0
    for chunk in read_chunks(Path(task["path"]), config.chunk_rows, task["row_groups"]):
        rows += chunk.height
        check_future(chunk, config, max_time, task["path"], row_column="row")
        chunk = chunk.filter(pl.Series(_chunk_splits(chunk, lookup) == SPLITS.index("train")))
        if labs is None:
            parts.append(code_statistics(chunk, config, max_time))
        else:
            histograms.append(z_histogram(chunk, labs, config, max_time))
    result = {"rows": rows}
    if labs is None:
        result["stats"] = merge_statistics(parts)
    else:
        result["histogram"] = np.sum(histograms, axis=0) if histograms else None
    return result


def _tokenize_task(task: dict) -> dict:
    """Pass 2 over one shard: tokenize each split's subjects into part folders under ``task['part']``."""
    key = ("tokenizer", task["tokenizer"])
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = Tokenizer.load(Path(task["tokenizer"]))
    tokenizer: Tokenizer = _WORKER_CACHE[key]
    lookup = _split_lookup(task["meds_dir"])
    part = Path(task["part"])
    writers: dict[str, SplitWriter] = {}
    counts = {split: empty_counts() for split in SPLITS}
    unassigned = {"events": 0, "subjects": 0}
    rows = 0
    for chunk in read_chunks(Path(task["path"]), tokenizer.config.chunk_rows, task["row_groups"],
                             validate=not task["validated"]):
        rows += chunk.height
        check_future(chunk, tokenizer.config, tokenizer.max_time, task["path"], row_column="row")
        split_of_row = _chunk_splits(chunk, lookup)
        chunk = chunk.select(meds.CORE_COLUMNS)
        missing = split_of_row < 0
        if missing.any():
            unassigned["events"] += int(missing.sum())
            unassigned["subjects"] += chunk.filter(pl.Series(missing)).get_column("subject_id").n_unique()
            chunk, split_of_row = chunk.filter(pl.Series(~missing)), split_of_row[~missing]
        for split, batch in zip(SPLITS, tokenizer.tokenize_groups(chunk, split_of_row, len(SPLITS))):
            if batch.counts["events_in"] == 0:
                continue
            if split not in writers:
                writers[split] = SplitWriter(part / split)
            batch.write(writers[split])
            add_counts(counts[split], batch.counts)
    for writer in writers.values():
        writer.close()
    return {"rows": rows, "counts": counts, "unassigned": unassigned, "splits": sorted(writers)}


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Workers:
    """A pool of spawned worker processes, started on first use and shared by the passes over the data.
    Polars in each worker gets its share of the CPUs so that workers do not oversubscribe them."""

    def __init__(self, workers: int, progress: bool):
        self.workers = max(1, workers)
        self.progress = progress
        self._pool = None

    def run(self, function, tasks: list[dict], description: str, total_rows: int):
        """``function`` over ``tasks``; results in task order (in this process when one worker suffices)."""
        from tqdm import tqdm

        bar = tqdm(total=total_rows, desc=description, unit=" events", unit_scale=True, disable=not self.progress,
                   file=sys.stderr, leave=False)
        try:
            if self.workers == 1 or len(tasks) == 1:
                results = map(function, tasks)
            else:
                results = self._start().imap(function, tasks)
            for result in results:
                bar.update(result["rows"])
                yield result
        finally:
            bar.close()

    def _start(self):
        if self._pool is None:
            previous = os.environ.get("POLARS_MAX_THREADS")
            os.environ["POLARS_MAX_THREADS"] = str(max(1, _default_workers() // self.workers))
            try:
                self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
            finally:
                if previous is None:
                    os.environ.pop("POLARS_MAX_THREADS", None)
                else:
                    os.environ["POLARS_MAX_THREADS"] = previous
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def _read_tasks(files: list[Path], config: TokenizerConfig, workers: int, total_rows: int) -> list[dict]:
    """Units of work: row-group ranges of the shards, small enough to give every worker several."""
    rows_per_task = max(1, min(config.chunk_rows, -(-total_rows // (4 * workers))))
    return [{"path": str(path), "row_groups": rows} for path in files for rows in shard_ranges(path, rows_per_task)]


# -- the whole dataset -------------------------------------------------------------------------------------
def fit_statistics(meds_dir: Path, reads: list[dict], config: TokenizerConfig, pool: _Workers, total_rows: int) -> Tokenizer:
    """The vocabulary pass: per-code train statistics, shard by shard, merged exactly; for quantile bins a
    second streaming pass reads the train z histograms."""
    base = {"meds_dir": str(meds_dir), "config": config.to_dict()}
    tasks = [dict(base, **read) for read in reads]
    stats = merge_statistics([r["stats"] for r in pool.run(_statistics_task, tasks, "vocabulary", total_rows)])
    labs = lab_statistics(stats, config)
    if config.lab_binning == "quantile":
        lab_table = labs.select("code", "mean", "std").to_dict(as_series=False)
        tasks = [dict(task, labs=lab_table) for task in tasks]
        histograms = [r["histogram"] for r in pool.run(_statistics_task, tasks, "lab quantiles", total_rows)
                      if r["histogram"] is not None]
        labs = with_quantile_edges(labs, histograms, config)
    return Tokenizer.from_statistics(stats, labs, config)


def _prepare_output(out: Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is a file; give a folder path for --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _check_unique_subjects(folder: Path, split: str) -> None:
    path = folder / "subject_ids.bin"
    if not path.exists() or path.stat().st_size == 0:
        return
    ids = np.memmap(path, dtype=np.int64, mode="r")
    if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
        unique, counts = np.unique(np.asarray(ids), return_counts=True)
        if (counts > 1).any():
            raise UserError(f"subject {int(unique[counts > 1][0])} ({split}) appears in more than one data shard; "
                            "MEDS keeps each subject in one shard: merge its rows into one shard")


def tokenize_dataset(meds_dir: Path, out: Path, config: TokenizerConfig | None = None, vocab_from: Path | None = None,
                     workers: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Validate a MEDS dataset and write a token store at ``out`` (atomically: built in a sibling folder,
    then renamed). Returns the manifest."""
    started = time.perf_counter()
    meds_dir = Path(meds_dir)
    files = meds.data_files(meds_dir)
    total_rows = sum(meds.check_shard_schema(path) for path in files)
    if total_rows == 0:
        raise UserError(f"{meds_dir}: the dataset is empty (its {len(files)} data shard(s) hold no rows)")
    splits = meds.read_splits_checked(meds_dir)
    workers = workers or max(1, min(_default_workers(), total_rows // ROWS_PER_WORKER))

    if vocab_from is not None:
        tokenizer = Tokenizer.load(vocab_from)
        if config is not None:
            changed = [name for name in VOCABULARY_FIELDS if getattr(config, name) != getattr(tokenizer.config, name)]
            if changed:
                raise UserError(f"--config changes {', '.join(changed)}, which define the vocabulary of {vocab_from}; "
                                "drop them from the config or tokenize without --vocab-from")
            tokenizer = Tokenizer(config.resolved(), tokenizer.vocab, tokenizer.lab_stats)
    else:
        config = (config or TokenizerConfig()).validate().resolved()
        if splits.filter(pl.col("split") == "train").height == 0:
            raise UserError(f"{meds_dir}/metadata/subject_splits.parquet: no train subjects; the vocabulary is fit "
                            "on train (or pass --vocab-from to reuse one)")
    staging = _prepare_output(out, overwrite)
    pool = _Workers(workers, progress)
    try:
        reads = _read_tasks(files, config if vocab_from is None else tokenizer.config, workers, total_rows)
        if vocab_from is None:
            tokenizer = fit_statistics(meds_dir, reads, config, pool, total_rows)
        tokenizer.save(staging)
        vocab_codes = pl.DataFrame({"code": sorted({tokenizer.vocab.code_of(i) for i in range(len(tokenizer.vocab))})})
        meds.read_code_descriptions(meds_dir).join(vocab_codes, on="code", how="semi").write_parquet(staging / "codes.parquet")
        parts = staging / "parts"
        base = {"meds_dir": str(meds_dir), "tokenizer": str(staging), "validated": vocab_from is None}
        tasks = [dict(base, part=str(parts / f"{i:05d}"), **read) for i, read in enumerate(reads)]
        counts = {split: empty_counts() for split in SPLITS}
        unassigned = {"events": 0, "subjects": 0}
        split_parts: dict[str, list[Path]] = {split: [] for split in SPLITS}
        for task, result in zip(tasks, pool.run(_tokenize_task, tasks, "tokenize", total_rows)):
            for split in SPLITS:
                add_counts(counts[split], result["counts"][split])
            for split in result["splits"]:
                split_parts[split].append(Path(task["part"]) / split)
            add_counts(unassigned, result["unassigned"])
        sizes = {}
        for split in SPLITS:
            writer = SplitWriter(staging / split)
            for folder in split_parts[split]:
                writer.append_split(folder)
            sizes[split] = writer.close()
            _check_unique_subjects(staging / split, split)
        shutil.rmtree(parts)
        listed = splits.group_by("split").len()
        listed = dict(zip(listed["split"].to_list(), listed["len"].to_list()))
        for split in SPLITS:
            counts[split]["subjects_listed"] = int(listed.get(split, 0))
            counts[split]["subjects_without_events"] = max(0, counts[split]["subjects_listed"] - counts[split]["subjects_in"])
            counts[split]["unk_share"] = (counts[split]["replaced"]["unknown_code"] / counts[split]["events_in"]
                                          if counts[split]["events_in"] else 0.0)
            counts[split]["balance_gap"] = balance_gap(counts[split])
        events_in = sum(c["events_in"] for c in counts.values()) + unassigned["events"]
        if events_in != total_rows:
            raise RuntimeError(f"read {events_in} events but the shards hold {total_rows}")
        elapsed = time.perf_counter() - started
        manifest = {
            "source": str(meds_dir.resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "vocab_from": str(Path(vocab_from).resolve()) if vocab_from is not None else None,
            "vocab_size": len(tokenizer.vocab),
            "events_in": events_in,
            "shards": len(files),
            "splits": counts,
            "unassigned": unassigned,  # events of subjects absent from subject_splits.parquet (dropped)
            "unk_share": sum(c["replaced"]["unknown_code"] for c in counts.values()) / max(1, events_in),
            "seconds": round(elapsed, 3),
            "events_per_second": round(events_in / elapsed) if elapsed > 0 else None,
            "workers": workers,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        write_store_info(staging, sizes, len(tokenizer.vocab), {"tokenizer": "nextvisit.tokenize.tokenizer"})
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        pool.close()
    return manifest


# -- command line ---------------------------------------------------------------------------------------------
def run_cli(args) -> int:
    config = None
    if args.config is not None:
        # with --vocab-from, the file overrides the reused tokenizer's config, field by field
        base = Tokenizer.load(args.vocab_from).config if args.vocab_from is not None else None
        config = TokenizerConfig.load(args.config, base=base)
    manifest = tokenize_dataset(args.meds_dir, args.out, config=config, vocab_from=args.vocab_from,
                                workers=args.workers, overwrite=args.overwrite, progress=True)
    print(f"token store written to {args.out} ({manifest['vocab_size']} tokens in the vocabulary)")
    print(f"{'split':<10}{'subjects':>10}{'visits':>12}{'tokens':>14}{'events in':>14}{'dropped':>12}{'UNK share':>11}")
    for split, c in manifest["splits"].items():
        print(f"{split:<10}{c['subjects_out']:>10,}{c['visits']:>12,}{c['tokens_out']:>14,}{c['events_in']:>14,}"
              f"{sum(c['dropped'].values()):>12,}{c['unk_share']:>11.2%}")
    dropped = {}
    for c in manifest["splits"].values():
        add_counts(dropped, {"dropped": c["dropped"], "replaced": c["replaced"], "duplicates": c["duplicates_collapsed"]})
    reasons = ", ".join(f"{k} {v:,}" for k, v in dropped["dropped"].items() if v)
    print(f"dropped by reason: {reasons or 'none'}; duplicates collapsed within a visit: {dropped['duplicates']:,}")
    replaced = ", ".join(f"{k} {v:,}" for k, v in dropped["replaced"].items() if v)
    print(f"replaced: {replaced or 'none'}")
    without_events = sum(c["subjects_without_events"] for c in manifest["splits"].values())
    without_visits = sum(c.get("subjects_without_visits", 0) for c in manifest["splits"].values())
    if without_events or without_visits:
        print(f"subjects in subject_splits.parquet without any event: {without_events:,}; "
              f"subjects with only static rows (no visit): {without_visits:,}")
    if manifest["unassigned"]["events"]:
        print(f"events of subjects without a split (dropped): {manifest['unassigned']['events']:,} "
              f"({manifest['unassigned']['subjects']:,} subjects)")
    if args.vocab_from is not None:
        print(f"share of events that became UNK with the vocabulary of {args.vocab_from}: {manifest['unk_share']:.2%}")
    print(f"{manifest['events_in']:,} events in {manifest['seconds']:.1f}s ({manifest['events_per_second']:,} events/s)")
    return 0


def _describe(token: str, kind: str, descriptions: dict) -> str:
    if kind == "lab":
        code, _, label = token.partition("|")
        text = descriptions.get(code)
        return f"{text} ({label})" if text else f"value bin {label}"
    if kind in ("code", "demographic"):
        return descriptions.get(token, "")
    return ""


def format_timeline(store: TokenStore, subject_id: int) -> str:
    """A subject's visits as readable text: date, age, and each token with its MEDS description."""
    found = None
    for split in SPLITS:
        if not (store.path / split).exists():
            continue
        view = store.split(split)
        index = view.index_of(subject_id)
        if index is not None:
            found = (split, view.subject(index))
            break
    if found is None:
        raise UserError(f"{store.path}: subject {subject_id} is in no split of this store; it may have had no visit "
                        "left after cleaning (see manifest.json, subjects_without_visits) or no split in the MEDS data")
    split, subject = found
    codes_path = store.path / "codes.parquet"
    descriptions = {}
    if codes_path.exists():
        table = pl.read_parquet(codes_path)
        descriptions = dict(zip(table["code"].to_list(), table["description"].to_list()))
    vocab = store.vocab
    epoch = np.datetime64("1970-01-01", "D")
    known_birth = subject.birth_day != NO_DAY
    born = str(epoch + np.timedelta64(subject.birth_day, "D")) if known_birth else "unknown"
    lines = [f"subject {subject.subject_id} ({split}): born {born}, {subject.n_visits} visits, {len(subject.tokens)} tokens"]
    width = max((len(vocab.tokens[t]) for t in subject.tokens), default=0)
    for i in range(subject.n_visits):
        day = int(subject.visit_days[i])
        age = f"age {(day - subject.birth_day) / DAYS_PER_YEAR:.1f}" if known_birth else "age unknown"
        gap = f", {day - int(subject.visit_days[i - 1])} days after the previous visit" if i else ""
        lines.append(f"{epoch + np.timedelta64(day, 'D')}  {age}  (visit {i + 1}{gap})")
        for token_id in subject.visit(i).tolist():
            token, kind = vocab.tokens[token_id], vocab.kinds[token_id]
            text = _describe(token, kind, descriptions)
            lines.append(f"    {token:<{width}}  {text}".rstrip())
    return "\n".join(lines)


def inspect_cli(args) -> int:
    text = format_timeline(TokenStore(args.store), args.subject)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
