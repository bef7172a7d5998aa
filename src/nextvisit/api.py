"""The Python API, for notebooks: the stages of the command line as functions, and small objects that hold what
each stage wrote (docs/python.md).

    meds = simulate(out, n_subjects, seed)           MedsDataset       nextvisit simulate
    store = tokenize(meds, out)                      Store             nextvisit tokenize
    run = pretrain(store, out, preset=, config=)     Run               nextvisit pretrain
    labels = label(meds, task, out=None)             Labels            nextvisit label
    run = load_run(path)                             Run
    run.forecast(meds, labels | task=, out=None)     Predictions       nextvisit forecast
    run.sample(meds, labels | task=, out)            Sampling          nextvisit sample
    evaluate(*predictions, out=None)                 Evaluation        nextvisit evaluate

Every function calls the function its verb's handler calls (``simulate``: ``data.simulate.dataset.simulate``,
``tokenize``: ``tokenize.dataset.tokenize_dataset``, ``pretrain``: ``train.trainer.pretrain``, ``label``:
``tasks.label``, ``forecast``: ``predict.horizon.HorizonQueryModel`` through ``compare.run`` or, without ``out``,
``compare.score``, ``sample``: ``predict.sample.sample``, ``evaluate``: ``evaluate.evaluation``), so a result
is the command's result, number for number. Where a verb writes a folder, ``out`` is that folder, refused when
it is not empty unless ``overwrite``; ``label``, ``forecast`` and ``evaluate`` also work in memory (``out=None``).
Each object's ``repr`` says what it holds; each exposes its polars frames and its folder (``path``, None for
one held in memory). ``load_meds``, ``load_store``, ``load_labels`` and ``load_predictions`` open folders the
command line wrote. Bad input raises ``nextvisit.errors.UserError`` with the command line's message.

Nothing heavy is imported here: torch comes in with the first function that needs a model.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import polars as pl

from nextvisit.artifacts.predictions import PREDICTION_SPLITS
from nextvisit.errors import UserError

DEFAULT_SPLITS = PREDICTION_SPLITS  # what zero-shot scorers score by default (tuning, held_out)
CODES_TASK = "condition_codes"  # the name of a task given as codes=[...], as `nextvisit medsdev predict` names it


def _path(value, what: str) -> Path:
    """The folder of ``value``: a path, or one of this module's objects (their ``path``)."""
    if isinstance(value, (str, Path)):
        return Path(value)
    path = getattr(value, "path", None)
    if isinstance(path, Path):
        return path
    raise UserError(f"{what}: expected a folder path or a nextvisit object holding one, got {type(value).__name__}"
                    + (" held in memory (give out= to write it)" if hasattr(value, "path") else ""))


def _splits(splits) -> tuple[str, ...]:
    """``splits`` as a tuple of split names: a sequence, or text as the command line takes it ('all')."""
    from nextvisit.predict.scoring import parse_splits

    return parse_splits(splits if isinstance(splits, str) else ",".join(splits))


def _by_split(counts: dict[str, int]) -> str:
    return ", ".join(f"{split} {n:,}" for split, n in counts.items())


def _horizons(days: Sequence[int]) -> str:
    return ", ".join(str(h) for h in sorted(days)) + " d"


# -- MEDS dataset and token store ---------------------------------------------------------------------------------


@dataclass(repr=False)
class MedsDataset:
    """A MEDS dataset folder: its subjects per split (``metadata/subject_splits.parquet``) and its events."""

    path: Path
    subjects: dict[str, int]  # split -> subjects
    events: int
    shards: int
    summary: dict = field(default_factory=dict)  # what `simulate` reported, when it wrote the dataset

    @classmethod
    def load(cls, path, summary: dict | None = None) -> "MedsDataset":
        from nextvisit.data.meds import SPLITS, check_shard_schema, data_files, read_splits_checked

        path = Path(path)
        files = data_files(path)
        splits = read_splits_checked(path)
        found = dict(splits.group_by("split").len().iter_rows())
        return cls(path, {s: int(found.get(s, 0)) for s in SPLITS}, sum(check_shard_schema(f) for f in files),
                   len(files), summary or {})

    def __repr__(self) -> str:
        return (f"<MedsDataset {self.path.name}: {sum(self.subjects.values()):,} subjects ({_by_split(self.subjects)}), "
                f"{self.events:,} events in {self.shards} shard(s); {self.path}>")


