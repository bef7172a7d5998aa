"""``nextvisit occurrence``, the inflation analysis (docs/interfaces.md section 6): at the visit boundaries of
a token store split, P(any condition token in the next visit), the observed answer, and whether the subject
already had a condition token in an earlier visit (``prior_occurrence``). Recurring codes make "all
occurrences" easy; the new onsets are the question that matters (METHOD.md).

Which boundaries are scored (``OccurrenceConfig.cohort``):

- ``"task"`` (default): the task's landmark cohort, so the figures stand beside the horizon tasks'. The
  boundary after visit i is scored when the day of visit i is one of the task's landmarks under its
  ``LandmarkRule`` (``nextvisit.tasks``, module docstring): a known birth day, ``min_history_days`` since the
  subject's first visit, age at least ``min_age_years`` at the end of the day, chosen by the task's own seeded
  draw (``sampled_landmarks``) and cap (``first_per_subject``: the first ``max_per_subject`` sampled visits).
  The one step left out is the exclusion of prevalent subjects: their boundaries are the recurrences
  (``prior_occurrence``), and the new-onset rows are exactly the task's landmarks that have a next visit (a
  prevalent visit always comes after every visit without the condition, so it never takes a cap place
  before one). Visits are the store's (the tokenized MEDS visits, before ``remove_from_inputs``); a
  subject's visits end at death, so the task's death step never applies to a boundary.
- ``"eligible"``: the task's birth, history and age rules on every boundary, without its draw and cap. A
  subject's next-visit onset is one boundary, so the task's draw (``sample_probability``) keeps only that
  share of the onsets; this cohort keeps them all, at the price of not being the task's landmark set.
- ``"all"``: every visit boundary at every age.

info.json counts every boundary of the split (``cohort.boundaries``: total = scored + excluded, by
``BOUNDARY_REASONS``), and the chosen landmarks with no boundary after them (``landmarks_without_boundary``:
the subject's last visit, or a visit left empty by ``remove_from_inputs``).

The age-and-sex reference (``age_sex_reference``): a logistic regression of the label on age (a B-spline
basis) and sex, fit on the train split's new-onset boundaries of the same cohort only, scoring the same rows
as the model; written as its own predictions folder (model ``age_sex_reference``, kind ``count-features``)
so the evaluation's inflation table shows how much of each figure age and sex alone reach.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from nextvisit.artifacts.predictions import (
    COUNT_FEATURES, PREDICTION_COLUMNS, PROBABILITY, SORT_KEYS, ZERO_SHOT, write_predictions,
)
from nextvisit.artifacts.folders import check_out
from nextvisit.errors import UserError
from nextvisit.model.run import autocast_for, check_precision, load_next_visit_run, resolve_device
from nextvisit.predict.horizon import Forecast
from nextvisit.predict.scoring import (
    AGGREGATORS, SCORED_SPLITS, aggregate, check_same_vocab, condition_token_ids, model_device, parse_splits,
)
from nextvisit.tasks import SEX_PREFIX, LandmarkRule, Task, first_per_subject, load_task, sampled_landmarks
from nextvisit.tokenize.store import NO_DAY, Subject, TokenStore, Vocabulary
from nextvisit.units import DAYS_PER_YEAR, END_OF_DAY, US_PER_DAY

OCCURRENCE_MODES = ("windows", "recent")
COHORTS = ("task", "eligible", "all")
# Why a visit boundary is not scored, in the order the rule applies them (module docstring). The first three
# are the task's own reason names (nextvisit.tasks SUBJECT_REASONS, CANDIDATE_REASONS).
BOUNDARY_REASONS = (
    "no_birth_date",  # no birth day in the store: no age, so no landmark
    "insufficient_history",  # fewer than min_history_days since the subject's first visit
    "too_young",  # younger than min_age_years at the end of the visit day
    "not_sampled",  # the task's seeded draw (sample_probability) left the visit out
    "beyond_max_per_subject",  # sampled, but after the subject's first max_per_subject sampled visits
    "outside_recent_window",  # mode "recent": before the subject's most recent window
)
CHOSEN = -1  # a boundary's reason code when it is scored
REFERENCE_NAME = "age_sex_reference"
TRAIN = "train"


@dataclass
class OccurrenceConfig:
    aggregator: str = "sum_logits"
    splits: tuple[str, ...] = SCORED_SPLITS
    # "task": the task's landmark cohort; "eligible": its age and history rules without its sampling; "all":
    # every visit boundary at every age (module docstring)
    cohort: str = "task"
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
        if self.cohort not in COHORTS:
            raise UserError(f"cohort {self.cohort!r} is unknown; choose one of {', '.join(COHORTS)}")
        return self


@dataclass
class AgeSexReferenceConfig:
    """The age-and-sex reference: a logistic regression on a B-spline basis of age and one-hot sex."""

    spline_knots: int = 5  # knots at quantiles of the train ages: enough for a rate that climbs with age
    spline_degree: int = 3  # cubic
    c: float = 1.0  # inverse L2 strength (scikit-learn's default; a handful of features on thousands of rows)
    max_iter: int = 1000


# -- which boundaries ---------------------------------------------------------------------------------------


def _age_years(days: np.ndarray, birth_days: np.ndarray) -> np.ndarray:
    """Age at the end of each day (NaN without a birth day), as the task computes it for a birth at midnight."""
    known = birth_days != NO_DAY
    span_us = (days.astype(np.int64) + 1 - np.where(known, birth_days, days).astype(np.int64)) * US_PER_DAY - 1
    return np.where(known, span_us / (US_PER_DAY * DAYS_PER_YEAR), np.nan)


def landmark_reasons(subjects: list[Subject], rule: LandmarkRule, sample: bool = True) -> list[np.ndarray]:
    """Per subject (as stored), per visit: ``CHOSEN`` when the visit is one of the task's landmarks with the
    prevalence step left out (module docstring; without ``sample``, only the birth, history and age steps),
    else the index in ``BOUNDARY_REASONS`` of the first step it fails."""
    n_visits = np.array([s.n_visits for s in subjects], np.int64)
    owner = np.repeat(np.arange(len(subjects)), n_visits)
    if not len(owner):
        return [np.zeros(0, np.int8) for _ in subjects]
    days = np.concatenate([s.visit_days for s in subjects]).astype(np.int64)
    first_day = np.array([s.visit_days[0] if s.n_visits else 0 for s in subjects], np.int64)[owner]
    birth = np.array([s.birth_day for s in subjects], np.int64)[owner]
    ids = np.array([s.subject_id for s in subjects], np.int64)[owner]
    steps = [
        birth != NO_DAY,
        days - first_day >= rule.min_history_days,
        np.nan_to_num(_age_years(days, birth), nan=-1.0) >= rule.min_age_years,
    ]
    if sample:
        steps.append(sampled_landmarks(rule, ids, days))
    reason = np.full(len(days), CHOSEN, np.int8)
    passed = np.ones(len(days), bool)
    for i, step in enumerate(steps):
        reason[passed & ~step] = i
        passed &= step
    if sample:
        sampled = pl.DataFrame({"row": np.flatnonzero(passed), "subject_id": ids[passed], "day": days[passed]})
        capped = sampled.filter(~first_per_subject(rule))["row"].to_numpy()
        reason[capped] = BOUNDARY_REASONS.index("beyond_max_per_subject")
    return np.split(reason, np.cumsum(n_visits)[:-1])


def _boundary_reasons(stored: Subject, scored: Subject, visit_reasons: np.ndarray | None) -> np.ndarray:
    """Reason codes [n_visits - 1] of the scored subject's boundaries (index v - 1: the boundary before visit
    v), from the reasons of the stored visits (``None``: cohort "all", every boundary chosen)."""
    n = max(scored.n_visits - 1, 0)
    if visit_reasons is None:
        return np.full(n, CHOSEN, np.int8)
    # remove_from_inputs only removes visits, so every scored visit day is a stored one
    return visit_reasons[np.searchsorted(stored.visit_days, scored.visit_days[:n])]


@dataclass
class _Inputs:
    """What the vocabulary and the task say about each token id [V]."""

    token_ids: torch.Tensor
    is_condition: np.ndarray
    drop: np.ndarray
    is_age: np.ndarray
    is_demographic: np.ndarray

    @classmethod
    def of(cls, task: Task, vocab: Vocabulary, vocab_path: str) -> "_Inputs":
        token_ids = condition_token_ids(task, vocab, vocab_path)
        is_condition = np.zeros(len(vocab), bool)
        is_condition[token_ids.numpy()] = True
        drop = np.zeros(len(vocab), bool)
        drop[task.remove_from_inputs.token_ids(vocab, kinds=tuple(set(vocab.kinds)))] = True
        kinds = np.array(vocab.kinds)
        return cls(token_ids=token_ids, is_condition=is_condition, drop=drop & ~is_condition,
                   is_age=kinds == "age", is_demographic=kinds == "demographic")


class _Tally:
    """Counts of one split's boundaries by reason, and of the subjects and visits that give none."""

    def __init__(self):
        self.reasons = np.zeros(len(BOUNDARY_REASONS), np.int64)
        self.scored = 0
        self.landmarks_without_boundary = 0
        self.removed_empty_visits = 0
        self.without_boundary = 0

    def add(self, reasons: list[np.ndarray]) -> None:
        flat = np.concatenate(reasons) if reasons else np.zeros(0, np.int8)
        self.scored += int((flat == CHOSEN).sum())
        self.reasons += np.bincount(flat[flat != CHOSEN], minlength=len(BOUNDARY_REASONS))

    def boundaries(self) -> dict:
        excluded = {r: int(n) for r, n in zip(BOUNDARY_REASONS, self.reasons)}
        return {"total": self.scored + sum(excluded.values()), "scored": self.scored, "excluded": excluded}


