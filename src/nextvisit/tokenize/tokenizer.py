"""MEDS events to visit-structured tokens (METHOD.md §1-3): the ``Tokenizer`` and its output, ``TokenBatch``.

One code path turns events into tokens: ``Tokenizer.tokenize_groups`` (``tokenize_frame`` is its one-group
case). The command line runs it shard by shard (``nextvisit.tokenize.dataset``); forecasting and the
baselines run it on in-memory histories through ``Tokenizer.subjects``. What it does, per subject:

- a visit is one calendar day of timed events; ``MEDS_BIRTH`` gives the birth day and is not a visit;
  ``MEDS_DEATH`` is an ordinary code token on its day (a valid next-visit target);
- every event becomes one token: its code, or for a value-carrying code with train statistics the fused lab
  token ``CODE|z[a,b)`` (or ``CODE|q3/7`` with quantile bins); unknown codes become ``UNK``;
- within a visit: the age-bucket token, the demographics (first visit only), then the clinical tokens, each
  once, in id order;
- dropped events are counted by reason (``empty_counts``), so that per group (split)
  ``events_in = tokens_from_events + duplicates_collapsed + sum(dropped)`` (``balance_gap`` is 0).

Contract: the tokens depend only on the events of the subject, the vocabulary, the lab statistics and the
config; never on row order, chunking or grouping. The vocabulary and the lab statistics are fit on the
``train`` split only (``Tokenizer.fit`` here, ``nextvisit.tokenize.dataset.fit_statistics`` shard by shard,
both through ``nextvisit.tokenize.vocabulary``). ``Tokenizer.load`` / ``save`` read and write
``vocab.json``, ``lab_stats.parquet`` and ``tokenizer.yaml`` of a store or a model run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import yaml

from nextvisit.data import meds
from nextvisit.errors import UserError
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.events import DROP_REASONS, REASON_ID, REPLACE_REASONS, annotate, check_future
from nextvisit.tokenize.store import NO_DAY, UNK, SplitWriter, Subject, Vocabulary
from nextvisit.tokenize.vocabulary import (
    code_statistics,
    fit_vocabulary,
    lab_statistics,
    merge_statistics,
    with_quantile_edges,
    z_histogram,
)
from nextvisit.units import DAYS_PER_YEAR

_KEY_BITS = 63  # events sort on one int64 key (subject, day, kind, token) when their ranges fit in it


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



def _per_group(values: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(values, minlength=n_groups).astype(np.int64)


def _positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each of ``ids`` in ``sorted_ids`` (which holds them all); linear when ``ids`` is sorted, as
    in a MEDS shard."""
    if len(ids) and np.all(ids[1:] >= ids[:-1]):
        return np.cumsum(np.concatenate([[0], ids[1:] != ids[:-1]])) + np.searchsorted(sorted_ids, ids[0])
    return np.searchsorted(sorted_ids, ids)



@dataclass
class _Visits:
    """A frame's kept tokens, deduplicated and cut into visits (each opened by its age token), all groups."""

    event_subject: np.ndarray  # [tokens from events] subject row (index into the frame's sorted subjects)
    tokens: np.ndarray  # int32 [N]: per visit, the age token then the visit's tokens
    visit_subject: np.ndarray  # [V] subject row of each visit
    visit_day: np.ndarray  # int32 [V]
    visit_lengths: np.ndarray  # int64 [V], age token included
    visit_counts: np.ndarray  # int64 [S] visits per subject