@dataclass(repr=False)
class Store:
    """A token store folder (``nextvisit.tokenize.store``): vocabulary and subjects, visits, tokens per split."""

    path: Path
    vocab_size: int
    splits: dict[str, dict]  # split -> {subjects, visits, tokens}
    manifest: dict  # manifest.json: events in and out, every dropped or replaced event by reason

    @classmethod
    def load(cls, path) -> "Store":
        from nextvisit.tokenize.store import TokenStore

        store = TokenStore(path)
        return cls(store.path, len(store.vocab), store.info.get("splits", {}), store.manifest)

    def __repr__(self) -> str:
        splits = ", ".join(f"{split} {c['subjects']:,} subjects / {c['visits']:,} visits"
                           for split, c in self.splits.items())
        return f"<Store {self.path.name}: vocabulary {self.vocab_size:,} tokens; {splits}; {self.path}>"


def simulate(out, n_subjects: int = 1000, seed: int = 0, *, first_subject_id: int = 1, split: str | None = None,
             workers: int | None = None, overwrite: bool = False, progress: bool = True) -> MedsDataset:
    """``nextvisit simulate``: ``n_subjects`` subjects of the synthetic health system as a MEDS dataset at ``out``
    (docs/simulator.md); the same seed gives the same files."""
    from nextvisit.data.simulate.dataset import simulate as write_simulation

    summary = write_simulation(n_subjects, out, seed=seed, first_subject_id=first_subject_id, split=split,
                               workers=workers, overwrite=overwrite, progress=progress)
    return MedsDataset.load(out, summary)


def tokenize(meds, out, *, config: Path | dict | None = None, vocab_from=None, max_time: str | None = None,
             workers: int | None = None, overwrite: bool = False, progress: bool = True) -> Store:
    """``nextvisit tokenize``: the token store of a MEDS dataset at ``out``. ``config``: a tokenizer YAML or a
    mapping of its fields (docs/tokenizer.md); ``vocab_from``: a store or run whose vocabulary to reuse;
    ``max_time``: the guard against future dates (``now``, ``none`` or an ISO date)."""
    from nextvisit.tokenize.dataset import tokenize_dataset, tokenizer_config

    vocab_from = _path(vocab_from, "vocab_from") if vocab_from is not None else None
    tokenize_dataset(_path(meds, "meds"), Path(out), config=tokenizer_config(config, max_time, vocab_from),
                     vocab_from=vocab_from, workers=workers, overwrite=overwrite, progress=progress)
    return Store.load(out)


def load_meds(path) -> MedsDataset:
    """A MEDS dataset folder (checked as every stage checks it: shard footers, subject splits)."""
    return MedsDataset.load(path)


def load_store(path) -> Store:
    """A token store written by ``tokenize`` (or ``nextvisit tokenize``)."""
    return Store.load(path)


# -- labels ---------------------------------------------------------------------------------------------------


