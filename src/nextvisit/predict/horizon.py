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
from nextvisit.model.distributed import Distributed, init_distributed, shutdown
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
    # the most recent history tokens before the query (None: the run's data.query_max_tokens)
    history_tokens: int | None = None

    def validate(self) -> "ForecastConfig":
        if self.aggregator not in AGGREGATORS:
            raise UserError(f"aggregator {self.aggregator!r} is unknown; choose one of {', '.join(AGGREGATORS)}")
        check_precision(self.precision)
        if self.multi_horizon_step_days < 1 or self.batch_size < 1 or self.histories_per_chunk < 1:
            raise UserError("multi_horizon_step_days, batch_size and histories_per_chunk must be at least 1")
        if self.history_tokens is not None and self.history_tokens < 2:
            raise UserError(f"history tokens {self.history_tokens}: must be at least 2")
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
                            summary=summary, recurrence=model.config.recurrence_embedding)
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


def tokenize_histories(chunk: HistoryChunk, tokenizer, history_ids=None, no_visit: list | None = None) -> list:
    """One ``(history_id, subject_id, prediction_time, Subject)`` per history of ``chunk`` (of those in
    ``history_ids`` when given), in the chunk's order (``Subject.subject_id`` is the history id). A history with no
    visit known at its prediction time (labels from elsewhere, e.g. an ACES task, may predict before a subject's
    first dated event) has nothing to forecast from: with a ``no_visit`` list it is left out and its
    ``(history_id, subject_id, prediction_time)`` appended there, for the caller to count; without one it is an
    error naming the row."""
    histories = chunk.histories.select("history_id", "subject_id", "prediction_time")
    events = chunk.events
    if history_ids is not None:
        wanted = pl.Series(sorted(history_ids), dtype=pl.Int64).implode()
        histories = histories.filter(pl.col("history_id").is_in(wanted))
        events = events.filter(pl.col("history_id").is_in(wanted))
    events = events.select(pl.col("history_id").alias("subject_id"), "time", "code", "numeric_value")
    try:
        tokenized = {s.subject_id: s for s in tokenizer.subjects(events)}
    except UserError as exc:
        raise UserError(f"{chunk.source}: tokenizing the histories of subjects {chunk.histories['subject_id'].min()}.."
                        f"{chunk.histories['subject_id'].max()} failed: {exc} (a 'subject' there is a history row "
                        "number)") from None
    out = []
    for history_id, subject_id, prediction_time in histories.iter_rows():
        subject = tokenized.get(history_id)
        if subject is None or subject.n_visits == 0:
            if no_visit is not None:
                no_visit.append((history_id, subject_id, prediction_time))
                continue
            raise UserError(f"subject {subject_id} at {prediction_time}: no visit is known at the prediction "
                            "time, so there is no history to forecast from; check the labels' prediction_time")
        out.append((history_id, subject_id, prediction_time, subject))
    return out


def tokenized_histories(chunks: Iterator[HistoryChunk], tokenizer,
                        no_visit: list | None = None) -> Iterator[tuple[HistoryChunk, list]]:
    """Per chunk of cut histories, its histories tokenized (``tokenize_histories``)."""
    for chunk in chunks:
        yield chunk, tokenize_histories(chunk, tokenizer, no_visit=no_visit)


def _chunk_queries(histories: pl.DataFrame, plan: dict[int, list[tuple[int, int]]]) -> tuple[np.ndarray, ...]:
    """(history id, label row, horizon in days) of each query of a chunk's ``histories``, in the order they are
    scored."""
    queries = [(history_id, row, horizon) for history_id in histories["history_id"].to_list()
               for row, horizon in plan.get(history_id, [])]
    if not queries:
        return (np.empty(0, np.int64),) * 3
    return tuple(np.asarray(column, np.int64) for column in zip(*queries))


def _query_inputs(tokenized: dict, history_ids: np.ndarray, horizons: np.ndarray) -> tuple[list[Subject], list[int]]:
    """(subjects, query horizons from each history's last known visit) of a batch of queries."""
    subjects, days = [], []
    for history_id, horizon in zip(history_ids.tolist(), horizons.tolist()):
        _, _, prediction_time, subject = tokenized[history_id]
        # The label counts onsets in (t, t + H]. When the last known visit is before the prediction day
        # (every event of that day was removed from the inputs or dropped), the query stays at t + H.
        prediction_day = (prediction_time.date() - _EPOCH).days
        subjects.append(subject)
        days.append(horizon + prediction_day - int(subject.visit_days[-1]))
    return subjects, days