def _chunks(store: TokenStore, split_name: str, task: Task, cohort: str, inputs: _Inputs, subjects_per_chunk: int,
            tally: _Tally, progress: bool):
    """Per chunk of a split's subjects: the subjects as scored (``remove_from_inputs`` tokens dropped) and the
    reason codes of their boundaries (``_boundary_reasons``), counted into ``tally``."""
    from tqdm import tqdm

    split = store.split(split_name)
    bar = tqdm(total=len(split), desc=f"occurrence {split_name}", unit="subject", disable=not progress,
               file=sys.stderr)
    for begin in range(0, len(split), subjects_per_chunk):
        stored = [split.subject(i) for i in range(begin, min(begin + subjects_per_chunk, len(split)))]
        subjects = [_drop_tokens(s, inputs.drop, inputs.is_age, inputs.is_demographic) for s in stored]
        visit_reasons = ([None] * len(stored) if cohort == "all"
                         else landmark_reasons(stored, task.landmarks, sample=cohort == "task"))
        reasons = [_boundary_reasons(s, t, r) for s, t, r in zip(stored, subjects, visit_reasons)]
        tally.removed_empty_visits += sum(s.n_visits - t.n_visits for s, t in zip(stored, subjects))
        tally.without_boundary += sum(1 for t in subjects if t.n_visits < 2)
        if cohort != "all":
            tally.landmarks_without_boundary += sum(
                int((v == CHOSEN).sum() - (b == CHOSEN).sum()) for v, b in zip(visit_reasons, reasons))
        yield subjects, reasons
        bar.update(len(stored))
    bar.close()