@dataclass(repr=False)
class Labels:
    """Label rows of one task (``frame``: docs/interfaces.md §5, one row per subject, prediction time and horizon;
    ``boolean_value`` null for a censored row), the task they were made with, and the counts of what the task
    excluded (``counts``: counts.json; None for rows filtered here)."""

    frame: pl.DataFrame
    task: object  # nextvisit.tasks.Task
    counts: dict | None = None
    path: Path | None = None

    @classmethod
    def load(cls, path) -> "Labels":
        from nextvisit.tasks import labels_path, read_labels, read_labels_task

        path = Path(path)
        counts_file = labels_path(path).parent / "counts.json"
        return cls(read_labels(path), read_labels_task(path),
                   json.loads(counts_file.read_text()) if counts_file.is_file() else None, path)

    def filter(self, *predicates) -> "Labels":
        """The rows matching polars ``predicates`` (as ``DataFrame.filter``), held in memory."""
        return Labels(self.frame.filter(*predicates), self.task)

    def head(self, n: int) -> "Labels":
        """The first ``n`` rows (sorted by subject, prediction time, horizon), held in memory."""
        return Labels(self.frame.head(n), self.task)

    def compared(self, require_train: bool = False):
        """These rows as the scorers read them (``nextvisit.compare.Labels``: checked, censored rows set aside)."""
        from nextvisit.compare import Labels as ComparedLabels

        if self.path is not None:
            return ComparedLabels.load(self.path, require_train=require_train)
        return ComparedLabels.from_frame(self.frame, f"labels of task {self.task.name} (in memory)", self.task,
                                         require_train=require_train)

    def __repr__(self) -> str:
        frame = self.frame
        labelled = frame.filter(pl.col("boolean_value").is_not_null())
        by_split = dict(frame.group_by("split").len().sort("split").iter_rows())
        where = f"; {self.path}" if self.path is not None else " (in memory)"
        return (f"<Labels {self.task.name}: {frame.height:,} rows of {frame['subject_id'].n_unique():,} subjects, "
                f"horizons {_horizons(frame['horizon_days'].unique().to_list() or self.task.horizons_days)}; "
                f"{labelled.height:,} labelled ({int(labelled['boolean_value'].sum()):,} positive), "
                f"{frame.height - labelled.height:,} censored; rows by split: {_by_split(by_split)}{where}>")


def label(meds, task, out=None, *, overwrite: bool = False, progress: bool = True, **aces_options) -> Labels:
    """``nextvisit label``: apply ``task`` (a built-in name, a task YAML, a ``nextvisit.tasks.Task``, or an ACES
    task config with ``aces_options``: condition_predicate, codes, horizon_days, remove_from_inputs, task_name)
    to a MEDS dataset; written to ``out`` when given, else held in memory."""
    from nextvisit.tasks import condition_absent, label as make

    result, task = make(_path(meds, "meds"), task, Path(out) if out is not None else None, overwrite, progress,
                        **aces_options)
    warning = condition_absent(result, task)
    if warning:
        warnings.warn(warning, stacklevel=2)
    return Labels(result.labels, task, result.counts, Path(out) if out is not None else None)


def load_labels(path) -> Labels:
    """A labels folder written by ``label`` (or ``nextvisit label``)."""
    return Labels.load(path)


def _task(task, codes, horizon: int | None):
    """The ``Task`` of a ``task`` (name, YAML, mapping or Task) or of ``codes`` (code prefixes, at ``horizon``)."""
    from nextvisit.tasks import Task, load_task

    if task is not None and codes is not None:
        raise UserError("give the condition once: task= or codes=, not both")
    if codes is not None:
        if horizon is None:
            raise UserError("codes= needs horizon= (days after the prediction time)")
        prefixes = [codes] if isinstance(codes, str) else list(codes)
        return Task.from_dict({"name": CODES_TASK, "condition": {"code_prefixes": prefixes},
                               "horizons_days": [horizon]}, source="codes=")
    if isinstance(task, Task):
        return task
    if isinstance(task, dict):
        return Task.from_dict(task, source="task=")
    return load_task(task)


def _label_rows(frame: pl.DataFrame, meds: Path, task, horizon: int | None) -> pl.DataFrame:
    """A labels frame completed to the label schema: MEDS label rows (subject_id, prediction_time, boolean_value)
    get their split from ``meds``, the task's name, ``horizon`` (or the task's only one) and null reason, age and
    sex; columns the frame has are kept."""
    from nextvisit.data.meds import read_splits_checked

    for column in ("subject_id", "prediction_time", "boolean_value"):
        if column not in frame.columns:
            raise UserError(f"labels frame: column '{column}' is missing; a labels frame needs subject_id, "
                            "prediction_time, boolean_value (the MEDS label schema) at least")
    if "split" not in frame.columns:
        frame = frame.join(read_splits_checked(meds), on="subject_id", how="left")
        unknown = frame.filter(pl.col("split").is_null())
        if unknown.height:
            raise UserError(f"labels frame: subject {unknown['subject_id'].min()} is not in "
                            f"{meds / 'metadata' / 'subject_splits.parquet'} ({unknown.height:,} such row(s)); give "
                            "rows of the dataset's subjects, or a split column")
    if "horizon_days" not in frame.columns:
        if horizon is None and len(task.horizons_days) != 1:
            raise UserError(f"labels frame: no horizon_days column, and task {task.name} has horizons "
                            f"{list(task.horizons_days)} days; give horizon=")
        frame = frame.with_columns(pl.lit(horizon or task.horizons_days[0], pl.Int32).alias("horizon_days"))
    fill = {"task": pl.lit(task.name), "reason": pl.lit(None, pl.String), "age_years": pl.lit(None, pl.Float64),
            "sex": pl.lit(None, pl.String)}
    return frame.with_columns(**{name: value for name, value in fill.items() if name not in frame.columns})


