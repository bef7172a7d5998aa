"""Zero-shot incidence forecasting by horizon query, and next-visit occurrence scoring.

``nextvisit forecast`` (METHOD.md section 5): for each label row, the subject's MEDS events known at the
prediction time (``time <= prediction_time``, static rows included; the same rule as ``nextvisit label``),
minus the task's ``remove_from_inputs`` codes, are tokenized with the run's vocabulary; the model reads the
most recent history and one query SEP at (last visit day + H; for a prediction time after the last known
visit, prediction day + H); the risk is an aggregate of the logits of the condition's tokens at that SEP.
One forward pass per (history, horizon), no sampling.

``nextvisit occurrence`` (the inflation analysis, docs/interfaces.md section 6): at every visit boundary of
a token store split, P(any condition token in the next visit), the observed answer, and whether the subject
already had a condition token in an earlier visit (``prior_occurrence``).
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from nextvisit.errors import UserError
from nextvisit.model.run import autocast_for, check_precision, load_next_visit_run, resolve_device
from nextvisit.data.meds import data_files
from nextvisit.tokenize.store import NO_DAY, Subject, TokenStore, Vocabulary
from nextvisit.tasks import (
    DAYS_PER_YEAR, END_OF_DAY, SEX_PREFIX, CodeSet, Task, atomic_folder, check_out, label_counts, load_task, read_labels,
    read_labels_task,
)

AGGREGATORS = ("sum_logits", "noisy_or", "max", "logsumexp")
PREDICTION_COLUMNS = ("subject_id", "prediction_time", "boolean_value", "task", "horizon_days", "split",
                      "age_years", "sex")
PROBABILITY = "predicted_boolean_probability"
OCCURRENCE_MODES = ("windows", "recent")


@dataclass
class ForecastConfig:
    aggregator: str = "sum_logits"  # paper default: sigmoid(sum of the condition's logits)
    multi_horizon: bool = False  # average the risk over intermediate horizons up to H
    multi_horizon_step_days: int = 365  # intermediate horizons: every step up to H, and H itself
    batch_size: int = 64  # queries per forward pass
    splits: tuple[str, ...] = ("tuning", "held_out")  # label splits to score (zero-shot needs no train rows)
    histories_per_chunk: int = 2048  # label histories tokenized at once (bounds memory)
    # "auto": bfloat16 autocast where the device supports it, as in training (1.4-1.8x the float32 queries/s on
    # this CPU, docs/tasks.md); "fp32"; "bf16". The risks are aggregated in float32 either way.
    precision: str = "auto"

    def validate(self) -> "ForecastConfig":
        if self.aggregator not in AGGREGATORS:
            raise UserError(f"aggregator {self.aggregator!r} is unknown; choose one of {', '.join(AGGREGATORS)}")
        check_precision(self.precision)
        if self.multi_horizon_step_days < 1 or self.batch_size < 1 or self.histories_per_chunk < 1:
            raise UserError("multi_horizon_step_days, batch_size and histories_per_chunk must be at least 1")
        return self


# -- pure pieces ---------------------------------------------------------------------------------------------


def aggregate(logits: torch.Tensor, token_ids: torch.Tensor, aggregator: str = "sum_logits") -> torch.Tensor:
    """Risk [N] (float64) from logits [N, V] over the condition's token ids.

    - ``sum_logits``: sigmoid(sum of logits) (the paper's default)
    - ``noisy_or``: 1 - prod(1 - sigmoid(logit)), i.e. P(any token) if tokens were independent
    - ``max``: sigmoid(max logit)
    - ``logsumexp``: sigmoid(logsumexp of logits), a smooth max

    >>> z = torch.tensor([[0.0, 0.0, 5.0]])
    >>> round(float(aggregate(z, torch.tensor([0, 1]), "noisy_or")[0]), 4)
    0.75
    >>> round(float(aggregate(z, torch.tensor([0, 1]), "sum_logits")[0]), 4)
    0.5
    """
    z = logits.index_select(-1, token_ids.to(logits.device)).double()  # [N, K]
    if aggregator == "sum_logits":
        return torch.sigmoid(z.sum(-1))
    if aggregator == "noisy_or":
        # 1 - prod(sigmoid(-z)) computed in log space
        return -torch.expm1(torch.nn.functional.logsigmoid(-z).sum(-1))
    if aggregator == "max":
        return torch.sigmoid(z.max(-1).values)
    if aggregator == "logsumexp":
        return torch.sigmoid(torch.logsumexp(z, -1))
    raise UserError(f"aggregator {aggregator!r} is unknown; choose one of {', '.join(AGGREGATORS)}")


def query_horizons(horizon_days: int, multi_horizon: bool, step_days: int = 365) -> list[int]:
    """Horizons whose risks are averaged for horizon H.

    >>> query_horizons(1825, True)
    [365, 730, 1095, 1460, 1825]
    >>> query_horizons(1000, True)
    [365, 730, 1000]
    >>> query_horizons(730, False)
    [730]
    """
    if not multi_horizon:
        return [int(horizon_days)]
    steps = list(range(step_days, int(horizon_days), step_days))
    return steps + [int(horizon_days)]


def history_events(events: pl.DataFrame, histories: pl.DataFrame, remove_from_inputs: CodeSet | None = None) -> pl.DataFrame:
    """Events known at each history's prediction time, relabelled with the history's surrogate id.

    ``histories``: ``history_id, subject_id, prediction_time``. An event is known iff its time is null
    (static) or ``time <= prediction_time`` (events at exactly the prediction time are known). Codes of
    ``remove_from_inputs`` are dropped. Returns MEDS core columns with ``subject_id`` = ``history_id``,
    sorted by it and time.
    """
    known = (
        events.join(histories.select("history_id", "subject_id", "prediction_time"), on="subject_id", how="inner")
        .filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
    )
    if remove_from_inputs:
        known = known.filter(~remove_from_inputs.expr())
    return known.select(
        pl.col("history_id").cast(pl.Int64).alias("subject_id"), "time", "code", "numeric_value"
    ).sort("subject_id", "time", nulls_last=False, maintain_order=True)


def check_same_vocab(expected: Vocabulary, found: Vocabulary, expected_source: str, found_source: str) -> None:
    """A clear error when two vocabularies differ (ids would mean different tokens)."""
    if expected.tokens == found.tokens:
        return
    if len(expected) != len(found):
        detail = f"{len(found)} tokens vs {len(expected)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(expected.tokens, found.tokens)) if a != b)
        detail = f"token id {i} is {found.tokens[i]!r} there but {expected.tokens[i]!r} in the run"
    raise UserError(f"{found_source}: vocabulary does not match {expected_source} ({detail}); "
                    "tokenize with the run's vocabulary (`nextvisit tokenize --vocab-from RUN`)")


def condition_token_ids(task: Task, vocab: Vocabulary, source: str) -> torch.Tensor:
    ids = task.condition.token_ids(vocab)
    if len(ids) == 0:
        raise UserError(f"{source}: no token of task {task.name!r}'s condition (field 'condition') is in the "
                        "vocabulary, so the model cannot score it; use a task whose codes the training data held")
    return torch.from_numpy(ids)


@torch.no_grad()
def score_queries(model, subjects: Sequence[Subject], horizons: Sequence[int], token_ids: torch.Tensor,
                  aggregator: str, max_tokens: int, batch_size: int, device, progress=None,
                  autocast=nullcontext) -> np.ndarray:
    """Risk [len(subjects)] of the horizon query for each (subject history, horizon), in batches. The model
    runs under ``autocast()``; the logits are aggregated in float32."""
    from nextvisit.model.sequence import query_batch

    risks = np.empty(len(subjects), np.float64)
    for begin in range(0, len(subjects), batch_size):
        end = min(begin + batch_size, len(subjects))
        batch = query_batch(subjects[begin:end], np.asarray(horizons[begin:end], np.int64), max_tokens=max_tokens)
        with autocast():
            logits = model.query_logits(batch.to(device)).float()  # [n, V]
        risks[begin:end] = aggregate(logits, token_ids, aggregator).cpu().numpy()
        if progress is not None:
            progress.update(end - begin)
    return risks


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


# -- forecast ------------------------------------------------------------------------------------------------


@dataclass
class Forecast:
    predictions: pl.DataFrame  # PREDICTION_COLUMNS + PROBABILITY + model
    info: dict


def forecast(model, vocab: Vocabulary, tokenizer, max_tokens: int, meds_dir: Path, labels: pl.DataFrame,
             task: Task, config: ForecastConfig, model_name: str, progress: bool = True) -> Forecast:
    """Score the labelled rows of ``labels`` (of ``config.splits``) with the horizon query."""
    from tqdm import tqdm

    config.validate()
    token_ids = condition_token_ids(task, vocab, "the run's vocabulary")
    rows = labels.filter(pl.col("boolean_value").is_not_null() & pl.col("split").is_in(list(config.splits)))
    skipped = {
        "censored": labels.filter(pl.col("boolean_value").is_null()).height,
        "other_splits": labels.filter(pl.col("boolean_value").is_not_null() & ~pl.col("split").is_in(list(config.splits))).height,
    }
    rows = rows.with_row_index("row")
    histories = (
        rows.select("subject_id", "prediction_time").unique().sort("subject_id", "prediction_time")
        .with_row_index("history_id").with_columns(pl.col("history_id").cast(pl.Int64))
    )
    queries = rows.join(histories, on=["subject_id", "prediction_time"]).select("row", "history_id", "horizon_days")
    plan = [(int(r), int(h), q) for r, h, hd in queries.iter_rows()
            for q in query_horizons(hd, config.multi_horizon, config.multi_horizon_step_days)]
    wanted = set(histories["subject_id"].to_list())
    device = _model_device(model)
    autocast, precision = autocast_for(config.precision, device)
    risk_sum = np.zeros(rows.height, np.float64)
    risk_n = np.zeros(rows.height, np.int64)
    plan_by_history: dict[int, list[tuple[int, int]]] = {}
    for row, history, horizon in plan:
        plan_by_history.setdefault(history, []).append((row, horizon))

    ids = pl.Series(sorted(wanted), dtype=pl.Int64).implode()
    files = data_files(meds_dir)
    # fail before any work when labels name subjects the data does not hold (reads one column)
    present = pl.scan_parquet(files).select("subject_id").filter(pl.col("subject_id").is_in(ids)).unique().collect()
    missing = wanted - set(present["subject_id"].to_list())
    if missing:
        raise UserError(f"{meds_dir}: subject {min(missing)} of the labels is not in the data "
                        f"({len(missing)} such subject(s)); give the MEDS dataset the labels were made from")
    bar = tqdm(total=len(plan), desc=f"forecast {task.name}", unit="query", disable=not progress, file=sys.stderr)
    for path in files:
        events = (
            pl.scan_parquet(path).select("subject_id", "time", "code", "numeric_value")
            .filter(pl.col("subject_id").is_in(ids)).collect()
            .sort("subject_id", maintain_order=True)
        )
        if events.height == 0:
            continue
        shard_subjects = events["subject_id"].unique()
        shard_histories = histories.filter(pl.col("subject_id").is_in(shard_subjects.implode()))
        event_subjects = events["subject_id"]
        for begin in range(0, shard_histories.height, config.histories_per_chunk):
            chunk = shard_histories.slice(begin, config.histories_per_chunk)
            # histories are sorted by subject: the chunk's events are one contiguous slice
            first = event_subjects.search_sorted(chunk["subject_id"].min(), "left")
            last = event_subjects.search_sorted(chunk["subject_id"].max(), "right")
            known = history_events(events.slice(first, last - first), chunk, task.remove_from_inputs)
            try:
                tokenized = {s.subject_id: s for s in tokenizer.subjects(known)}
            except UserError as exc:
                raise UserError(f"{path}: tokenizing the histories of subjects {chunk['subject_id'].min()}.."
                                f"{chunk['subject_id'].max()} failed: {exc} (a 'subject' there is a history row "
                                "number)") from None
            subjects, horizons, targets = [], [], []
            for history_id, subject_id, prediction_time, prediction_day in chunk.select(
                    "history_id", "subject_id", "prediction_time",
                    pl.col("prediction_time").dt.date().cast(pl.Int32).alias("prediction_day")).iter_rows():
                subject = tokenized.get(history_id)
                if subject is None or subject.n_visits == 0:
                    raise UserError(f"subject {subject_id} at {prediction_time}: no visit is known at the prediction "
                                    "time, so there is no history to forecast from; check the labels' prediction_time")
                # The label counts onsets in (t, t + H]. When the last known visit is before the prediction day
                # (every event of that day was removed from the inputs or dropped), the query stays at t + H.
                gap = int(prediction_day) - int(subject.visit_days[-1])
                for row, horizon in plan_by_history.get(history_id, []):
                    subjects.append(subject)
                    horizons.append(horizon + gap)
                    targets.append(row)
            risks = score_queries(model, subjects, horizons, token_ids, config.aggregator, max_tokens,
                                  config.batch_size, device, progress=bar, autocast=autocast)
            np.add.at(risk_sum, np.asarray(targets, np.int64), risks)
            np.add.at(risk_n, np.asarray(targets, np.int64), 1)
    bar.close()
    predictions = rows.select(PREDICTION_COLUMNS).with_columns(
        pl.Series(PROBABILITY, risk_sum / np.maximum(risk_n, 1), dtype=pl.Float64),
        pl.lit(model_name).alias("model"),
    )
    info = {
        "label_counts": label_counts(labels),
        "rows_not_scored": skipped,
        "queries": len(plan),
        "precision": precision,
    }
    return Forecast(predictions=predictions, info=info)


def write_predictions(out: Path, predictions: pl.DataFrame, info: dict, overwrite: bool) -> Path:
    with atomic_folder(out, overwrite) as tmp:
        predictions.write_parquet(tmp / "predictions.parquet")
        (tmp / "info.json").write_text(json.dumps(info, indent=2, default=str))
    return Path(out)


def _splits_option(text: str) -> tuple[str, ...]:
    from nextvisit.tokenize.store import SPLITS

    splits = tuple(s.strip() for s in str(text).split(",") if s.strip())
    if splits == ("all",):
        return SPLITS
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"--splits {text!r}: expected a comma-separated list of {', '.join(SPLITS)} (or 'all')")
    return splits


def run_cli(args) -> int:
    from nextvisit.tokenize.tokenizer import Tokenizer

    config = ForecastConfig(
        aggregator=args.aggregator, multi_horizon=args.multi_horizon, batch_size=args.batch_size,
        splits=_splits_option(args.splits), precision=getattr(args, "precision", "auto"),
    ).validate()
    check_out(args.out, args.overwrite)
    labels = read_labels(args.labels)
    task = read_labels_task(args.labels)
    model, vocab, run_config = load_next_visit_run(args.run, resolve_device(args.device))
    tokenizer = Tokenizer.load(args.run)  # the run's own vocab.json, lab statistics and tokenizer.yaml
    # The history is already cut at each label's prediction time, so the tokenizer's guard against future
    # (placeholder) dates has nothing left to guard, and it would refuse date-shifted external cohorts
    # (MIMIC's records lie in the 22nd century).
    tokenizer = Tokenizer(replace(tokenizer.config, max_time=None), tokenizer.vocab, tokenizer.lab_stats)
    name = Path(args.run).resolve().name
    if config.aggregator != "sum_logits" or config.multi_horizon:
        name += f"[{config.aggregator}{'+multi_horizon' if config.multi_horizon else ''}]"
    result = forecast(model, vocab, tokenizer, run_config.data.query_max_tokens, args.meds_dir, labels, task,
                      config, model_name=name)
    info = {
        "model": name,
        "kind": "zero-shot",
        "task": task.name,
        "horizons_days": sorted(result.predictions["horizon_days"].unique().to_list()),
        "config": {"run": str(args.run), "meds_dir": str(args.meds_dir), "labels": str(args.labels),
                   "forecast": asdict(config), "run_config": run_config.to_dict(),
                   "history_rule": "events with time <= prediction_time (static rows included) are known"},
        **result.info,
    }
    write_predictions(args.out, result.predictions, info, args.overwrite)
    print(f"scored {result.predictions.height:,} label rows ({info['queries']:,} queries) of task {task.name} "
          f"with {name}; not scored: "
          + (", ".join(f"{reason} {n:,}" for reason, n in result.info["rows_not_scored"].items()) or "none"))
    print(f"wrote {Path(args.out) / 'predictions.parquet'}")
    return 0


# -- next-visit occurrence (inflation analysis) --------------------------------------------------------------


@dataclass
class OccurrenceConfig:
    aggregator: str = "sum_logits"
    splits: tuple[str, ...] = ("tuning", "held_out")
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
    device = _model_device(model)
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
        aggregator=getattr(args, "aggregator", "sum_logits"), splits=_splits_option(args.splits),
        mode=getattr(args, "mode", "windows"), batch_size=getattr(args, "batch_size", None) or OccurrenceConfig.batch_size,
        precision=getattr(args, "precision", "auto"),
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
        "kind": "zero-shot",
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