def _keep_subjects_with_visits(reason: np.ndarray, demographic: np.ndarray, subject_row: np.ndarray,
                               n_subjects: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept events (reason 0) and the updated reasons: a subject with no timed event left has no visit to
    hold its demographics, so its kept events become ``subject_without_visits``."""
    kept = reason == 0
    has_visit = np.zeros(n_subjects, dtype=bool)
    has_visit[subject_row[kept & ~demographic]] = True
    orphan = kept & ~has_visit[subject_row]
    reason = np.where(orphan, REASON_ID["subject_without_visits"], reason)
    kept &= ~orphan
    return kept, reason


def _event_counts(row_group: np.ndarray, reason: np.ndarray, kept: np.ndarray, replaced: np.ndarray,
                  n_groups: int) -> tuple[list[dict], np.ndarray]:
    """Per group, ``empty_counts`` with events in, dropped by reason and (kept events) replaced by reason
    filled in; and the number of kept events per group."""
    counts = [empty_counts() for _ in range(n_groups)]
    events_in = _per_group(row_group, n_groups)
    reason_counts = np.bincount(row_group * (len(DROP_REASONS) + 1) + reason,
                                minlength=n_groups * (len(DROP_REASONS) + 1)).reshape(n_groups, -1)
    flags, kept_group = replaced[kept], row_group[kept]
    for g, c in enumerate(counts):
        c["events_in"] = int(events_in[g])
        for name, index in REASON_ID.items():
            c["dropped"][name] = int(reason_counts[g, index])
    for bit, name in enumerate(REPLACE_REASONS):
        flagged = _per_group(kept_group[((flags >> bit) & 1).astype(bool)], n_groups)
        for g, c in enumerate(counts):
            c["replaced"][name] = int(flagged[g])
    return counts, _per_group(kept_group, n_groups)


def _sorted_unique(row: np.ndarray, day_key: np.ndarray, is_clinical: np.ndarray, token: np.ndarray,
                   n_subjects: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``row, day_key, token`` sorted by (subject, day, demographic-before-clinical, token), duplicates
    removed: one packed int64 key when the ranges fit in ``_KEY_BITS``, else a sort by columns."""
    widths = [max(1, int(x).bit_length()) for x in (n_subjects, day_key.max(initial=0), vocab_size)]
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
    return row, day_key, token


def _group_batches(visits: _Visits, counts: list[dict], kept_per_group: np.ndarray, subject_ids: np.ndarray,
                   birth_days: np.ndarray, subject_group: np.ndarray) -> list[TokenBatch]:
    """One ``TokenBatch`` per group (``counts`` completed in place); every array keeps subject order."""
    n_groups = len(counts)
    tokens_from_events = _per_group(subject_group[visits.event_subject], n_groups)
    visit_group = subject_group[visits.visit_subject]
    token_group = np.repeat(visit_group, visits.visit_lengths)
    batches = []
    for g, c in enumerate(counts):
        in_subjects, in_visits = subject_group == g, visit_group == g
        c["tokens_from_events"] = int(tokens_from_events[g])
        c["duplicates_collapsed"] = int(kept_per_group[g] - tokens_from_events[g])
        c["age_tokens"] = c["visits"] = int(in_visits.sum())
        c["subjects_in"] = int(in_subjects.sum())
        c["subjects_out"] = int((in_subjects & (visits.visit_counts > 0)).sum())
        c["subjects_without_visits"] = c["subjects_in"] - c["subjects_out"]
        if n_groups == 1:
            group_tokens = visits.tokens
            group_visits = slice(None)
        else:
            group_tokens = visits.tokens[token_group == g]
            group_visits = in_visits
        c["tokens_out"] = len(group_tokens)
        batches.append(TokenBatch(
            subject_ids[in_subjects].astype(np.int64), birth_days[in_subjects], visits.visit_counts[in_subjects],
            visits.visit_day[group_visits].astype(np.int32), visits.visit_lengths[group_visits], group_tokens, c,
        ))
    return batches


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
        ``groups`` [rows] gives each row's group (e.g. its split; constant within a subject).

        Steps: annotate the events and look up their codes; one token id per event; drop the events of
        subjects without a visit and count every event; sort and deduplicate; cut visits, each opened by its
        age token; split by group."""
        frame, life = self._annotated(events, groups)
        subject_ids = life.get_column("subject_id").to_numpy()
        birth = life.get_column("birth_day")
        birth_days = birth.fill_null(NO_DAY).to_numpy().astype(np.int32)
        birth_known = birth.is_not_null().to_numpy()
        demographic = frame.get_column("demographic").to_numpy()
        token, reason, replaced = self._event_tokens(frame, demographic)

        subject_row = _positions(subject_ids, frame.get_column("subject_id").to_numpy())
        row_group = frame.get_column("group").to_numpy().astype(np.int64)
        subject_group = np.zeros(len(subject_ids), dtype=np.int64)
        subject_group[subject_row] = row_group
        kept, reason = _keep_subjects_with_visits(reason, demographic, subject_row, len(subject_ids))
        counts, kept_per_group = _event_counts(row_group, reason, kept, replaced, n_groups)

        day = frame.get_column("day").fill_null(0).to_numpy()[kept]
        visits = self._visits(subject_row[kept], day, ~demographic[kept], token[kept], birth_days, birth_known)
        return _group_batches(visits, counts, kept_per_group, subject_ids, birth_days, subject_group)

    def _annotated(self, events: pl.DataFrame, groups: np.ndarray) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The annotated events with their ``code_row`` (null for a code outside the vocabulary) and
        ``group``; and the per-subject ``birth_day, death_day`` table in subject_id order."""
        annotated, life = annotate(
            events.lazy().select(meds.CORE_COLUMNS).with_columns(group=pl.Series(groups, dtype=pl.Int8)),
            self.config, self.max_time)
        frame, life = pl.collect_all([
            annotated.join(self._code_frame.lazy(), on="code", how="left").select(
                "subject_id", "day", "demographic", "reason", "code_row", "group",
                pl.col("numeric_value").is_null().alias("value_null"), "numeric_value"),
            life.sort("subject_id"),
        ])
        return frame, life

    def _event_tokens(self, frame: pl.DataFrame, demographic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per event: the token id (the lab token for a finite value on a lab code, else the code's plain
        token, else UNK), the reason with ``value_out_of_range`` added, and the ``REPLACE_REASONS`` that
        apply as bit flags (bit i = reason i)."""
        reason = frame.get_column("reason").to_numpy().copy()
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
            reason[lab_rows[out_of_range & (reason[lab_rows] == 0)]] = REASON_ID["value_out_of_range"]
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
        return token, reason, replaced

    def _visits(self, row: np.ndarray, day: np.ndarray, is_clinical: np.ndarray, token: np.ndarray,
                birth_days: np.ndarray, birth_known: np.ndarray) -> _Visits:
        """The kept events (subject ``row``, ``day``, ``token``) as visits: deduplicated, demographics in
        their subject's first visit, each visit opened by its age-bucket token."""
        # one sortable key per event: subject, day (demographics first, day 0), demographic-before-clinical, token
        first_day = int(day[is_clinical].min()) if is_clinical.any() else 0
        day_key = np.where(is_clinical, day.astype(np.int64) - first_day + 1, 0)
        row, day_key, token = _sorted_unique(row, day_key, is_clinical, token, len(birth_days), len(self.vocab))

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
        age_ids = self.age_token_ids(birth_days[visit_subject], visit_day, birth_known[visit_subject])
        return _Visits(
            event_subject=row,
            tokens=np.insert(token.astype(np.int32), starts, age_ids),
            visit_subject=visit_subject,
            visit_day=visit_day,
            visit_lengths=np.diff(np.concatenate([starts, [n]])).astype(np.int64) + 1,
            visit_counts=np.bincount(visit_subject, minlength=len(birth_days)).astype(np.int64),
        )

    def age_token_ids(self, birth_days: np.ndarray, visit_days: np.ndarray, birth_known: np.ndarray) -> np.ndarray:
        """The age-bucket token that opens a visit on ``visit_days`` (days since 1970) of a subject born on
        ``birth_days``; the unknown-age token where ``birth_known`` is False. Also used for generated visits."""
        age_years = (np.asarray(visit_days, np.float64) - np.asarray(birth_days, np.float64)) / DAYS_PER_YEAR
        bucket = np.clip(np.searchsorted(self._age_edges, age_years, side="right") - 1, 0, len(self._age_edges) - 1)
        return self._age_ids[np.where(birth_known, bucket, len(self._age_edges))]

    # -- fitting
    @classmethod
    def fit(cls, train_events: pl.DataFrame, config: TokenizerConfig | None = None) -> "Tokenizer":
        """Fit vocabulary and lab statistics on in-memory train events (tests, small cohorts). The command
        line fits the same way, shard by shard (``nextvisit.tokenize.dataset.fit_statistics``)."""
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