def _scoring_labels(meds: Path, labels, task, codes, horizon: int | None) -> Labels:
    """What ``forecast`` and ``sample`` score: ``labels`` (a ``Labels``, a labels folder or a polars frame), or
    ``meds`` labelled in memory with ``task`` (or ``codes``); only the rows of ``horizon`` when given."""
    if labels is None:
        if task is None and codes is None:
            raise UserError("nothing to score: give labels (a labels folder, label()'s Labels or a polars frame), "
                            "or task= (or codes= with horizon=) to label the MEDS dataset with")
        chosen = label(meds, _task(task, codes, horizon), progress=False)
    elif isinstance(labels, pl.DataFrame):
        if task is None and codes is None:
            raise UserError("a labels frame needs task= (or codes= with horizon=): the condition its rows score")
        condition = _task(task, codes, horizon)
        chosen = Labels(_label_rows(labels, meds, condition, horizon), condition)
    else:
        if task is not None or codes is not None:
            raise UserError("labels carry their task (task.yaml): drop task= and codes=, or pass a polars frame")
        chosen = labels if isinstance(labels, Labels) else Labels.load(labels)
    if horizon is not None and "horizon_days" in chosen.frame.columns:
        at = chosen.frame.filter(pl.col("horizon_days") == horizon)
        if at.height == 0:
            raise UserError(f"horizon={horizon}: the labels have no row of that horizon (they have "
                            f"{_horizons(chosen.frame['horizon_days'].unique().to_list())})")
        if at.height < chosen.frame.height:
            chosen = Labels(at, chosen.task)
    return chosen


# -- predictions and their evaluation ----------------------------------------------------------------------------


@dataclass(repr=False)
class Predictions:
    """One model's predictions (docs/interfaces.md §6): ``frame`` holds one row per scored label row, its label
    (``boolean_value``) and risk (``predicted_boolean_probability``); ``info`` is info.json's content."""

    frame: pl.DataFrame
    info: dict
    path: Path | None = None

    @classmethod
    def load(cls, path) -> "Predictions":
        from nextvisit.artifacts.predictions import PREDICTIONS_FILE, read_info, read_prediction_file

        path = Path(path)
        file = path / PREDICTIONS_FILE if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"{file}: no predictions here; give a folder written by forecast, sample, oracle or "
                            "baseline (docs/interfaces.md §6)")
        problems: list[str] = []
        info = read_info(file, problems)
        for problem in problems:
            warnings.warn(problem, stacklevel=2)
        return cls(read_prediction_file(file), info, file.parent if file.name == PREDICTIONS_FILE else file)

    @property
    def model(self) -> str:
        return str(self.info.get("model") or "model")

    @property
    def kind(self) -> str:
        return str(self.info.get("kind") or "unknown")

    def held(self):
        """These predictions as ``nextvisit.evaluate`` reads rows held in memory."""
        from nextvisit.artifacts.predictions import PREDICTIONS_FILE, HeldPredictions

        where = str(self.path / PREDICTIONS_FILE) if self.path is not None else f"predictions of {self.model} (in memory)"
        return HeldPredictions(self.frame, self.info, where, str(self.path) if self.path is not None else self.model)

    def __repr__(self) -> str:
        frame = self.frame
        tasks = ", ".join(sorted(frame["task"].unique().to_list()))
        by_split = dict(frame.group_by("split").len().sort("split").iter_rows())
        positives = int(frame["boolean_value"].fill_null(False).sum())
        where = f"; {self.path}" if self.path is not None else " (in memory)"
        return (f"<Predictions {self.model} ({self.kind}): {frame.height:,} rows of {frame['subject_id'].n_unique():,} "
                f"subjects ({positives:,} positive), task {tasks}, horizons "
                f"{_horizons(frame['horizon_days'].unique().to_list())}; rows by split: {_by_split(by_split)}{where}>")


