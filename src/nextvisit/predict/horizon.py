"""``nextvisit forecast``: zero-shot incidence by the horizon query (METHOD.md section 5).

For each label row, the subject's MEDS events known at the prediction time (``nextvisit.data.histories``:
``time <= prediction_time``, static rows included; the same rule as ``nextvisit label``), minus the task's
``remove_from_inputs`` codes, are tokenized with the run's vocabulary; the model reads the most recent
history and one query SEP at (last visit day + H; for a prediction time after the last known visit,
prediction day + H); the risk is an aggregate of the logits of the condition's tokens at that SEP. One
forward pass per (history, horizon), no sampling.

The steps are apart so that other scorers (Monte Carlo sampling) reuse them: the rows to score
(``rows_to_score``), the query plan (``query_plan``), the cut histories tokenized chunk by chunk
(``tokenized_histories``), and the scoring of a batch of queries (``score_queries``).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import polars as pl
import torch

from nextvisit import compare
from nextvisit.artifacts.folders import check_out
from nextvisit.artifacts.predictions import CARRIED_LABEL_COLUMNS, PREDICTION_COLUMNS, PROBABILITY, ZERO_SHOT
from nextvisit.data.histories import HistoryChunk, add_counts, history_table, read_histories
from nextvisit.compare import ComparedModel, Labels
from nextvisit.errors import UserError
from nextvisit.model.run import NextVisitRun, autocast_for, check_precision
from nextvisit.model.sequence import HistorySummary, query_batch
from nextvisit.predict.scoring import (
    AGGREGATORS, SCORED_SPLITS, aggregate, condition_token_ids, model_device, parse_splits,
)
from nextvisit.tasks import Task, label_counts
from nextvisit.tokenize.store import SPLITS, Subject, Vocabulary

_EPOCH = date(1970, 1, 1)


@dataclass
class ForecastConfig:
    aggregator: str = "sum_logits"  # paper default: sigmoid(sum of the condition's logits)
    multi_horizon: bool = False  # average the risk over intermediate horizons up to H
    multi_horizon_step_days: int = 365  # intermediate horizons: every step up to H, and H itself
    batch_size: int = 64  # queries per forward pass
    splits: tuple[str, ...] = SCORED_SPLITS  # label splits to score (zero-shot needs no train rows)
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


@torch.no_grad()
def score_queries(model, subjects: Sequence[Subject], horizons: Sequence[int], token_ids: torch.Tensor,
                  aggregator: str, max_tokens: int, batch_size: int, device, progress=None,
                  autocast=nullcontext, summary: HistorySummary | None = None) -> np.ndarray:
    """Risk [len(subjects)] of the horizon query for each (subject history, horizon), in batches. The model
    runs under ``autocast()``; the logits are aggregated in float32. ``summary``: the run's history summary."""
    risks = np.empty(len(subjects), np.float64)
    for begin in range(0, len(subjects), batch_size):
        end = min(begin + batch_size, len(subjects))
        batch = query_batch(subjects[begin:end], np.asarray(horizons[begin:end], np.int64), max_tokens=max_tokens,
                            horizon_query=model.config.horizon_queries,  # a run trained with them asks them
                            summary=summary)
        with autocast():
            logits = model.query_logits(batch.to(device)).float()  # [n, V]
        risks[begin:end] = aggregate(logits, token_ids, aggregator).cpu().numpy()
        if progress is not None:
            progress.update(end - begin)
    return risks


@dataclass
class Forecast:
    predictions: pl.DataFrame  # PREDICTION_COLUMNS + PROBABILITY + model
    info: dict


def rows_to_score(labels: pl.DataFrame, splits: Sequence[str]) -> tuple[pl.DataFrame, dict]:
    """The labelled rows of ``splits`` with a ``row`` index, and the counts of rows not scored, by reason."""
    labelled = pl.col("boolean_value").is_not_null()
    in_splits = pl.col("split").is_in(list(splits))
    skipped = {"censored": labels.filter(~labelled).height, "other_splits": labels.filter(labelled & ~in_splits).height}
    return labels.filter(labelled & in_splits).with_row_index("row"), skipped


def query_plan(rows: pl.DataFrame, histories: pl.DataFrame, config: ForecastConfig) -> dict[int, list[tuple[int, int]]]:
    """Per history id, the (row, query horizon in days) pairs to score (several per row with multi-horizon)."""
    queries = rows.join(histories, on=["subject_id", "prediction_time"]).select("row", "history_id", "horizon_days")
    plan: dict[int, list[tuple[int, int]]] = {}
    for row, history, horizon_days in queries.iter_rows():
        for horizon in query_horizons(horizon_days, config.multi_horizon, config.multi_horizon_step_days):
            plan.setdefault(int(history), []).append((int(row), horizon))
    return plan


