"""``nextvisit occurrence``, the inflation analysis (docs/interfaces.md section 6): at every visit boundary
of a token store split, P(any condition token in the next visit), the observed answer, and whether the
subject already had a condition token in an earlier visit (``prior_occurrence``). Recurring codes make
"all occurrences" easy; the new onsets are the question that matters (METHOD.md)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from nextvisit.artifacts.predictions import PREDICTION_COLUMNS, PROBABILITY, ZERO_SHOT, write_predictions
from nextvisit.artifacts.folders import check_out
from nextvisit.errors import UserError
from nextvisit.model.run import autocast_for, check_precision, load_next_visit_run, resolve_device
from nextvisit.predict.horizon import Forecast
from nextvisit.predict.scoring import (
    AGGREGATORS, SCORED_SPLITS, aggregate, check_same_vocab, condition_token_ids, model_device, parse_splits,
)
from nextvisit.tasks import SEX_PREFIX, Task, load_task
from nextvisit.tokenize.store import NO_DAY, Subject, TokenStore, Vocabulary
from nextvisit.units import DAYS_PER_YEAR, END_OF_DAY

OCCURRENCE_MODES = ("windows", "recent")


@dataclass
class OccurrenceConfig:
    aggregator: str = "sum_logits"
    splits: tuple[str, ...] = SCORED_SPLITS
    # "windows": every visit boundary once, in windows cut as in training; "recent": per subject only the
    # boundaries inside its most recent window.
    mode: str = "windows"
    batch_size: int = 32  # windows per forward pass
    subjects_per_chunk: int = 512
    precision: str = "auto"  # as ForecastConfig.precision

    def validate(self) -> "OccurrenceConfig":
        if self.aggregator not in AGGREGATORS:
            raise UserError(f"aggregator {self.aggregator!r} is unknown; choose one of {', '.join(AGGREGATORS)}")
        check_precision(self.precision)
        if self.mode not in OCCURRENCE_MODES:
            raise UserError(f"mode {self.mode!r} is unknown; choose one of {', '.join(OCCURRENCE_MODES)}")
        return self


def _visit_of_token(subject: Subject) -> np.ndarray:
    return np.repeat(np.arange(subject.n_visits), np.diff(subject.visit_offsets))


def _drop_tokens(subject: Subject, drop: np.ndarray, is_age: np.ndarray, is_demographic: np.ndarray) -> Subject:
    """The subject without tokens flagged in ``drop`` [V], as the tokenizer makes it from events without them
    (the forecast's histories): a visit left with no event token (only its age token, and a first visit's
    demographics) is removed, and demographics move to the first visit left, after its age token."""
    keep = ~drop[subject.tokens]
    if keep.all():
        return subject
    visit_of = _visit_of_token(subject)
    age, demographic = is_age[subject.tokens], is_demographic[subject.tokens]
    has_event = np.bincount(visit_of[keep & ~age & ~demographic], minlength=subject.n_visits) > 0
    kept_visits = np.flatnonzero(has_event)
    moved = keep & demographic & ~has_event[visit_of]
    keep &= has_event[visit_of] | (moved & (len(kept_visits) > 0))
    visit_of = np.where(moved, kept_visits[0] if len(kept_visits) else 0, visit_of)
    order = np.flatnonzero(keep)
    if moved.any():  # the tokenizer's order within a visit: age token, demographics, then the rest, by id
        rank = np.where(age, 0, np.where(demographic, 1, 2))[order]
        order = order[np.lexsort((subject.tokens[order], rank, visit_of[order]))]
    lengths = np.bincount(visit_of[order], minlength=subject.n_visits)[kept_visits]
    return Subject(
        subject_id=subject.subject_id, birth_day=subject.birth_day,
        visit_days=subject.visit_days[kept_visits],
        visit_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        tokens=subject.tokens[order],
    )


def _sex_of(subject: Subject, vocab: Vocabulary) -> str | None:
    if subject.n_visits == 0:
        return None
    for token in subject.visit(0):
        text = vocab.tokens[int(token)]
        if vocab.kinds[int(token)] == "demographic" and text.startswith(SEX_PREFIX):
            return text[len(SEX_PREFIX):]
    return None


@torch.no_grad()
def occurrence(model, vocab: Vocabulary, store: TokenStore, task: Task, config: OccurrenceConfig, max_window: int,
               model_name: str, progress: bool = True) -> Forecast:
    """Rows per visit boundary: P(next visit holds a condition token), the answer and ``prior_occurrence``."""
    from tqdm import tqdm

    from nextvisit.model.sequence import subject_windows, windows_batch

    config.validate()
    token_ids = condition_token_ids(task, vocab, f"{store.path}/vocab.json")
    is_condition = np.zeros(len(vocab), bool)
    is_condition[token_ids.numpy()] = True
    drop = np.zeros(len(vocab), bool)
    drop[task.remove_from_inputs.token_ids(vocab, kinds=tuple(set(vocab.kinds)))] = True
    drop &= ~is_condition
    kinds = np.array(vocab.kinds)
    is_age, is_demographic = kinds == "age", kinds == "demographic"
    supervised = vocab.supervised_mask()
    device = model_device(model)
    autocast, precision = autocast_for(config.precision, device)
    parts = []
    removed_empty_visits = 0
    without_boundary = 0  # subjects with fewer than two visits: no visit boundary to score
    for split_name in config.splits:
        split = store.split(split_name)
        bar = tqdm(total=len(split), desc=f"occurrence {split_name}", unit="subject", disable=not progress,
                   file=sys.stderr)
        for begin in range(0, len(split), config.subjects_per_chunk):
            subjects = []
            for i in range(begin, min(begin + config.subjects_per_chunk, len(split))):
                original = split.subject(i)
                subject = _drop_tokens(original, drop, is_age, is_demographic)
                removed_empty_visits += original.n_visits - subject.n_visits
                subjects.append(subject)
            without_boundary += sum(1 for subject in subjects if subject.n_visits < 2)
            windows = subject_windows(subjects, max_window)
            if config.mode == "recent":
                last = {}
                for w in windows:
                    last[w.subject] = w
                windows = list(last.values())
            for w0 in range(0, len(windows), config.batch_size):
                chunk = windows[w0 : w0 + config.batch_size]
                batch = windows_batch(subjects, chunk, supervised, max_window)
                with autocast():
                    logits = model.query_logits(batch.to(device)).float()
                risk = aggregate(logits, token_ids, config.aggregator).cpu().numpy()
                window_of = batch.sep_window.numpy()
                visit = batch.sep_visit.numpy()
                subject_index = np.array([chunk[k].subject for k in window_of], np.int64)
                parts.append(_occurrence_rows(subjects, subject_index, visit, risk, is_condition, split_name, vocab))
            bar.update(len(subjects))
        bar.close()
    frame = pl.concat(parts) if parts else pl.DataFrame(schema=_OCCURRENCE_SCHEMA)
    predictions = frame.with_columns(
        task=pl.lit(f"{task.name}_next_visit"), horizon_days=pl.lit(0, dtype=pl.Int32), model=pl.lit(model_name)
    ).select(*PREDICTION_COLUMNS, PROBABILITY, "model", "prior_occurrence")
    info = {
        "label_counts": _occurrence_counts(predictions),
        "visits_left_empty_by_remove_from_inputs": removed_empty_visits,
        "subjects_without_visit_boundary": without_boundary,
        "precision": precision,
    }
    return Forecast(predictions=predictions, info=info)


_OCCURRENCE_SCHEMA = {
    "subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean, "split": pl.String,
    "age_years": pl.Float64, "sex": pl.String, PROBABILITY: pl.Float64, "prior_occurrence": pl.Boolean,
}


def _occurrence_rows(subjects, subject_index, visit, risk, is_condition, split_name, vocab) -> pl.DataFrame:
    """Label and prior occurrence per scored SEP, from the subjects' own visits."""
    flags = {}
    for s in np.unique(subject_index):
        subject = subjects[s]
        has = np.bincount(_visit_of_token(subject), weights=is_condition[subject.tokens],
                          minlength=subject.n_visits) > 0
        prior = np.concatenate([[False], np.cumsum(has)[:-1] > 0])
        flags[int(s)] = (has, prior)
    label = np.array([flags[int(s)][0][v] for s, v in zip(subject_index, visit)], bool)
    prior = np.array([flags[int(s)][1][v] for s, v in zip(subject_index, visit)], bool)
    before_day = np.array([subjects[s].visit_days[v - 1] for s, v in zip(subject_index, visit)], np.int64)
    birth = np.array([subjects[s].birth_day for s in subject_index], np.int64)
    age = np.where(birth == NO_DAY, np.nan, (before_day + 1 - birth) / DAYS_PER_YEAR)
    sex = [_sex_of(subjects[s], vocab) for s in subject_index]
    frame = pl.DataFrame({
        "subject_id": np.array([subjects[s].subject_id for s in subject_index], np.int64),
        "day": before_day.astype(np.int32),
        "boolean_value": label,
        "split": [split_name] * len(label),
        "age_years": age,
        "sex": pl.Series(sex, dtype=pl.String),
        PROBABILITY: risk,
        "prior_occurrence": prior,
    })
    return frame.with_columns(
        prediction_time=pl.col("day").cast(pl.Date).cast(pl.Datetime("us")) + END_OF_DAY,
        age_years=pl.col("age_years").fill_nan(None),
    ).select(list(_OCCURRENCE_SCHEMA))