def load_predictions(path) -> Predictions:
    """A predictions folder (or its predictions.parquet) written by any scorer of the command line."""
    return Predictions.load(path)


# metrics.json figures gathered in Evaluation.table (value and its 95% interval for each)
_TABLE_METRICS = ("auroc", "auprc", "auroc_subject_weighted", "auroc_ipcw", "brier")


@dataclass(repr=False)
class Evaluation:
    """The metrics of ``evaluate`` (``metrics``: metrics.json's content; docs/evaluation.md) and ``table``: one
    row per (task, horizon, model) of the report split with AUROC, AUPRC, Brier and their 95% subject-level
    bootstrap intervals, and the counts behind them."""

    metrics: dict
    path: Path | None = None

    @property
    def table(self) -> pl.DataFrame:
        rows = []
        for block in self.metrics["tasks"]:
            for row in block["rows"]:
                entry = {"task": block["task"], "horizon_days": block["horizon_days"], "model": row["model"],
                         "kind": row["kind"]}
                for name in _TABLE_METRICS:
                    figure = row.get(name) or {}
                    ci = figure.get("ci") or [None, None]
                    entry.update({name: figure.get("value"), f"{name}_low": ci[0], f"{name}_high": ci[1]})
                counts = row["counts"]
                entry.update({key: counts.get(key) for key in ("rows", "subjects", "positives", "positive_subjects")})
                entry["auroc_reason"] = (row.get("auroc") or {}).get("reason")
                rows.append(entry)
        return pl.DataFrame(rows, infer_schema_length=None)

    @property
    def warnings(self) -> list[str]:
        return list(self.metrics.get("warnings", []))

    def text(self) -> str:
        """The command line's headline tables (``nextvisit evaluate``'s stdout)."""
        from nextvisit.evaluate.tables import headline_table

        return headline_table(self.metrics)

    def __repr__(self) -> str:
        settings = self.metrics["settings"]
        table = self.table
        lines = [f"<Evaluation of {table['model'].n_unique()} model(s) on {len(self.metrics['tasks'])} "
                 f"task-horizon(s), split {settings['report_split']}, 95% intervals from {settings['n_bootstrap']:,} "
                 f"subject-level bootstrap resamples:"]
        for row in table.iter_rows(named=True):
            if row["auroc"] is None:
                figure = f"AUROC n/a ({row['auroc_reason']})"
            else:
                figure = f"AUROC {row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]"
            lines.append(f"  {row['task']} {row['horizon_days']} d, {row['model']}: {figure}; "
                         f"{row['positives']:,} positive of {row['rows']:,} rows, {row['positive_subjects']:,} "
                         f"positive of {row['subjects']:,} subjects")
        where = f"report {self.path / 'report.html'}" if self.path is not None else "in memory"
        return "\n".join(lines + [f"  ({len(self.warnings)} warning(s); {where})>"])


def evaluate(*predictions, out=None, bootstrap: int = 1000, seed: int = 0, overwrite: bool = False,
             progress: bool = True) -> Evaluation:
    """``nextvisit evaluate``: every model of ``predictions`` (``Predictions``, or prediction folders) per task and
    horizon; the report (metrics.json, report.html, plots) written to ``out`` when given."""
    from nextvisit.artifacts.folders import check_out
    from nextvisit.evaluate.evaluation import EvaluationConfig, evaluate_predictions, load_predictions as gather

    if bootstrap < 1:
        raise UserError(f"bootstrap={bootstrap}: must be at least 1")
    if out is not None:
        check_out(out, overwrite)
    problems: list[str] = []
    if len(predictions) == 1 and isinstance(predictions[0], (list, tuple)):
        predictions = tuple(predictions[0])  # evaluate([a, b]) as evaluate(a, b)
    sources = [p.held() if isinstance(p, Predictions) else _path(p, "predictions") for p in predictions]
    entries, inputs = gather(sources, problems)
    metrics = evaluate_predictions(entries, inputs, problems, Path(out) if out is not None else None,
                                   EvaluationConfig(n_bootstrap=bootstrap, seed=seed), progress, overwrite)
    return Evaluation(metrics, Path(out) if out is not None else None)