def forecast(model, vocab: Vocabulary, tokenizer, max_tokens: int, meds_dir: Path, labels: pl.DataFrame,
             task: Task, config: ForecastConfig, model_name: str, progress: bool = True,
             summary_tokens: int = 0, dist: Distributed | None = None) -> Forecast:
    """Score the labelled rows of ``labels`` (of ``config.splits``) with the horizon query; ``summary_tokens``
    is the run's ``data.history_summary_tokens``.

    Under torchrun (``dist``) the batches of queries are dealt out to the processes in turn: every process reads
    and cuts every chunk of histories, tokenizes only the histories of its own batches and scores those batches,
    the same batches one process scores, so the risks are the same bit for bit; each process returns them all."""
    summary = HistorySummary.of(vocab, summary_tokens)
    from tqdm import tqdm

    config.validate()
    dist = dist or Distributed()
    token_ids = condition_token_ids(task, vocab, "the run's vocabulary")
    rows, skipped = rows_to_score(labels, config.splits)
    histories = history_table(rows)
    plan = query_plan(rows, histories, config)
    device = model_device(model)
    autocast, precision = autocast_for(config.precision, device)
    cut_counts: dict = {}
    n_queries = sum(len(q) for q in plan.values())
    chunks = read_histories(meds_dir, histories, task.remove_from_inputs, config.histories_per_chunk)
    bar = tqdm(total=None if dist.active else n_queries, desc=f"forecast {task.name}", unit="query",
               disable=not (progress and dist.main), file=sys.stderr)
    # per chunk: the label row, history and risk of each query (0 where another process scores it; NaN where its
    # history has no visit, so the sum over processes stays NaN there)
    query_rows, query_histories, query_risks = [], [], []
    batches_dealt, scored_here = 0, 0
    with dist.together():  # a history that fails here stops every process, not only this one
        for chunk in chunks:
            add_counts(cut_counts, chunk.counts)
            history_ids, targets, horizons = _chunk_queries(chunk.histories, plan)
            risks = np.zeros(len(targets), np.float64)
            starts = range(0, len(targets), config.batch_size)
            mine = [begin for k, begin in enumerate(starts, batches_dealt) if k % dist.world == dist.rank]
            batches_dealt += len(starts)
            if mine:
                wanted = set()
                for begin in mine:
                    wanted.update(history_ids[begin:begin + config.batch_size].tolist())
                tokenized = {h[0]: h for h in tokenize_histories(chunk, tokenizer, wanted if dist.active else None,
                                                                  no_visit=[])}
                for begin in mine:
                    batch = slice(begin, begin + config.batch_size)
                    ids = history_ids[batch]
                    known = np.fromiter((h in tokenized for h in ids.tolist()), bool, len(ids))
                    part = np.full(len(ids), np.nan)
                    if known.any():
                        subjects, days = _query_inputs(tokenized, ids[known], horizons[batch][known])
                        part[known] = score_queries(model, subjects, days, token_ids, config.aggregator, max_tokens,
                                                    len(subjects), device, progress=bar, autocast=autocast,
                                                    summary=summary)
                    if not known.all():
                        bar.update(int((~known).sum()))
                    risks[batch] = part
                    scored_here += int(known.sum())
            query_rows.append(targets)
            query_histories.append(history_ids)
            query_risks.append(risks)
    bar.close()
    query_rows = np.concatenate(query_rows) if query_rows else np.empty(0, np.int64)
    query_histories = np.concatenate(query_histories) if query_histories else np.empty(0, np.int64)
    query_risks = dist.all_sum_array(np.concatenate(query_risks) if query_risks else np.empty(0, np.float64))
    if dist.active:
        sys.stderr.write(f"forecast {task.name}: process {dist.rank} of {dist.world} scored {scored_here:,} of "
                         f"{n_queries:,} queries\n")
    risk_sum, risk_n = np.zeros(rows.height, np.float64), np.zeros(rows.height, np.int64)
    np.add.at(risk_sum, query_rows, query_risks)  # a row's horizons in the order they were asked
    np.add.at(risk_n, query_rows, 1)
    # A row whose history holds no visit keeps its place with a null probability: `evaluate` counts and excludes
    # it (missing_score_rows_excluded), and it is counted here.
    unscored = no_visit_rows(rows, histories, np.unique(query_histories[np.isnan(query_risks)]).tolist(),
                             warn=dist.main)
    # In the rows' order (HorizonQueryModel.predict_proba reads the column as is), with the label columns the
    # driver carries.
    carried = [c for c in CARRIED_LABEL_COLUMNS if c in rows.columns]
    predictions = rows.select(*PREDICTION_COLUMNS).with_columns(
        pl.Series(PROBABILITY, risk_sum / np.maximum(risk_n, 1), dtype=pl.Float64).fill_nan(None),
        pl.lit(model_name).alias("model"),
    ).with_columns(rows.select(carried))
    info = {"label_counts": label_counts(labels), "rows_not_scored": skipped, "queries": n_queries,
            "events_not_seen": cut_counts, "precision": precision, **unscored}
    return Forecast(predictions=predictions, info=info)