def _cohort_info(task: Task, cohort: str, tallies: dict[str, _Tally]) -> dict:
    info = {"rule": cohort, "boundaries": {split: t.boundaries() for split, t in tallies.items()}}
    if cohort != "all":
        info["landmarks"] = asdict(task.landmarks)
        info["landmarks_without_boundary"] = {split: t.landmarks_without_boundary for split, t in tallies.items()}
    return info


# -- the model's scores ---------------------------------------------------------------------------------------


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
               model_name: str, progress: bool = True, summary_tokens: int = 0) -> Forecast:
    """Rows per scored visit boundary: P(next visit holds a condition token), the answer and
    ``prior_occurrence``; info.json's counts of every boundary left out, by reason (module docstring)."""
    from nextvisit.model.sequence import HistorySummary, subject_windows, windows_batch

    config.validate()
    inputs = _Inputs.of(task, vocab, f"{store.path}/vocab.json")
    supervised = vocab.supervised_mask()
    summary = HistorySummary.of(vocab, summary_tokens)  # the run's own inputs (data.history_summary_tokens)
    device = model_device(model)
    autocast, precision = autocast_for(config.precision, device)
    parts, tallies = [], {}
    for split_name in config.splits:
        tally = tallies[split_name] = _Tally()
        for subjects, reasons in _chunks(store, split_name, task, config.cohort, inputs, config.subjects_per_chunk,
                                         tally, progress):
            windows = subject_windows(subjects, max_window)
            if config.mode == "recent":
                last = {}
                for w in windows:
                    last[w.subject] = w
                windows = list(last.values())
                for w in windows:  # boundaries before the window's first predicted visit
                    before = reasons[w.subject][: w.start]
                    before[before == CHOSEN] = BOUNDARY_REASONS.index("outside_recent_window")
            tally.add(reasons)
            # a window predicts visits start+1 .. stop-1: boundaries start .. stop-2
            windows = [w for w in windows if (reasons[w.subject][w.start : w.stop - 1] == CHOSEN).any()]
            for w0 in range(0, len(windows), config.batch_size):
                chunk = windows[w0 : w0 + config.batch_size]
                batch = windows_batch(subjects, chunk, supervised, max_window, summary=summary,
                                      recurrence=model.config.recurrence_embedding)
                with autocast():
                    logits = model.query_logits(batch.to(device)).float()
                risk = aggregate(logits, inputs.token_ids, config.aggregator).cpu().numpy()
                visit = batch.sep_visit.numpy()
                subject_index = np.array([chunk[k].subject for k in batch.sep_window.numpy()], np.int64)
                keep = np.array([reasons[s][v - 1] == CHOSEN for s, v in zip(subject_index, visit)], bool)
                parts.append(_occurrence_rows(subjects, subject_index[keep], visit[keep], risk[keep],
                                              inputs.is_condition, split_name, vocab))
    return Forecast(predictions=_predictions(parts, task, model_name),
                    info=_info(parts, task, config.cohort, tallies, precision=precision))