def _occurrence_counts(predictions: pl.DataFrame) -> dict:
    counts = {}
    for split, prior, value, n in (
        predictions.group_by("split", "prior_occurrence", "boolean_value").len()
        .sort("split", "prior_occurrence", "boolean_value").iter_rows()
    ):
        group = "prior_occurrence" if prior else "new_onset"
        entry = counts.setdefault(split, {}).setdefault(group, {"positive": 0, "negative": 0})
        entry["positive" if value else "negative"] += n
    return counts


def occurrence_cli(args) -> int:
    config = OccurrenceConfig(
        aggregator=args.aggregator, splits=parse_splits(args.splits), mode=args.mode,
        batch_size=args.batch_size or OccurrenceConfig.batch_size, precision=args.precision,
    ).validate()
    check_out(args.out, args.overwrite)
    task = load_task(args.task)
    model, vocab, run_config = load_next_visit_run(args.run, resolve_device(args.device))
    store = TokenStore(args.store)
    check_same_vocab(vocab, store.vocab, f"{args.run}/vocab.json", f"{args.store}/vocab.json")
    data = run_config.data
    max_window = int(data.context * data.max_window_fraction) if data.pack else data.context
    name = Path(args.run).resolve().name
    if config.aggregator != "sum_logits":
        name += f"[{config.aggregator}]"
    result = occurrence(model, vocab, store, task, config, max_window, model_name=name)
    info = {
        "model": name,
        "kind": ZERO_SHOT,
        "task": f"{task.name}_next_visit",
        "config": {"run": str(args.run), "store": str(args.store), "occurrence": asdict(config),
                   "window_tokens": max_window, "run_config": run_config.to_dict()},
        **result.info,
    }
    write_predictions(args.out, result.predictions, info, args.overwrite)
    p = result.predictions
    print(f"scored {p.height:,} visit boundaries of {p['subject_id'].n_unique():,} subjects "
          f"({int(p['prior_occurrence'].sum()):,} with a prior occurrence, {int(p['boolean_value'].sum()):,} with "
          f"the condition in the next visit)")
    print(f"wrote {Path(args.out) / 'predictions.parquet'}")
    return 0