def tokenized_histories(chunks: Iterator[HistoryChunk], tokenizer,
                        no_visit: list | None = None) -> Iterator[tuple[HistoryChunk, list]]:
    """Per chunk of cut histories, one ``(history_id, subject_id, prediction_time, Subject)`` per history
    (``Subject.subject_id`` is the history id). A history with no visit known at its prediction time (labels
    from elsewhere, e.g. an ACES task, may predict before a subject's first dated event) has nothing to forecast
    from: with a ``no_visit`` list it is left out and its ``(history_id, subject_id, prediction_time)`` appended
    there, for the caller to count; without one it is an error naming the row."""
    for chunk in chunks:
        events = chunk.events.select(pl.col("history_id").alias("subject_id"), "time", "code", "numeric_value")
        try:
            tokenized = {s.subject_id: s for s in tokenizer.subjects(events)}
        except UserError as exc:
            raise UserError(f"{chunk.source}: tokenizing the histories of subjects {chunk.histories['subject_id'].min()}.."
                            f"{chunk.histories['subject_id'].max()} failed: {exc} (a 'subject' there is a history row "
                            "number)") from None
        out = []
        for history_id, subject_id, prediction_time in chunk.histories.select(
                "history_id", "subject_id", "prediction_time").iter_rows():
            subject = tokenized.get(history_id)
            if subject is None or subject.n_visits == 0:
                if no_visit is not None:
                    no_visit.append((history_id, subject_id, prediction_time))
                    continue
                raise UserError(f"subject {subject_id} at {prediction_time}: no visit is known at the prediction "
                                "time, so there is no history to forecast from; check the labels' prediction_time")
            out.append((history_id, subject_id, prediction_time, subject))
        yield chunk, out


def _chunk_queries(histories: list, plan: dict[int, list[tuple[int, int]]]) -> tuple[list[Subject], list[int], list[int]]:
    """(subjects, query horizons, label rows) of one chunk's queries."""
    subjects, horizons, targets = [], [], []
    for history_id, _, prediction_time, subject in histories:
        # The label counts onsets in (t, t + H]. When the last known visit is before the prediction day
        # (every event of that day was removed from the inputs or dropped), the query stays at t + H.
        prediction_day = (prediction_time.date() - _EPOCH).days
        gap = prediction_day - int(subject.visit_days[-1])
        for row, horizon in plan.get(history_id, []):
            subjects.append(subject)
            horizons.append(horizon + gap)
            targets.append(row)
    return subjects, horizons, targets


def forecast(model, vocab: Vocabulary, tokenizer, max_tokens: int, meds_dir: Path, labels: pl.DataFrame,
             task: Task, config: ForecastConfig, model_name: str, progress: bool = True,
             summary_tokens: int = 0) -> Forecast:
    """Score the labelled rows of ``labels`` (of ``config.splits``) with the horizon query; ``summary_tokens``
    is the run's ``data.history_summary_tokens``."""
    summary = HistorySummary.of(vocab, summary_tokens)
    from tqdm import tqdm

    config.validate()
    token_ids = condition_token_ids(task, vocab, "the run's vocabulary")
    rows, skipped = rows_to_score(labels, config.splits)
    histories = history_table(rows)
    plan = query_plan(rows, histories, config)
    device = model_device(model)
    autocast, precision = autocast_for(config.precision, device)
    risk_sum, risk_n = np.zeros(rows.height, np.float64), np.zeros(rows.height, np.int64)
    cut_counts: dict = {}
    n_queries = sum(len(q) for q in plan.values())
    chunks = read_histories(meds_dir, histories, task.remove_from_inputs, config.histories_per_chunk)
    bar = tqdm(total=n_queries, desc=f"forecast {task.name}", unit="query", disable=not progress, file=sys.stderr)
    no_visit: list = []
    for chunk, tokenized in tokenized_histories(chunks, tokenizer, no_visit):
        add_counts(cut_counts, chunk.counts)
        subjects, horizons, targets = _chunk_queries(tokenized, plan)
        risks = score_queries(model, subjects, horizons, token_ids, config.aggregator, max_tokens,
                              config.batch_size, device, progress=bar, autocast=autocast, summary=summary)
        np.add.at(risk_sum, np.asarray(targets, np.int64), risks)
        np.add.at(risk_n, np.asarray(targets, np.int64), 1)
    bar.close()
    # A row whose history holds no visit keeps its place with a null probability: `evaluate` counts and excludes
    # it (missing_score_rows_excluded), and it is counted here.
    risk = np.where(risk_n > 0, risk_sum / np.maximum(risk_n, 1), np.nan)
    unscored = no_visit_rows(rows, histories, no_visit)
    # In the rows' order (HorizonQueryModel.predict_proba reads the column as is), with the label columns the
    # driver carries.
    carried = [c for c in CARRIED_LABEL_COLUMNS if c in rows.columns]
    predictions = rows.select(*PREDICTION_COLUMNS).with_columns(
        pl.Series(PROBABILITY, risk, dtype=pl.Float64).fill_nan(None),
        pl.lit(model_name).alias("model"),
    ).with_columns(rows.select(carried))
    info = {"label_counts": label_counts(labels), "rows_not_scored": skipped, "queries": n_queries,
            "events_not_seen": cut_counts, "precision": precision, **unscored}
    return Forecast(predictions=predictions, info=info)