def boundary_rows(vocab: Vocabulary, store: TokenStore, task: Task, config: OccurrenceConfig, split_name: str,
                  progress: bool = True) -> tuple[pl.DataFrame, dict]:
    """The rows of every boundary of ``split_name`` that ``config.cohort`` chooses, without a model (risk
    NaN), and their info (as ``occurrence``'s): the rows the age-sex reference is fit on."""
    config.validate()
    inputs = _Inputs.of(task, vocab, f"{store.path}/vocab.json")
    tally, parts = _Tally(), []
    for subjects, reasons in _chunks(store, split_name, task, config.cohort, inputs, config.subjects_per_chunk,
                                     tally, progress):
        tally.add(reasons)
        pairs = [(s, b + 1) for s, r in enumerate(reasons) for b in np.flatnonzero(r == CHOSEN)]
        subject_index = np.array([s for s, _ in pairs], np.int64)
        visit = np.array([v for _, v in pairs], np.int64)
        parts.append(_occurrence_rows(subjects, subject_index, visit, np.full(len(pairs), np.nan),
                                      inputs.is_condition, split_name, vocab))
    return _predictions(parts, task, REFERENCE_NAME), _info(parts, task, config.cohort, {split_name: tally})


def _predictions(parts: list[pl.DataFrame], task: Task, model_name: str) -> pl.DataFrame:
    frame = pl.concat(parts) if parts else pl.DataFrame(schema=_OCCURRENCE_SCHEMA)
    return frame.with_columns(
        task=pl.lit(f"{task.name}_next_visit"), horizon_days=pl.lit(0, dtype=pl.Int32), model=pl.lit(model_name)
    ).select(*PREDICTION_COLUMNS, PROBABILITY, "model", "prior_occurrence").sort(*SORT_KEYS)