# -- model runs -----------------------------------------------------------------------------------------------


@dataclass(repr=False)
class Sampling:
    """What ``Run.sample`` wrote: ``summary`` (sampling.json: how trajectories ended, throughput), the risks
    they give as two predictions (``monte_carlo``, ``rao_blackwell``; docs/sampling.md) and the trajectories
    themselves (``trajectories(sample)``: MEDS events after each prediction time)."""

    path: Path
    summary: dict
    monte_carlo: Predictions
    rao_blackwell: Predictions

    @classmethod
    def load(cls, path) -> "Sampling":
        from nextvisit.predict.sample import SAMPLING_FILE

        path = Path(path)
        if not (path / SAMPLING_FILE).is_file():
            raise UserError(f"{path / SAMPLING_FILE}: missing; give a folder written by sample (or `nextvisit sample`)")
        return cls(path, json.loads((path / SAMPLING_FILE).read_text()), Predictions.load(path / "monte_carlo"),
                   Predictions.load(path / "rao_blackwell"))

    def trajectories(self, sample: int = 0) -> pl.DataFrame:
        """The events of every history's trajectory number ``sample`` (subject_id, time, code, numeric_value,
        text_value, prediction_time)."""
        from nextvisit.predict.sample import TRAJECTORIES

        file = self.path / TRAJECTORIES / f"{sample}.parquet"
        if not file.is_file():
            raise UserError(f"{file}: no such trajectories file; samples are numbered 0..{self.summary['samples'] - 1}, "
                            "and none are written with trajectories=False")
        return pl.read_parquet(file)

    def __repr__(self) -> str:
        s = self.summary
        ended = ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in s["ended"].items() if n)
        return (f"<Sampling {s['model']} on task {s['task']}: {s['trajectories']:,} trajectories ({s['samples']} per "
                f"history, {s['histories']:,} histories, {s['label_rows']:,} label rows); ended: {ended}; "
                f"{s['undecided_row_trajectories']:,} (trajectory, row) pairs undecided; risks monte_carlo and "
                f"rao_blackwell; {self.path}>")