def no_visit_rows(rows: pl.DataFrame, histories: pl.DataFrame, no_visit: list) -> dict:
    """What ``info.json`` records of the label rows left unscored because no visit was known at their prediction
    time (``tokenized_histories``), with a warning on stderr naming the first; {} when there are none."""
    if not no_visit:
        return {}
    ids = [h for h, _, _ in no_visit]
    n_rows = rows.join(histories.filter(pl.col("history_id").is_in(ids)), on=["subject_id", "prediction_time"]).height
    _, subject_id, prediction_time = no_visit[0]
    print(f"nextvisit: warning: {n_rows:,} label row(s) of {len(no_visit):,} (subject, prediction time) pair(s) have "
          f"no visit known at the prediction time (first: subject {subject_id} at {prediction_time}), so nothing to "
          "forecast from: their probability is null and `evaluate` excludes and counts them", file=sys.stderr)
    return {"rows_without_history": {"rows": n_rows, "histories": len(no_visit),
                                     "first": {"subject_id": int(subject_id), "prediction_time": str(prediction_time)}}}


def model_name(run: Path, config: ForecastConfig) -> str:
    name = Path(run).resolve().name
    if config.aggregator != "sum_logits" or config.multi_horizon:
        name += f"[{config.aggregator}{'+multi_horizon' if config.multi_horizon else ''}]"
    return name


class HorizonQueryModel(ComparedModel):
    """The zero-shot next-visit model behind the compared-model interface (``nextvisit.compare``): no task
    labels reach it (``fit`` learns nothing); ``predict_proba`` is the horizon query."""

    kind = ZERO_SHOT
    needs_train_labels = False

    def __init__(self, run: Path | NextVisitRun, config: ForecastConfig, device: str | None = None,
                 progress: bool = True):
        """``run``: a run folder (loaded on ``device``) or a run loaded already."""
        loaded = NextVisitRun.of(run, device)
        self.run, self.config, self.progress = loaded.path, config.validate(), progress
        self.model, self.vocab, self.run_config = loaded.model, loaded.vocab, loaded.config
        self.tokenizer = loaded.tokenizer  # the run's own lab statistics and tokenizer.yaml
        self.name = model_name(loaded.path, config)
        self.scored: dict = {}

    def read(self, meds_dir: Path, labels: Labels):
        return Path(meds_dir), labels.task

    def score(self, meds_dir: Path, labels: pl.DataFrame, task: Task, splits: Sequence[str]) -> Forecast:
        """``forecast`` with this run: the labelled rows of ``splits`` of ``labels`` (label columns,
        docs/interfaces.md §5; ``age_years`` and ``sex`` may be null)."""
        return forecast(self.model, self.vocab, self.tokenizer, self.run_config.data.query_max_tokens, meds_dir,
                        labels, task, replace(self.config, splits=tuple(splits)), self.name, progress=self.progress,
                        summary_tokens=self.run_config.data.history_summary_tokens)

    def predict_proba(self, inputs, rows: pl.DataFrame) -> np.ndarray:
        meds_dir, task = inputs
        result = self.score(meds_dir, rows.drop("row", "history_id"), task, SPLITS)
        self.scored = {k: v for k, v in result.info.items() if k not in ("label_counts", "rows_not_scored")}
        self.scored["horizons_days"] = sorted(rows["horizon_days"].unique().to_list())
        return result.predictions[PROBABILITY].to_numpy()

    def info(self) -> dict:
        return {"config": {"run": str(self.run), "forecast": asdict(self.config),
                                                  "run_config": self.run_config.to_dict(),
                                                  "history_rule": "events with time <= prediction_time (static "
                                                                  "rows included) are known"},
                **self.scored}


def run_cli(args) -> int:
    config = ForecastConfig(
        aggregator=args.aggregator, multi_horizon=args.multi_horizon, batch_size=args.batch_size,
        splits=parse_splits(args.splits), precision=args.precision,
    ).validate()
    check_out(args.out, args.overwrite)
    model = HorizonQueryModel(args.run, config, args.device)
    compare.run(model, args.meds_dir, args.labels, args.out, args.overwrite, splits=config.splits)
    print(f"scored {model.scored['queries']:,} queries of the label rows of splits {', '.join(config.splits)} "
          f"with {model.name}")
    print(f"wrote {Path(args.out) / 'predictions.parquet'}")
    return 0