def no_visit_rows(rows: pl.DataFrame, histories: pl.DataFrame, history_ids: list[int], warn: bool = True) -> dict:
    """What ``info.json`` records of the label ``rows`` left unscored because no visit was known at their
    prediction time (the ``history_ids`` of ``histories`` that ``tokenize_histories`` left out), with a warning
    on stderr naming the first; {} when there are none."""
    if not history_ids:
        return {}
    left_out = histories.filter(pl.col("history_id").is_in(history_ids)).sort("history_id")
    n_rows = rows.join(left_out, on=["subject_id", "prediction_time"]).height
    first = left_out.row(0, named=True)
    subject_id, prediction_time = first["subject_id"], first["prediction_time"]
    if warn:
        print(f"nextvisit: warning: {n_rows:,} label row(s) of {left_out.height:,} (subject, prediction time) pair(s) "
              f"have no visit known at the prediction time (first: subject {subject_id} at {prediction_time}), so "
              "nothing to forecast from: their probability is null and `evaluate` excludes and counts them",
              file=sys.stderr)
    return {"rows_without_history": {"rows": n_rows, "histories": left_out.height,
                                     "first": {"subject_id": int(subject_id), "prediction_time": str(prediction_time)}}}


def model_name(run: Path, config: ForecastConfig) -> str:
    name = Path(run).resolve().name
    if config.aggregator != "sum_logits" or config.multi_horizon:
        name += f"[{config.aggregator}{'+multi_horizon' if config.multi_horizon else ''}]"
    if config.history_tokens is not None:
        name += f"[history {config.history_tokens}]"
    return name


class HorizonQueryModel(ComparedModel):
    """The zero-shot next-visit model behind the compared-model interface (``nextvisit.compare``): no task
    labels reach it (``fit`` learns nothing); ``predict_proba`` is the horizon query."""

    kind = ZERO_SHOT
    needs_train_labels = False

    def __init__(self, run: Path | NextVisitRun, config: ForecastConfig, device: str | None = None,
                 progress: bool = True, dist: Distributed | None = None):
        """``run``: a run folder (loaded on ``device``) or a run loaded already."""
        loaded = NextVisitRun.of(run, device)
        self.run, self.config, self.progress, self.dist = loaded.path, config.validate(), progress, dist
        self.model, self.vocab, self.run_config = loaded.model, loaded.vocab, loaded.config
        self.tokenizer = loaded.tokenizer  # the run's own lab statistics and tokenizer.yaml
        self.name = model_name(loaded.path, config)
        self.scored: dict = {}

    def read(self, meds_dir: Path, labels: Labels):
        return Path(meds_dir), labels.task

    def score(self, meds_dir: Path, labels: pl.DataFrame, task: Task, splits: Sequence[str]) -> Forecast:
        """``forecast`` with this run: the labelled rows of ``splits`` of ``labels`` (label columns,
        docs/interfaces.md §5; ``age_years`` and ``sex`` may be null)."""
        max_tokens = self.config.history_tokens or self.run_config.data.query_max_tokens
        return forecast(self.model, self.vocab, self.tokenizer, max_tokens, meds_dir,
                        labels, task, replace(self.config, splits=tuple(splits)), self.name, progress=self.progress,
                        summary_tokens=self.run_config.data.history_summary_tokens, dist=self.dist)

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
    """`nextvisit forecast`; under torchrun every process scores its share of the queries and process 0 alone
    writes ``--out`` (it holds the folder's lock from the check before any work to the publish)."""
    config = ForecastConfig(
        aggregator=args.aggregator, multi_horizon=args.multi_horizon, batch_size=args.batch_size,
        splits=parse_splits(args.splits), precision=args.precision, history_tokens=args.history_tokens,
    ).validate()
    dist, device = init_distributed(args.device)
    with dist.together():  # a refused --out stops every process
        if dist.main:
            check_out(args.out, args.overwrite)
    model = HorizonQueryModel(args.run, config, str(device), dist=dist)
    if dist.main:
        compare.run(model, args.meds_dir, args.labels, args.out, args.overwrite, splits=config.splits)
        print(f"scored {model.scored['queries']:,} queries of the label rows of splits {', '.join(config.splits)} "
              f"with {model.name}" + (f" on {dist.world} processes" if dist.active else ""))
        print(f"wrote {Path(args.out) / 'predictions.parquet'}")
    else:
        compare.score(model, args.meds_dir, Labels.of(args.labels, require_train=model.needs_train_labels,
                                                      require_task=model.needs_task), splits=config.splits)
    shutdown()
    return 0