class Run:
    """A next-visit model run folder, loaded (``nextvisit.model.run.NextVisitRun``): ``model`` (eval mode),
    ``config`` (``RunConfig``), ``vocab``, and ``metrics`` (metrics.csv as a frame: the training log)."""

    def __init__(self, loaded):
        from nextvisit.model.run import METRICS_FILE

        self.loaded = loaded  # nextvisit.model.run.NextVisitRun
        self.path: Path = loaded.path
        metrics_file = self.path / METRICS_FILE
        self.metrics: pl.DataFrame | None = (pl.read_csv(metrics_file, infer_schema_length=None)
                                             if metrics_file.is_file() else None)

    @property
    def model(self):
        return self.loaded.model

    @property
    def config(self):
        return self.loaded.config

    @property
    def vocab(self):
        return self.loaded.vocab

    @property
    def steps(self) -> int:
        """Optimizer steps trained (the training log's last step; 0 without a log)."""
        return int(self.metrics["step"].max()) if self.metrics is not None and self.metrics.height else 0

    def _last(self, column: str) -> float | None:
        if self.metrics is None or column not in self.metrics.columns:
            return None
        values = self.metrics[column].drop_nulls()
        return float(values[-1]) if len(values) else None

    def __repr__(self) -> str:
        m = self.config.model
        loss, auroc = self._last("val_loss"), self._last("val_new_onset_auroc")
        validation = (f" (validation loss {loss:.4f}" + (f", new-onset AUROC {auroc:.3f}" if auroc is not None else "")
                      + ")") if loss is not None else ""
        return (f"<Run {self.path.name}: next-visit model, {self.model.n_parameters() / 1e6:.2f}M parameters "
                f"({m.n_layers} layers x {m.d_model}), vocabulary {len(self.vocab):,}, {self.steps:,} steps "
                f"trained{validation}{', visit-time head' if m.visit_time_head else ''}, on "
                f"{next(self.model.parameters()).device}; {self.path}>")

    def forecast(self, meds, labels=None, *, task=None, codes=None, horizon: int | None = None,
                 splits=DEFAULT_SPLITS, aggregator: str = "sum_logits", multi_horizon: bool = False,
                 batch_size: int = 64, precision: str = "auto", out=None, overwrite: bool = False,
                 progress: bool = True) -> Predictions:
        """``nextvisit forecast``: the zero-shot risk by horizon query of every labelled row of ``splits``.
        ``labels``: a ``Labels``, a labels folder, or a polars frame (MEDS label rows, with ``task=`` or
        ``codes=``); without it, ``meds`` is labelled in memory with ``task=``. ``horizon``: only the rows of
        that horizon (a frame without ``horizon_days`` gets it). Written to ``out`` when given."""
        from nextvisit import compare
        from nextvisit.predict.horizon import ForecastConfig, HorizonQueryModel

        config = ForecastConfig(aggregator=aggregator, multi_horizon=multi_horizon, batch_size=batch_size,
                                splits=_splits(splits), precision=precision).validate()
        meds = _path(meds, "meds")
        if out is not None:
            from nextvisit.artifacts.folders import check_out

            check_out(out, overwrite)
        chosen = _scoring_labels(meds, labels, task, codes, horizon)
        model = HorizonQueryModel(self.loaded, config, progress=progress)
        if out is not None:  # the command's own driver, with the labels folder when there is one
            compare.run(model, meds, chosen.path or chosen.compared(), Path(out), overwrite, splits=config.splits)
            return Predictions.load(out)
        frame, info = compare.score(model, meds, chosen.compared(), config.splits,
                                    labels_from=str(chosen.path) if chosen.path is not None else None)
        return Predictions(frame, info)

    def sample(self, meds, labels=None, *, out, task=None, codes=None, horizon: int | None = None,
               samples: int = 16, temperature: float = 1.0, seed: int = 0, batch_size: int = 256,
               max_visits: int = 500, splits=DEFAULT_SPLITS, precision: str = "fp32", trajectories: bool = True,
               sample_counts: Sequence[int] = (), overwrite: bool = False, progress: bool = True) -> Sampling:
        """``nextvisit sample``: ``samples`` Monte Carlo trajectories per labelled history of ``splits``, written
        to ``out`` with the risks they give (docs/sampling.md); ``labels``, ``task``, ``codes``, ``horizon`` as
        for ``forecast``. The run needs its visit-time head."""
        from nextvisit.predict.sample import SampleConfig, sample

        config = SampleConfig(samples=samples, temperature=temperature, seed=seed, batch_size=batch_size,
                              max_visits=max_visits, splits=_splits(splits), precision=precision,
                              write_trajectories=trajectories, sample_counts=tuple(sample_counts)).validate()
        meds = _path(meds, "meds")
        chosen = _scoring_labels(meds, labels, task, codes, horizon)
        sample(self.loaded, meds, chosen.path or chosen.compared(), Path(out), config, overwrite=overwrite,
               progress=progress)
        return Sampling.load(out)


def load_run(path, device: str | None = None) -> Run:
    """A run folder written by ``pretrain`` (or ``nextvisit pretrain``), its model on ``device`` (cpu, cuda or
    cuda:N; default: cuda when available)."""
    from nextvisit.model.run import NextVisitRun

    return Run(NextVisitRun.load(_path(path, "run"), device))


def pretrain(store, out, *, preset: str = "tiny", config: Path | dict | None = None, max_steps: int | None = None,
             max_minutes: float | None = None, resume: bool = False, device: str | None = None,
             progress: bool = True) -> Run:
    """``nextvisit pretrain``: train the next-visit model on a token store into the run folder ``out``.
    ``config``: a YAML or a mapping of the sections it overrides in ``preset`` (docs/model.md), e.g.
    ``{"train": {"decay_steps": 40}}``; ``max_steps``, ``max_minutes`` bound this call only."""
    from nextvisit.train.trainer import pretrain as train_run

    train_run(_path(store, "store"), Path(out), preset, config, resume=resume, max_minutes=max_minutes,
              max_steps=max_steps, device_name=device, progress=progress)
    return load_run(out, device)