def _info(parts, task: Task, cohort: str, tallies: dict[str, _Tally], **extra) -> dict:
    frame = pl.concat(parts) if parts else pl.DataFrame(schema=_OCCURRENCE_SCHEMA)
    return {
        "label_counts": _occurrence_counts(frame),
        "cohort": _cohort_info(task, cohort, tallies),
        "visits_left_empty_by_remove_from_inputs": sum(t.removed_empty_visits for t in tallies.values()),
        "subjects_without_visit_boundary": sum(t.without_boundary for t in tallies.values()),
        **extra,
    }


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
    sex = [_sex_of(subjects[s], vocab) for s in subject_index]
    frame = pl.DataFrame({
        "subject_id": np.array([subjects[s].subject_id for s in subject_index], np.int64),
        "day": before_day.astype(np.int32),
        "boolean_value": label,
        "split": [split_name] * len(label),
        "age_years": _age_years(before_day, birth),
        "sex": pl.Series(sex, dtype=pl.String),
        PROBABILITY: np.asarray(risk, np.float64),
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


# -- the age-and-sex reference ----------------------------------------------------------------------------------


def age_sex_reference(rows: pl.DataFrame, config: AgeSexReferenceConfig | None = None,
                      source: str = "rows") -> tuple[np.ndarray, dict]:
    """P(condition in the next visit | age, sex) for every row of ``rows`` (occurrence rows of any splits),
    from a logistic regression fit on the train split's new-onset rows only (``prior_occurrence`` false: the
    question the reference is for; recurrences would fold the prevalence by age into its curve). Returns the
    risks and what the fit rested on. A missing age takes the train median, a missing sex its own category."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, SplineTransformer

    config = config or AgeSexReferenceConfig()
    age = rows["age_years"].cast(pl.Float64).fill_null(np.nan).to_numpy().reshape(-1, 1)
    sex = rows["sex"].cast(pl.String).fill_null("unknown").to_numpy().reshape(-1, 1)
    fit = ((rows["split"] == TRAIN) & ~rows["prior_occurrence"]).to_numpy()
    labels = rows["boolean_value"].to_numpy()[fit].astype(bool)
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise UserError(f"{source}: the age-sex reference is fit on the train split's new-onset boundaries, and "
                        f"those {len(labels):,} hold {int(labels.sum()):,} with the condition in the next visit; "
                        "it needs both kinds (score without --reference-out, or use a store with more train subjects)")
    age_basis = make_pipeline(
        SimpleImputer(strategy="median"),
        SplineTransformer(n_knots=config.spline_knots, degree=config.spline_degree, knots="quantile"),
    ).fit(age[fit])
    sex_basis = OneHotEncoder(handle_unknown="ignore", sparse_output=False).fit(sex[fit])

    def design(where):
        return np.hstack([age_basis.transform(age[where]), sex_basis.transform(sex[where])])

    model = LogisticRegression(C=config.c, max_iter=config.max_iter).fit(design(fit), labels)
    risk = model.predict_proba(design(slice(None)))[:, 1]
    return risk, {"fit_split": TRAIN, "fit_rows": "new onsets (prior_occurrence false)", "rows": len(labels),
                  "positives": int(labels.sum()), "reference": asdict(config)}


def reference_predictions(vocab: Vocabulary, store: TokenStore, task: Task, config: OccurrenceConfig,
                          scored: pl.DataFrame, reference: AgeSexReferenceConfig | None = None,
                          progress: bool = True) -> Forecast:
    """The age-sex reference's predictions on the model's ``scored`` rows, fit on the train split's boundaries
    of the same cohort (the scored train rows when train was scored, else read from the store)."""
    if TRAIN in config.splits:
        train, train_info = scored.filter(pl.col("split") == TRAIN), {}
    else:
        train, train_info = boundary_rows(vocab, store, task, config, TRAIN, progress)
    rows = pl.concat([train.filter(pl.col("split") == TRAIN), scored.filter(pl.col("split") != TRAIN)])
    risk, fit = age_sex_reference(rows, reference, source=f"{store.path}/{TRAIN}")
    predictions = rows.with_columns(pl.Series(PROBABILITY, risk), model=pl.lit(REFERENCE_NAME))
    predictions = predictions.filter(pl.col("split").is_in(list(config.splits))).sort(*SORT_KEYS)
    return Forecast(predictions=predictions, info={"fit": {**fit, "cohort": train_info.get("cohort")}})


# -- command line -----------------------------------------------------------------------------------------------


def occurrence_cli(args) -> int:
    config = OccurrenceConfig(
        aggregator=args.aggregator, splits=parse_splits(args.splits), cohort=args.cohort, mode=args.mode,
        batch_size=args.batch_size or OccurrenceConfig.batch_size, precision=args.precision,
    ).validate()
    check_out(args.out, args.overwrite)
    if args.reference_out is not None:
        if Path(args.reference_out).resolve() == Path(args.out).resolve():
            raise UserError(f"--reference-out {args.reference_out}: the same folder as --out; one folder per model")
        check_out(args.reference_out, args.overwrite)
    task = load_task(args.task)
    model, vocab, run_config = load_next_visit_run(args.run, resolve_device(args.device))
    store = TokenStore(args.store)
    check_same_vocab(vocab, store.vocab, f"{args.run}/vocab.json", f"{args.store}/vocab.json")
    data = run_config.data
    max_window = int(data.context * data.max_window_fraction) if data.pack else data.context
    name = Path(args.run).resolve().name
    if config.aggregator != "sum_logits":
        name += f"[{config.aggregator}]"
    result = occurrence(model, vocab, store, task, config, max_window, model_name=name,
                        summary_tokens=data.history_summary_tokens)
    reference = None
    if args.reference_out is not None:  # fit before writing anything, so a failed fit leaves no folder
        reference = reference_predictions(vocab, store, task, config, result.predictions)
    inputs = {"store": str(args.store), "occurrence": asdict(config)}
    info = {
        "model": name,
        "kind": ZERO_SHOT,
        "task": f"{task.name}_next_visit",
        "config": {"run": str(args.run), **inputs, "window_tokens": max_window, "run_config": run_config.to_dict()},
        **result.info,
    }
    write_predictions(args.out, result.predictions, info, args.overwrite)
    p = result.predictions
    print(f"scored {p.height:,} visit boundaries of {p['subject_id'].n_unique():,} subjects "
          f"({int(p['prior_occurrence'].sum()):,} with a prior occurrence, {int(p['boolean_value'].sum()):,} with "
          f"the condition in the next visit); cohort {config.cohort}: {_excluded_line(result.info['cohort'])}")
    print(f"wrote {Path(args.out) / 'predictions.parquet'}")
    if reference is not None:
        reference_info = {
            "model": REFERENCE_NAME,
            "kind": COUNT_FEATURES,
            "task": f"{task.name}_next_visit",
            "config": {**inputs, **reference.info},
            **{**result.info, "label_counts": _occurrence_counts(reference.predictions)},
        }
        reference_info.pop("precision", None)
        write_predictions(args.reference_out, reference.predictions, reference_info, args.overwrite)
        fit = reference.info["fit"]
        print(f"age-sex reference fit on {fit['rows']:,} train new-onset boundaries ({fit['positives']:,} with the "
              f"condition); wrote {Path(args.reference_out) / 'predictions.parquet'}")
    return 0


def _excluded_line(cohort: dict) -> str:
    parts = []
    for split, b in cohort["boundaries"].items():
        excluded = ", ".join(f"{reason} {n:,}" for reason, n in b["excluded"].items() if n) or "none excluded"
        parts.append(f"{split} {b['scored']:,} of {b['total']:,} boundaries ({excluded})")
    return "; ".join(parts)
