"""Quality benchmark: AUROC of every compared model on the same large evaluation population, with subject-level
intervals tight enough to tell models apart.

    .venv/bin/python -m benchmarks.quality [--budget-minutes M] [--variants FILE] [--only NAMES] [--json FILE]

**Populations** (the simulated health system, the default). One population is simulated to train on (seed
``--train-seed``, subjects ``1..--train-subjects``, split 80/10/10 as usual) and a second, larger one of the same
health system to evaluate on (seed ``--eval-seed``, ids right after the first population's, every subject in
``held_out``: ``nextvisit simulate --first-subject-id N --split held_out``). The ``combine`` stage joins them into
one MEDS folder (data shards as symlinks, metadata merged): the train population's train and tuning subjects
keep their splits, **its own held_out subjects are moved to tuning** (so no subject of the train population is
ever evaluated), and every subject of the evaluation population is held_out. Every model is trained (and
selected) on the train population only and scored on the evaluation population's label rows; the oracle is
scored on the evaluation population's own folder (its ``simulator.json`` re-creates those subjects) with the
held_out label rows. At the defaults (40,000 + 45,000 subjects) every task and horizon has at least 300
positive evaluation subjects (5,000 subjects give about 36 for knee OA at 5 years, the rarest).

``--dataset synthea`` runs the same table on ``../shared/data/synthea-covid19-10k-meds`` with its own splits
(pretraining on train, selection on tuning, evaluation on held_out) and the SNOMED tasks; there is no oracle.

**Stages cached by their inputs.** Each stage writes ``<work>/<stage>-<hash>/``: ``stage.json`` (what it was
run with), ``out/`` (its artifact) and, written last, ``.complete``. The hash covers the stage's own arguments
and the hashes of the stages it reads, not the source code: a rerun skips every finished stage (and says so),
redoes an interrupted one, and reruns only what an argument change reaches (a new next-visit variant: its
calibration, pretraining, forecasts and the evaluation). Stages that change meaning with the code (a new
model) need a fresh ``--work`` folder or the stage folder deleted.

**Models** (``--only`` picks some): each next-visit variant (``nextvisit`` = the project's defaults with an
explicit schedule for the budget; more from ``--variants``), zero-shot horizon forecasts; ``masked``: the masked
transformer, pretrained then fine-tuned per task with early stopping on tuning; ``counts``: the count-feature
logistic regression (``nextvisit baseline counts``, defaults: last year and all history); ``age_sex``: a
logistic regression on age (B-spline) and sex fit on the train rows (``nextvisit.predict.occurrence``'s
age-and-sex reference, applied to the horizon labels); ``oracle``: the simulator's true risk. ``data`` in
``--only`` runs the data stages alone (simulate, combine, tokenize, labels).

**Budget.** The next-visit pretraining runs a fixed number of optimizer steps chosen to take
``--budget-minutes``: a calibration run of 60 steps of the same variant on the same store and device measures
the seconds per step (the steps after the 10th, a validation included) and the setup time, and
steps = (budget - setup) / seconds per step; the cosine decay ends at the last step. ``--pretrain-steps N``
fixes the steps instead. A safety limit of 1.5 x the budget stops a run on a machine slower than at
calibration. The masked pretraining gets the same budget as wall time (its loop stops on time), and each
masked fine-tuning ``--finetune-steps N`` (at most N steps, default 3,000, early stopping on tuning, whatever the
machine's load) or ``--finetune-minutes M`` (the whole command). Each row's ``budget`` records what the model actually got.

**The table**, per model and task-horizon, on the held_out rows: AUROC with a 95% subject-level bootstrap
interval, the age-sex-stratified AUROC, the share of the oracle's margin over chance
(AUROC - 0.5) / (oracle AUROC - 0.5), positive subjects, and the paired difference zero-shot minus the model
(the reference zero-shot model is ``nextvisit``, else the first variant). Every model of one task-horizon is
scored on the same rows and the same resamples (``nextvisit.evaluate.bootstrap.rng_for``), so differences and
shares have paired intervals; the AUROC interval equals ``nextvisit evaluate``'s on the same predictions. The
table is computed from the predictions folders with ``nextvisit.evaluate``'s own preparation, bootstrap and
metrics (two views instead of evaluate's ten: about 2 s per model and task-horizon at 45,000 rows).

**Sampling** (``--samples N``, off by default): ``nextvisit sample`` on the default run (it needs the visit-time
head) for the held_out rows of ``--sample-subjects`` random held_out subjects (sampling all 45,000 would take
hours on 2 cores), N trajectories per history and the risks of the first k samples for each of
``--sample-counts``; a second table puts both estimators at each k beside every other model, all restricted to
the same subjects (paired as above), and ``sampling_auroc.png`` plots AUROC against k (docs/sampling.md).
``--sample-rows P,N`` samples case-control rows instead: per horizon, P positive and N negative held_out rows
drawn at random within each class (``write_case_control_labels``), which keeps the AUROC unbiased and puts
hundreds of positive subjects in each cell at a cost of a few thousand histories per task. The oracle of that
table is scored on the sampled rows themselves (``sample_oracle_<task>``), so it does not need the main
table's.

**Two runs on one ``--work``.** Each stage runs under an exclusive lock (``<stage folder>.lock``); a run that
reaches a stage another run is running waits for it and then uses it. So one run can build the main table and
sample the first task while a second (``--only nextvisit --sample-tasks knee_oa``, the same budget options)
samples the other task on the second core: the second run forecasts its sampled tasks first, then waits for
the shared stages rather than repeating them. Start both with ``OMP_NUM_THREADS=1``: two processes of torch's
default two threads on 2 cores rolled about 5x slower than one thread each.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

# Run as a script, a module's own folder comes first on sys.path; benchmarks/tokenize.py would then shadow the
# standard library's tokenize module that torch imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import meds
import numpy as np
import polars as pl
import yaml

from nextvisit.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHEA_DIR = REPO_ROOT.parent / "shared" / "data" / "synthea-covid19-10k-meds"
COMPLETE = ".complete"  # written last: the stage finished
STAGE_FILE = "stage.json"
HASH_LENGTH = 12
SIMULATED, SYNTHEA = "simulated", "synthea"
TASKS = {SIMULATED: ("dementia", "knee_oa"), SYNTHEA: ("dementia_snomed", "knee_oa_snomed")}
DEFAULT_VARIANT = "nextvisit"
BASELINES = ("masked", "counts", "age_sex", "oracle")
DATA_ONLY = "data"  # --only: the data stages without any model
# Kinds in the table (the predictions folders use nextvisit.artifacts.predictions.KINDS).
ZERO_SHOT, FINE_TUNED, COUNT, ORACLE, REFERENCE = "zero-shot", "fine-tuned", "count", "oracle", "reference"
VARIANT_KEYS = ("preset", "pretrain", "forecast")
FORECAST_KEYS = ("aggregator", "multi_horizon", "history_tokens")
CALIBRATION_STEPS = 60  # tiny preset: one validation (eval_every 50) inside the measured steps
CALIBRATION_SKIP = 10  # the first logged steps carry start-up costs (allocator, first batches)
SAFETY_FACTOR = 1.5  # --max-minutes of a next-visit pretraining, relative to its budget
MASKED_MAX_STEPS = 10_000_000  # the masked pretraining stops on time, never on this
# tuning histories behind the masked fine-tuning's stopping rule (the preset's 500 held 12 dementia onsets on a
# uniform draw; 2,000, drawn within each class, chose the same steps as 500 and cost about a minute per task)
MASKED_EVAL_HISTORIES = 2000
MIN_POSITIVE_SUBJECTS = 300  # the populations are sized for this many per task and horizon


@dataclass
class QualityConfig:
    dataset: str = SIMULATED
    train_subjects: int = 40_000
    eval_subjects: int = 45_000
    train_seed: int = 0
    eval_seed: int = 1
    synthea_dir: Path = SYNTHEA_DIR
    work: Path = Path("quality-work")
    # From the stage times measured on this 2-core CPU at the default sizes (benchmarks/README.md): everything
    # but the two pretrainings takes about 30 minutes on a quiet machine (the oracle about half of it), so two
    # budgets of 8 minutes keep the whole benchmark under 60 minutes with some room for a busy machine.
    budget_minutes: float = 8.0
    pretrain_steps: int | None = None  # fixed steps instead of the calibrated budget
    finetune_minutes: float = 2.0  # per task, the whole fine-tuning command, when finetune_steps is None
    # optimizer steps per fine-tuning run at most (early stopping on tuning ends it sooner: 350-600 steps on the
    # default populations): a two-minute wall-time budget, tokenizing and predicting included, left the fine-tuning
    # 44 steps and an untuned model on a busy machine
    finetune_steps: int | None = 3000
    preset: str = "tiny"
    masked_preset: str = "tiny"
    oracle_samples: int = 128
    bootstrap: int = 1000
    seed: int = 0
    confidence: float = 0.95
    device: str = "auto"
    variants: dict = field(default_factory=dict)  # name -> {preset, pretrain, forecast}
    only: tuple[str, ...] | None = None
    # Monte Carlo sampling of the default next-visit run (0 = off): trajectories per history, on a random subset
    # of held_out subjects (sampling every evaluation subject takes hours on 2 cores), with the risks of the first
    # k samples for each of sample_counts; every other model is scored on the same subset for that table
    samples: int = 0
    sample_subjects: int = 2000
    sample_counts: tuple[int, ...] = (1, 4, 16)
    sample_tasks: tuple[str, ...] | None = None  # the tasks of the sampling table (default: all)
    # case-control rows instead of random subjects: per horizon, this many positive and negative held_out rows
    # drawn at random within each class (write_case_control_labels); 0 = the random-subjects subset
    sample_positive_rows: int = 0
    sample_negative_rows: int = 0

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS[self.dataset]


# -- stages -------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One cached step: its folder is ``<work>/<name>-<hash>``, the hash over ``args`` and its inputs' hashes.
    An ``external`` stage is a folder made elsewhere (the Synthea data): never run, its hash a fingerprint."""

    name: str
    args: dict
    inputs: dict[str, "Stage"]
    work: Path
    external: Path | None = None

    @property
    def hash(self) -> str:
        payload = {"stage": self.name, "args": self.args,
                   "inputs": {role: stage.hash for role, stage in sorted(self.inputs.items())}}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]

    @property
    def folder(self) -> Path:
        return self.work / f"{self.name}-{self.hash}"

    @property
    def out(self) -> Path:
        return self.external if self.external is not None else self.folder / "out"

    @property
    def complete(self) -> bool:
        return self.external is not None or (self.folder / COMPLETE).is_file()

    def recorded_seconds(self) -> float | None:
        if self.external is not None or not self.complete:
            return None
        return json.loads((self.folder / COMPLETE).read_text()).get("seconds")


def folder_fingerprint(folder: Path) -> dict:
    """What identifies a folder made elsewhere: its data and metadata file names and sizes (and a checksum
    list's text, where it has one)."""
    folder = Path(folder)
    files = sorted(p for sub in ("data", "metadata") for p in (folder / sub).rglob("*") if p.is_file())
    sums = folder / "SHA256SUMS.txt"
    return {"files": [[str(p.relative_to(folder)), p.stat().st_size] for p in files],
            "sha256sums": hashlib.sha256(sums.read_bytes()).hexdigest() if sums.is_file() else None}


class Runner:
    """Runs stages in order, skipping finished ones; prints each command and its time; keeps the timings."""

    def __init__(self, work: Path, rerun: str):
        self.work = Path(work)
        self.rerun = rerun  # the benchmark's own command line, to redo an in-process stage
        self.timings: list[tuple[str, str, float, float | None]] = []  # name, status, seconds now, when it ran
        self.started = time.perf_counter()

    def stage(self, name: str, args: dict, **inputs: Stage) -> Stage:
        return Stage(name=name, args=args, inputs=inputs, work=self.work)

    def cli(self, stage: Stage, title: str, argv: list, files: dict[str, str] | None = None) -> Path:
        """A ``nextvisit`` command (in its own process, so no torch setting of one stage leaks into the next).
        ``files``: name -> text written into the stage folder before the command (its config YAML)."""
        argv = [str(a) for a in argv]
        line = "nextvisit " + " ".join(shlex.quote(a) for a in argv)

        def call(out: Path) -> None:
            code = subprocess.call([sys.executable, "-m", "nextvisit.cli", *argv], cwd=REPO_ROOT)
            if code:
                raise UserError(f"stage '{stage.folder.name}' ({title}) failed (exit {code}); rerun it alone with:\n"
                                f"  cd {REPO_ROOT} && {line}\n(or rerun the benchmark, which redoes that stage)")

        return self._run(stage, title, line, call, files)

    def python(self, stage: Stage, title: str, action: Callable[[Path], None], description: str) -> Path:
        """A step done inside this process (``description`` says what, for the log)."""

        def call(out: Path) -> None:
            try:
                action(out)
            except UserError as exc:
                raise UserError(f"stage '{stage.folder.name}' ({title}) failed: {exc}\nrerun it with: {self.rerun}") from None

        return self._run(stage, title, f"(in process) {description}", call)

    def _run(self, stage: Stage, title: str, line: str, call: Callable[[Path], None],
             files: dict[str, str] | None = None) -> Path:
        if stage.complete:
            return self._skip(stage, title)
        # Two runs of the benchmark may share a --work folder (one sampling a task while the other builds the
        # main table): a stage is run under an exclusive lock on <folder>.lock, and a run that finds the lock
        # held waits for the other to finish that stage and then uses it.
        import fcntl

        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / f"{stage.folder.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"\n   {title}: another run of the benchmark is running {stage.folder.name}; waiting for it",
                      flush=True)
                fcntl.flock(lock, fcntl.LOCK_EX)
            if stage.complete:
                return self._skip(stage, title)
            return self._run_locked(stage, title, line, call, files)

    def _skip(self, stage: Stage, title: str) -> Path:
        number = len(self.timings) + 1
        recorded = stage.recorded_seconds()
        print(f"\n== [{number}] {title}: finished before, skipped ({stage.folder.name}"
              + (f", took {recorded:.1f} s" if recorded is not None else "") + ")", flush=True)
        self.timings.append((stage.folder.name, "cached", 0.0, recorded))
        return stage.out

    def _run_locked(self, stage: Stage, title: str, line: str, call: Callable[[Path], None],
                    files: dict[str, str] | None) -> Path:
        number = len(self.timings) + 1
        print(f"\n== [{number}] {title}\n   stage {stage.folder}\n   $ {line}", flush=True)
        if stage.folder.exists():
            print(f"   {stage.folder.name} was left unfinished (no {COMPLETE}): redoing it", flush=True)
            shutil.rmtree(stage.folder)
        stage.folder.mkdir(parents=True)
        record = {"stage": stage.name, "hash": stage.hash, "title": title, "command": line, "args": stage.args,
                  "inputs": {role: str(s.folder if s.external is None else s.external) for role, s in stage.inputs.items()},
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (stage.folder / STAGE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for name, text in (files or {}).items():
            (stage.folder / name).write_text(text)
        t0 = time.perf_counter()
        call(stage.out)
        seconds = time.perf_counter() - t0
        (stage.folder / COMPLETE).write_text(json.dumps({
            "seconds": round(seconds, 1), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
        self.timings.append((stage.folder.name, "ran", seconds, seconds))
        print(f"   done in {seconds:.1f} s", flush=True)
        return stage.out

    def timing_lines(self) -> list[str]:
        lines = ["Stage timings (this run; cached stages with the time they took when they ran):"]
        for name, status, now, recorded in self.timings:
            then = f" (took {recorded:.1f} s)" if status == "cached" and recorded is not None else ""
            lines.append(f"  {now:8.1f} s  {status:<6}  {name}{then}")
        lines.append(f"  {time.perf_counter() - self.started:8.1f} s  total")
        return lines


# -- populations --------------------------------------------------------------------------------------------

TRAIN_POPULATION, EVAL_POPULATION = "train_population", "evaluation_population"
POPULATIONS_FILE = "populations.json"


def combine_populations(train_meds: Path, eval_meds: Path, out: Path) -> dict:
    """One MEDS folder of both populations: the train population's train and tuning subjects keep their
    splits, its held_out subjects become tuning (they are never evaluated), and every subject of the evaluation
    population is held_out. Data shards are relative symlinks (``data/train_population/``,
    ``data/evaluation_population/``); codes.parquet is the union, subject_splits.parquet the new splits,
    dataset.json the merged metadata, populations.json where each part came from. No simulator.json: the
    oracle reads the evaluation population's own folder."""
    from nextvisit.data.meds import data_files, read_splits_checked

    train_meds, eval_meds, out = Path(train_meds), Path(eval_meds), Path(out)
    train_splits, eval_splits = read_splits_checked(train_meds), read_splits_checked(eval_meds)
    not_held_out = eval_splits.filter(pl.col("split") != meds.held_out_split)
    if not_held_out.height:
        raise UserError(f"{eval_meds}/metadata/subject_splits.parquet: subject {not_held_out['subject_id'][0]} is in "
                        f"split {not_held_out['split'][0]!r}; an evaluation population is all held_out "
                        "(nextvisit simulate --split held_out)")
    shared = train_splits.join(eval_splits, on="subject_id", how="inner")
    if shared.height:
        raise UserError(f"{train_meds} and {eval_meds} share {shared.height} subject id(s) (e.g. {shared['subject_id'][0]}); "
                        "simulate the evaluation population with --first-subject-id after the train population's ids")
    moved = train_splits.filter(pl.col("split") == meds.held_out_split).height
    splits = pl.concat([
        train_splits.with_columns(pl.when(pl.col("split") == meds.held_out_split).then(pl.lit(meds.tuning_split))
                                  .otherwise(pl.col("split")).alias("split")),
        eval_splits,
    ]).sort("subject_id")
    (out / "metadata").mkdir(parents=True)
    for role, source in ((TRAIN_POPULATION, train_meds), (EVAL_POPULATION, eval_meds)):
        for shard in data_files(source):
            link = out / "data" / role / shard.relative_to(source / "data")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(shard.resolve(), link.parent.resolve()), link)
    import pyarrow as pa
    import pyarrow.parquet as pq

    split_table = pa.table({"subject_id": pa.array(splits["subject_id"].to_list(), pa.int64()),
                            "split": pa.array(splits["split"].to_list(), pa.string())})
    meds.SubjectSplitSchema.validate(split_table)
    pq.write_table(split_table, out / "metadata" / "subject_splits.parquet")
    code_tables = [pq.read_table(p / "metadata" / "codes.parquet") for p in (train_meds, eval_meds)
                   if (p / "metadata" / "codes.parquet").is_file()]
    if code_tables:
        codes = pl.from_arrow(pa.concat_tables(code_tables, promote_options="default"))
        codes = codes.unique("code", keep="first", maintain_order=True).sort("code").to_arrow().cast(code_tables[0].schema)
        meds.CodeMetadataSchema.validate(codes)
        pq.write_table(codes, out / "metadata" / "codes.parquet")
    versions = [json.loads((p / "metadata" / "dataset.json").read_text()) if (p / "metadata" / "dataset.json").is_file()
                else {} for p in (train_meds, eval_meds)]
    dataset = {"dataset_name": "nextvisit-quality-populations",
               "dataset_version": (f"train {versions[0].get('dataset_name', '?')} {versions[0].get('dataset_version', '?')}"
                                   f" + evaluation {versions[1].get('dataset_name', '?')} {versions[1].get('dataset_version', '?')}"),
               "etl_name": "benchmarks.quality", "etl_version": "1",
               "meds_version": versions[0].get("meds_version", getattr(meds, "__version__", "0.4"))}
    meds.DatasetMetadataSchema.validate(dataset)
    (out / "metadata" / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    counts = splits.join(pl.DataFrame({"subject_id": eval_splits["subject_id"]}).with_columns(
        pl.lit(EVAL_POPULATION).alias("population")), on="subject_id", how="left").with_columns(
        pl.col("population").fill_null(TRAIN_POPULATION))
    summary = {
        "rule": ("train population: train and tuning kept, its held_out moved to tuning (never evaluated); "
                 "evaluation population: every subject held_out"),
        TRAIN_POPULATION: {"meds": str(train_meds.resolve()), "held_out_moved_to_tuning": moved},
        EVAL_POPULATION: {"meds": str(eval_meds.resolve())},
        "subjects": {f"{population}/{split}": n for population, split, n in
                     counts.group_by("population", "split").len().sort("population", "split").iter_rows()},
    }
    (out / "metadata" / POPULATIONS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_held_out_labels(labels_dir: Path, out: Path) -> int:
    """The labels folder's held_out rows alone (with its task.yaml), for the oracle: it re-creates the
    evaluation population from that population's own folder, which holds no train-population subject."""
    from nextvisit.tasks import read_labels

    frame = read_labels(labels_dir)
    held = frame.filter(pl.col("split") == meds.held_out_split)
    out.mkdir(parents=True)
    held.write_parquet(out / "labels.parquet")
    shutil.copy(Path(labels_dir) / "task.yaml", out / "task.yaml")
    return held.height


def write_subject_subset_labels(labels_dir: Path, out: Path, subjects: int, seed: int) -> dict:
    """The held_out rows of ``subjects`` held_out subjects drawn at random (``seed``), with the task.yaml: the
    rows the sampling table scores."""
    from nextvisit.tasks import read_labels

    frame = read_labels(labels_dir).filter(pl.col("split") == meds.held_out_split)
    ids = np.sort(frame["subject_id"].unique().to_numpy())
    chosen = np.random.default_rng(seed).choice(ids, size=min(subjects, len(ids)), replace=False)
    subset = frame.filter(pl.col("subject_id").is_in(chosen.tolist()))
    out.mkdir(parents=True)
    subset.write_parquet(out / "labels.parquet")
    shutil.copy(Path(labels_dir) / "task.yaml", out / "task.yaml")
    return {"subjects": int(len(chosen)), "of": int(len(ids)), "rows": subset.height}


def write_case_control_labels(labels_dir: Path, out: Path, positives: int, negatives: int, seed: int) -> dict:
    """Per horizon, ``positives`` held_out label rows drawn at random among that horizon's positive rows and
    ``negatives`` among its negative rows (all of them where there are fewer), with the task.yaml: the rows the
    sampling table scores. Censored rows are left out (no AUROC reads them). Each class is a uniform sample of
    its rows, so the AUROC on these rows estimates the AUROC on all held_out rows without bias (it compares
    positive with negative rows, and sampling within a class does not change its score distribution); the
    interval is wider, as for any sample. The same (subject, prediction time) drawn for both horizons is one
    history, rolled once to the longer horizon."""
    from nextvisit.tasks import read_labels

    frame = read_labels(labels_dir).filter(pl.col("split") == meds.held_out_split)
    rng = np.random.default_rng(seed)
    parts, summary = [], {}
    for horizon in sorted(frame["horizon_days"].unique().to_list()):
        rows = frame.filter(pl.col("horizon_days") == horizon)
        cell = {}
        for name, value, wanted in (("positive", True, positives), ("negative", False, negatives)):
            pool = rows.filter(pl.col("boolean_value") == value).sort("subject_id", "prediction_time")
            pick = np.sort(rng.choice(pool.height, size=min(wanted, pool.height), replace=False))
            chosen = pool[pick.tolist()] if pool.height else pool
            parts.append(chosen)
            cell[f"{name}_rows"] = f"{chosen.height:,} of {pool.height:,}"
            cell[f"{name}_subjects"] = int(chosen["subject_id"].n_unique())
        cell["censored_rows_left_out"] = int(rows["boolean_value"].is_null().sum())
        summary[f"{horizon} d"] = cell
    subset = pl.concat(parts).sort("subject_id", "prediction_time", "horizon_days")
    out.mkdir(parents=True)
    subset.write_parquet(out / "labels.parquet")
    shutil.copy(Path(labels_dir) / "task.yaml", out / "task.yaml")
    summary["histories"] = int(subset.select("subject_id", "prediction_time").unique().height)
    return summary


def write_prediction_subset(predictions_dir: Path, labels_dir: Path, out: Path) -> int:
    """A predictions folder restricted to the (subject, prediction time, horizon) rows of a labels folder."""
    from nextvisit.artifacts.predictions import INFO_FILE, PREDICTIONS_FILE
    from nextvisit.tasks import read_labels

    on = ["subject_id", "prediction_time", "horizon_days"]
    frame = pl.read_parquet(Path(predictions_dir) / PREDICTIONS_FILE)
    keys = read_labels(labels_dir).select(on).unique().cast({c: frame.schema[c] for c in on})
    frame = frame.join(keys, on=on)
    out.mkdir(parents=True)
    frame.write_parquet(out / PREDICTIONS_FILE)
    shutil.copy(Path(predictions_dir) / INFO_FILE, out / INFO_FILE)
    return frame.height


def draw_sampling_plot(rows: list[dict], out: Path) -> Path:
    """AUROC (95% interval) against the number of samples, per task-horizon: both estimators, with the horizon
    query and the other models as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cells = sorted({(r["task"], r["horizon_days"]) for r in rows})
    fig = Figure(figsize=(4.2 * len(cells), 3.8))
    for i, cell in enumerate(cells):
        ax = fig.add_subplot(1, len(cells), i + 1)
        mine = [r for r in rows if (r["task"], r["horizon_days"]) == cell]
        for estimator, marker in (("monte_carlo", "o"), ("rao_blackwell", "s")):
            points = sorted((r["samples"], r) for r in mine if r.get("estimator") == estimator)
            if points:
                xs = [n for n, _ in points]
                ys = [r["auroc"] for _, r in points]
                err = [[r["auroc"] - r["auroc_low"] for _, r in points], [r["auroc_high"] - r["auroc"] for _, r in points]]
                ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=estimator.replace("_", " "))
        for r in mine:
            if r.get("estimator") is None:
                ax.axhline(r["auroc"], linestyle="--" if r["kind"] != ZERO_SHOT else "-", linewidth=1, color=None)
                ax.annotate(r["model"], (1, r["auroc"]), fontsize=7, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("samples per history")
        ax.set_ylabel("held_out AUROC")
        ax.set_title(f"{cell[0]}, {cell[1]} days", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(out) / "sampling_auroc.png"
    fig.savefig(path, dpi=100)
    return path


# -- the age-and-sex reference as a compared model ------------------------------------------------------------


def age_sex_model():
    """A ``compare.ComparedModel`` around ``nextvisit.predict.occurrence.age_sex_reference``: for each horizon,
    a logistic regression on age (B-spline) and sex fit on that horizon's train label rows."""
    from nextvisit.artifacts.predictions import COUNT_FEATURES
    from nextvisit.compare import ComparedModel
    from nextvisit.predict.occurrence import AgeSexReferenceConfig, age_sex_reference

    class AgeSexModel(ComparedModel):
        name = "age_sex"
        kind = COUNT_FEATURES  # the predictions schema's kind; the benchmark's table calls it a reference
        needs_task = False

        def __init__(self):
            self.config = AgeSexReferenceConfig()
            self.fits: dict = {}

        def read(self, meds_dir, labels):
            return None

        def fit(self, inputs, train: pl.DataFrame, tuning: pl.DataFrame):
            self.train = train
            return self

        def predict_proba(self, inputs, rows: pl.DataFrame) -> np.ndarray:
            risk = np.full(rows.height, np.nan)
            columns = ["age_years", "sex", "split", "boolean_value"]
            indexed = rows.with_row_index("_position")
            for (task, horizon), part in indexed.group_by(["task", "horizon_days"]):
                train = self.train.filter((pl.col("task") == task) & (pl.col("horizon_days") == horizon))
                frame = pl.concat([train.select(columns), part.select(columns)]).with_columns(
                    pl.lit(False).alias("prior_occurrence"))  # horizon labels hold no prevalent subject
                scores, fit = age_sex_reference(frame, self.config, source=f"{task}@{horizon} train label rows")
                risk[part["_position"].to_numpy()] = scores[train.height:]
                self.fits[f"{task}@{horizon}"] = {**fit, "fit_rows": "train label rows of this task and horizon"}
            return risk

        def info(self) -> dict:
            return {"config": {"features": "age (B-spline) and sex", **asdict(self.config)}, "fit": self.fits}

    return AgeSexModel()


def write_age_sex_predictions(meds_dir: Path, labels_dir: Path, out: Path) -> None:
    from nextvisit import compare

    compare.run(age_sex_model(), meds_dir, labels_dir, out)


# -- the table ----------------------------------------------------------------------------------------------


@dataclass
class TableModel:
    """One model's predictions for the table: its name, table kind, predictions folder and budget record."""

    name: str
    kind: str
    predictions: Path
    budget: dict = field(default_factory=dict)


def _interval(values: np.ndarray, confidence: float) -> tuple[float | None, float | None]:
    from nextvisit.evaluate.bootstrap import percentile_interval

    low, high = percentile_interval(values, confidence)
    return (None if not np.isfinite(low) else low), (None if not np.isfinite(high) else high)


def _number(value) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def quality_rows(models: list[TableModel], n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95,
                 zero_shot_reference: str | None = None) -> tuple[list[dict], list[str]]:
    """The table: one row per model and task-horizon (held_out rows), and the warnings.

    Every model of one task-horizon must score the same held_out rows (a ``UserError`` otherwise): they then get
    the same subject-level resamples (``rng_for``), so the oracle share and the zero-shot differences are
    paired. ``zero_shot_reference``: the zero-shot model the differences are taken from (default: the first
    zero-shot model)."""
    from nextvisit.artifacts.predictions import find_prediction_files, read_predictions
    from nextvisit.evaluate.bootstrap import View, rng_for, subject_bootstrap
    from nextvisit.evaluate.evaluation import (
        EvaluationConfig, _age_sex_strata, _oracle_shares, _positive_subjects, _prepare,
    )
    from nextvisit.evaluate.metrics import auroc, metric, stratified_auroc

    config = EvaluationConfig(n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    warnings: list[str] = []
    cells: dict[tuple[str, int], list[tuple[TableModel, object]]] = {}
    for model in models:
        for file in find_prediction_files(model.predictions):
            for pred in read_predictions(file, warnings):
                cells.setdefault((pred.task, pred.horizon_days), []).append((model, pred))
    zero_shot = [m.name for m in models if m.kind == ZERO_SHOT]
    reference = zero_shot_reference if zero_shot_reference in zero_shot else (zero_shot[0] if zero_shot else None)
    table = []
    for (task, horizon), group in sorted(cells.items()):
        entries = []
        for model, pred in group:
            p = _prepare(pred, config, warnings)
            entries.append({"model": model.name, "table_model": model, "is_oracle": model.kind == ORACLE,
                            "_prepared": p, "_keys": p.keys})
        first = entries[0]["_prepared"]
        for e in entries[1:]:
            p = e["_prepared"]
            same = (first.keys is not None and p.keys is not None and np.array_equal(first.keys, p.keys)
                    and np.array_equal(first.labels, p.labels))
            if not same:
                raise UserError(f"{task} at {horizon} days: {e['model']!r} scored {len(p.labels):,} held_out rows, "
                                f"{entries[0]['model']!r} {len(first.labels):,} (or other rows or labels); the table "
                                "compares models on identical rows: score the same labels folder's held_out rows")
        for e in entries:
            p = e["_prepared"]
            both = bool(p.labels.any() and not p.labels.all())
            strata, strata_problem = _age_sex_strata(p, config)
            views = {"sample": View()}
            if strata is not None:
                views["stratified"] = View(strata=strata)
            boot = subject_bootstrap(p.labels, p.scores, p.subject_ids, config.n_bootstrap, config.bootstrap_block_cells,
                                     rng_for(config.seed, task, horizon, "all"), views) if both else None
            value = auroc(p.labels, p.scores) if both else float("nan")
            e["auroc"] = metric(value)
            e["_boot"] = boot
            e["_auroc_boot"] = boot.get("sample.auroc") if boot is not None else np.array([])
            e["_interval"] = _interval(e["_auroc_boot"], confidence)
            if strata is not None and both:
                known = strata != ""
                e["_age_sex"] = stratified_auroc(p.labels[known], p.scores[known], strata[known])
                e["_age_sex_interval"] = _interval(boot.get("stratified.auroc"), confidence)
            else:
                e["_age_sex"], e["_age_sex_interval"] = float("nan"), (None, None)
                if strata_problem:
                    warnings.append(f"{e['model']} on {task} at {horizon} days: no age-sex-stratified AUROC ({strata_problem})")
        # the oracle share with its paired interval, exactly as `nextvisit evaluate` computes it
        _oracle_shares(entries, config, warnings, f"{task} at {horizon} days")
        ref = next((e for e in entries if e["model"] == reference), None)
        for e in entries:
            p, model = e["_prepared"], e["table_model"]
            share = e.get("oracle_share") or {}
            share_ci = share.get("ci") or [None, None]
            row = {
                "model": model.name, "kind": model.kind, "task": task, "horizon_days": int(horizon),
                "auroc": _number(e["auroc"]["value"]), "auroc_low": e["_interval"][0], "auroc_high": e["_interval"][1],
                "age_sex_auroc": _number(e["_age_sex"]), "age_sex_auroc_low": e["_age_sex_interval"][0],
                "age_sex_auroc_high": e["_age_sex_interval"][1],
                "positive_subjects": _positive_subjects(p.labels, p.subject_ids),
                "subjects": int(len(np.unique(p.subject_ids))),
                "positive_rows": int(p.labels.sum()), "rows": int(len(p.labels)),
                "oracle_share": share.get("value"), "oracle_share_low": share_ci[0], "oracle_share_high": share_ci[1],
                "zero_shot_reference": None, "difference_vs_zero_shot": None,
                "difference_vs_zero_shot_low": None, "difference_vs_zero_shot_high": None,
                "budget": model.budget, "predictions": str(model.predictions),
            }
            if ref is not None and e is not ref and ref["_boot"] is not None and e["_boot"] is not None:
                # paired: the same resampled subjects for both models
                row["zero_shot_reference"] = reference
                row["difference_vs_zero_shot"] = _number(ref["auroc"]["value"] - e["auroc"]["value"])
                low, high = _interval(ref["_auroc_boot"] - e["_auroc_boot"], confidence)
                row["difference_vs_zero_shot_low"], row["difference_vs_zero_shot_high"] = low, high
            table.append(row)
        fewest = min(_positive_subjects(e["_prepared"].labels, e["_prepared"].subject_ids) for e in entries)
        if fewest < MIN_POSITIVE_SUBJECTS:
            warnings.append(f"{task} at {horizon} days: {fewest} positive held_out subjects, fewer than the "
                            f"{MIN_POSITIVE_SUBJECTS} the benchmark is sized for; intervals will be wide")
    return table, warnings


def _cell(value, low=None, high=None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if low is not None and high is not None:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def _signed(value, low, high) -> str:
    if value is None:
        return ""
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]" if low is not None and high is not None else f"{value:+.3f}"


def format_table(rows: list[dict], budget_rule: str = "") -> str:
    """The plain-text table, one block per task-horizon, then each model's budget."""
    header = ["model", "kind", "AUROC [95% CI]", "age-sex AUROC [95% CI]", "oracle share [95% CI]",
              "zero-shot minus model [95% CI]"]
    lines = []
    for (task, horizon) in dict.fromkeys((r["task"], r["horizon_days"]) for r in rows):
        cell = [r for r in rows if r["task"] == task and r["horizon_days"] == horizon]
        table = [header]
        for r in cell:
            table.append([r["model"], r["kind"], _cell(r["auroc"], r["auroc_low"], r["auroc_high"]),
                          _cell(r["age_sex_auroc"], r["age_sex_auroc_low"], r["age_sex_auroc_high"]),
                          _cell(r["oracle_share"], r["oracle_share_low"], r["oracle_share_high"], 2),
                          _signed(r["difference_vs_zero_shot"], r["difference_vs_zero_shot_low"],
                                  r["difference_vs_zero_shot_high"])])
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        first = cell[0]
        lines.append(f"\n{task}, {horizon} days: {first['positive_subjects']:,} positive of {first['subjects']:,} held_out "
                     f"subjects ({first['positive_rows']:,} positive of {first['rows']:,} rows)")
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    reference = next((r["zero_shot_reference"] for r in rows if r["zero_shot_reference"]), None)
    if reference:
        lines.append(f"\nDifferences: {reference} minus the model, on the same resampled subjects (paired).")
    lines.append("Oracle share: (AUROC - 0.5) / (oracle AUROC - 0.5), paired interval.")
    budgets = {r["model"]: r["budget"] for r in rows}
    if budget_rule:
        lines.append(f"\nBudget rule: {budget_rule}")
    lines.append("Budgets (what each model got):")
    for name, budget in budgets.items():
        lines.append(f"  {name}: {describe_budget(budget)}")
    return "\n".join(lines) + "\n"


def describe_budget(budget: dict) -> str:
    if not budget:
        return "no training"
    parts = []
    for key, value in budget.items():
        if isinstance(value, float):
            value = f"{value:.2f}"
        elif isinstance(value, int):
            value = f"{value:,}"
        parts.append(f"{key} {value}")
    return ", ".join(parts)


# -- variants -----------------------------------------------------------------------------------------------

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def read_variants(path: Path | None) -> dict:
    """``nextvisit`` (the project defaults) plus the file's variants: name -> {preset, pretrain, forecast}.
    ``pretrain`` holds RunConfig YAML overrides (train.max_steps and train.decay_steps are the budget's);
    ``forecast`` holds ``aggregator``, ``multi_horizon`` and ``history_tokens``."""
    variants = {DEFAULT_VARIANT: {"preset": None, "pretrain": {}, "forecast": {}}}
    if path is None:
        return variants
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--variants {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of variant name -> {{pretrain: ..., forecast: ...}}")
    for name, spec in data.items():
        name = str(name)
        if not NAME_PATTERN.match(name):
            raise UserError(f"{path}: variant name {name!r} must be letters, digits, '_', '-' or '.'")
        if name in variants or name in BASELINES or name == DATA_ONLY:
            raise UserError(f"{path}: variant name {name!r} is taken (by the default variant or a baseline); rename it")
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - set(VARIANT_KEYS):
            raise UserError(f"{path}: variant {name!r} must be a mapping with keys among {', '.join(VARIANT_KEYS)}")
        forecast = spec.get("forecast") or {}
        if not isinstance(forecast, dict) or set(forecast) - set(FORECAST_KEYS):
            raise UserError(f"{path}: variant {name!r}: forecast takes {', '.join(FORECAST_KEYS)}")
        train = (spec.get("pretrain") or {}).get("train") or {}
        budget_keys = sorted(set(train) & {"max_steps", "decay_steps"})
        if budget_keys:
            raise UserError(f"{path}: variant {name!r} sets train.{budget_keys[0]}; the benchmark sets the schedule "
                            "from the budget (use --pretrain-steps to fix the steps)")
        variants[name] = {"preset": spec.get("preset"), "pretrain": spec.get("pretrain") or {}, "forecast": forecast}
    return variants


def run_config_for(variant: dict, preset_name: str):
    """The variant's resolved RunConfig (its overrides checked now, before any stage runs)."""
    from nextvisit.config import merge, preset

    name = variant.get("preset") or preset_name
    return merge(preset(name), variant["pretrain"], "variant pretrain overrides").validate(), name


# -- the benchmark ------------------------------------------------------------------------------------------


def _read_metrics_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def calibrated_steps(calibration_run: Path, budget_minutes: float) -> dict:
    """Steps that take about ``budget_minutes``, from a calibration run's metrics.csv (module docstring)."""
    rows = [r for r in _read_metrics_csv(calibration_run / "metrics.csv") if r.get("elapsed_s") and r.get("step")]
    logged = {int(r["step"]): float(r["elapsed_s"]) for r in rows if r.get("loss")}
    last = max(logged)
    if last <= CALIBRATION_SKIP or CALIBRATION_SKIP not in logged:
        raise UserError(f"{calibration_run}/metrics.csv: the calibration run logged no step after step "
                        f"{CALIBRATION_SKIP}; it cannot measure the seconds per step")
    per_step = (logged[last] - logged[CALIBRATION_SKIP]) / (last - CALIBRATION_SKIP)
    setup = max(0.0, logged[CALIBRATION_SKIP] - CALIBRATION_SKIP * per_step)
    steps = int((budget_minutes * 60 - setup) / per_step)
    if steps < 1:
        raise UserError(f"--budget-minutes {budget_minutes}: the setup alone takes {setup:.0f} s here "
                        f"({per_step:.2f} s per step); give a larger budget")
    return {"seconds_per_step": per_step, "setup_seconds": setup, "steps": steps}


def nextvisit_budget(run: Path, plan: dict, device: str) -> dict:
    rows = [r for r in _read_metrics_csv(run / "metrics.csv") if r.get("step")]
    last = rows[-1]
    budget = {"rule": plan["rule"], "planned_minutes": plan.get("planned_minutes"),
              "minutes": float(last["elapsed_s"]) / 60 if last.get("elapsed_s") else None,
              "steps": int(last["step"]), "planned_steps": plan["steps"],
              "tokens": int(last["tokens"]) if last.get("tokens") else None, "device": device}
    if "seconds_per_step" in plan:
        budget["calibrated_seconds_per_step"] = plan["seconds_per_step"]
    return {k: v for k, v in budget.items() if v is not None}


def masked_budget(pretrain_run: Path, finetunes: dict[str, Stage], minutes: float, finetune_rule: str,
                  device: str) -> dict:
    """The masked model's budget record: its pretraining, and per task the fine-tuning's minutes, the steps of each
    taken, why they stopped and the step kept."""
    config = yaml.safe_load((pretrain_run / "config.yaml").read_text())
    return {"rule": "wall time", "planned_minutes": minutes, "minutes": config["seconds"] / 60,
            "steps": int(config["steps"]), "threads": config["pretrain"].get("threads") or "default",
            "finetune_rule": finetune_rule,
            "finetune_minutes_used": {task: round((s.recorded_seconds() or 0) / 60, 2) for task, s in finetunes.items()},
            "finetune_fit": {task: finetune_fit(s.out) for task, s in finetunes.items()},
            "device": device}


def finetune_budget(config: QualityConfig) -> tuple[dict, list, str]:
    """The masked fine-tuning's limit: (stage arguments, command-line flags, the rule in words)."""
    if config.finetune_steps is None:
        return ({"minutes": config.finetune_minutes}, ["--max-minutes", f"{config.finetune_minutes:g}"],
                f"{config.finetune_minutes:g} min per task")
    return ({"steps": config.finetune_steps}, ["--max-steps", config.finetune_steps],
            f"at most {config.finetune_steps:,} steps per run (--finetune-steps)")


def finetune_fit(run: Path) -> dict:
    """A masked fine-tuning's fit (its info.json): steps, why they stopped, the step kept, seconds per phase."""
    path = run / "info.json"
    if not path.is_file():
        return {}
    fit = json.loads(path.read_text()).get("fit") or {}
    return {k: fit[k] for k in ("steps", "stop_reason", "best_step", "best_tuning_auroc", "seconds") if k in fit}


def pretraining_key(variant: dict, preset_name: str) -> str:
    return json.dumps([variant.get("preset") or preset_name, variant["pretrain"]], sort_keys=True)


def pretraining_owner(variants: dict, name: str, preset_name: str) -> str:
    """The first variant (file order, ``nextvisit`` first) with the same pretraining as ``name``."""
    key = pretraining_key(variants[name], preset_name)
    return next(other for other, spec in variants.items() if pretraining_key(spec, preset_name) == key)


def pretrain_variant(runner: Runner, config: QualityConfig, store: Stage, name: str, variant: dict) -> tuple[Stage, dict]:
    """Calibrate (unless --pretrain-steps) and pretrain one variant: (pretraining stage, its step plan)."""
    run_config, preset_name = run_config_for(variant, config.preset)
    warmup = run_config.train.warmup_steps
    base_args = {"preset": preset_name, "overrides": variant["pretrain"], "device": config.device}
    calibration = None
    if config.pretrain_steps is not None:
        plan = {"rule": "fixed steps (--pretrain-steps)", "steps": config.pretrain_steps}
    else:
        calibration = runner.stage(f"calibrate_{name}", {**base_args, "steps": CALIBRATION_STEPS}, store=store)
        runner.cli(calibration, f"calibrate {name}: seconds per pretraining step ({CALIBRATION_STEPS} steps)",
                   ["pretrain", store.out, "--out", calibration.out, "--preset", preset_name,
                    "--config", calibration.folder / "calibrate.yaml", "--max-steps", CALIBRATION_STEPS,
                    "--device", config.device],
                   files={"calibrate.yaml": yaml.safe_dump(variant["pretrain"] or {}, sort_keys=False)})
        plan = {"rule": "fixed steps calibrated to the budget", "planned_minutes": config.budget_minutes,
                **calibrated_steps(calibration.out, config.budget_minutes)}
    steps = plan["steps"]
    schedule = {"max_steps": steps, "decay_steps": max(1, steps - warmup)}  # the cosine ends at the last step
    overrides = {**variant["pretrain"], "train": {**(variant["pretrain"].get("train") or {}), **schedule}}
    pretrain_args = {**base_args, "schedule": schedule}
    limit = []
    if calibration is not None:  # a safety stop on a machine slower than at calibration
        pretrain_args["budget_minutes"] = config.budget_minutes
        limit = ["--max-minutes", f"{SAFETY_FACTOR * config.budget_minutes:g}"]
    pretrain = runner.stage(f"pretrain_{name}", pretrain_args, store=store,
                            **({"calibration": calibration} if calibration else {}))
    runner.cli(pretrain, f"pretrain {name} ({steps:,} steps, preset {preset_name})",
               ["pretrain", store.out, "--out", pretrain.out, "--preset", preset_name,
                "--config", pretrain.folder / "pretrain.yaml", *limit, "--device", config.device],
               files={"pretrain.yaml": yaml.safe_dump(overrides, sort_keys=False)})
    return pretrain, plan


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def selected_models(config: QualityConfig) -> tuple[list[str], bool]:
    """(models to run, whether only the data stages were asked for)."""
    known = [*config.variants, *BASELINES]
    if config.only is None:
        chosen = [m for m in known if not (m == "oracle" and config.dataset == SYNTHEA)]
        return chosen, False
    unknown = [n for n in config.only if n not in known and n != DATA_ONLY]
    if unknown:
        raise UserError(f"--only {','.join(unknown)}: unknown; choose among {', '.join(known)} (or {DATA_ONLY})")
    if config.dataset == SYNTHEA and "oracle" in config.only:
        raise UserError("--only oracle: the Synthea data has no ground truth; the oracle exists only on simulated data")
    return [m for m in known if m in config.only], DATA_ONLY in config.only


def run_benchmark(config: QualityConfig, rerun: str, json_path: Path | None = None) -> list[dict]:
    config.device = resolve_device(config.device)
    for variant in config.variants.values():
        run_config_for(variant, config.preset)  # fail on a bad override before anything runs
    models, data_only = selected_models(config)
    if not models and not data_only:
        raise UserError("--only selected nothing to run")
    work = Path(config.work).resolve()  # commands run from the repository root
    work.mkdir(parents=True, exist_ok=True)
    runner = Runner(work, rerun)
    tasks = config.tasks
    needs_store = any(m in config.variants or m == "masked" for m in models) or data_only

    # data
    if config.dataset == SIMULATED:
        sim_train = runner.stage("simulate_train", {"subjects": config.train_subjects, "seed": config.train_seed})
        runner.cli(sim_train, f"simulate the train population ({config.train_subjects:,} subjects, seed {config.train_seed})",
                   ["simulate", "--subjects", config.train_subjects, "--seed", config.train_seed, "--out", sim_train.out])
        first_eval = config.train_subjects + 1
        sim_eval = runner.stage("simulate_eval", {"subjects": config.eval_subjects, "seed": config.eval_seed,
                                                  "first_subject_id": first_eval, "split": meds.held_out_split})
        runner.cli(sim_eval, f"simulate the evaluation population ({config.eval_subjects:,} subjects, seed "
                             f"{config.eval_seed}, ids from {first_eval:,}, all held_out)",
                   ["simulate", "--subjects", config.eval_subjects, "--seed", config.eval_seed, "--first-subject-id",
                    first_eval, "--split", meds.held_out_split, "--out", sim_eval.out])
        if config.eval_seed == config.train_seed:
            print("note: --eval-seed equals --train-seed; the populations are still disjoint (other ids), and "
                  "independent because each subject draws from (seed, id)")
        data = runner.stage("combine", {"rule": "train held_out -> tuning; evaluation population held_out"},
                            train=sim_train, eval=sim_eval)
        runner.python(data, "combine the populations into one MEDS folder",
                      lambda out: print("   " + json.dumps(combine_populations(sim_train.out, sim_eval.out, out)["subjects"])),
                      f"combine_populations({sim_train.out}, {sim_eval.out})")
    else:
        if not Path(config.synthea_dir).is_dir():
            raise UserError(f"--dataset synthea: {config.synthea_dir} is missing; it holds the Synthea MEDS data "
                            "(../shared/data/README.md), or pass --synthea-dir")
        data = Stage(name="synthea", args=folder_fingerprint(config.synthea_dir), inputs={}, work=work,
                     external=Path(config.synthea_dir).resolve())
        sim_eval = None
        print(f"data: {data.out} (its own splits: train, tuning, held_out)")

    store = None
    if needs_store:
        store = runner.stage("tokenize", {}, meds=data)
        runner.cli(store, "tokenize (vocabulary and lab statistics from train only)", ["tokenize", data.out, "--out", store.out])
    labels = {}
    for task in tasks:
        labels[task] = runner.stage(f"label_{task}", {"task": task}, meds=data)
        runner.cli(labels[task], f"label {task}", ["label", data.out, task, "--out", labels[task].out])
    if data_only and not models:
        print("\n" + "\n".join(runner.timing_lines()))
        return []

    table_models: list[TableModel] = []
    predictions: dict[str, dict[str, Stage]] = {}
    rules = []

    # next-visit variants: calibrate, pretrain, forecast
    pretrained: dict[str, tuple[Stage, dict]] = {}
    for name in [m for m in models if m in config.variants]:
        variant = config.variants[name]
        # variants that differ only in how they forecast share one pretraining (named after the first of them)
        owner = pretraining_owner(config.variants, name, config.preset)
        if owner not in pretrained:
            pretrained[owner] = pretrain_variant(runner, config, store, owner, config.variants[owner])
        pretrain, plan = pretrained[owner]
        forecast = variant["forecast"]
        predictions[name] = {}
        # the sampled tasks' forecasts first: a second run of the benchmark that samples one task (on the same
        # --work) then starts on its forecast while the first run forecasts the other task
        first = [t for t in (config.sample_tasks or ()) if t in tasks] if config.samples else []
        for task in [*first, *(t for t in tasks if t not in first)]:
            options = {"aggregator": forecast.get("aggregator", "sum_logits"),
                       "multi_horizon": bool(forecast.get("multi_horizon", False)), "splits": meds.held_out_split,
                       "device": config.device}
            history = ["--history-tokens", forecast["history_tokens"]] if forecast.get("history_tokens") else []
            if history:  # only then in the hash, so the forecasts of every earlier run stay cached
                options["history_tokens"] = int(forecast["history_tokens"])
            stage = runner.stage(f"forecast_{name}_{task}", options, run=pretrain, meds=data, labels=labels[task])
            runner.cli(stage, f"zero-shot forecast {task} ({name})",
                       ["forecast", pretrain.out, data.out, labels[task].out, "--out", stage.out,
                        "--aggregator", options["aggregator"], *(["--multi-horizon"] if options["multi_horizon"] else []),
                        *history, "--splits", options["splits"], "--device", config.device])
            predictions[name][task] = stage
        budget = nextvisit_budget(pretrain.out, plan, config.device)
        if owner != name:
            budget["pretraining_of"] = owner
        table_models.append(TableModel(name, ZERO_SHOT, Path(), budget))
    if any(m in config.variants for m in models):
        rules.append(
            "next-visit pretraining: a fixed number of steps, " + (
                f"calibrated to {config.budget_minutes:g} min ({CALIBRATION_STEPS}-step calibration run of the same "
                f"variant, store and device; steps = (budget - setup) / seconds per step)"
                if config.pretrain_steps is None else f"{config.pretrain_steps:,} (--pretrain-steps)")
            + f", cosine decay to the last step, safety stop at {SAFETY_FACTOR:g} x")

    if "masked" in models:
        masked_args = {"preset": config.masked_preset, "minutes": config.budget_minutes, "device": config.device}
        masked = runner.stage("masked_pretrain", masked_args, store=store)
        runner.cli(masked, f"masked transformer: pretrain ({config.budget_minutes:g} min)",
                   ["baseline", "masked", "pretrain", store.out, "--out", masked.out, "--preset", config.masked_preset,
                    "--config", masked.folder / "masked.yaml", "--max-minutes", f"{config.budget_minutes:g}",
                    "--device", config.device],
                   # time is the rule: no step limit before the budget ends
                   files={"masked.yaml": yaml.safe_dump({"pretrain": {"max_steps": MASKED_MAX_STEPS}})})
        predictions["masked"] = {}
        finetune_args, finetune_limit, finetune_rule = finetune_budget(config)
        for task in tasks:
            # "tuning_subset": the stopping rule's tuning histories are drawn within each class (a change of the
            # fine-tuning code that moves results, so runs from before it are not reused); and MASKED_EVAL_HISTORIES
            # of them instead of the tiny preset's 500, which it keeps for the demo's half-minute budget
            stage = runner.stage(f"masked_finetune_{task}", {**finetune_args, "device": config.device,
                                                             "tuning_subset": "within_class",
                                                             "eval_histories": MASKED_EVAL_HISTORIES},
                                 run=masked, meds=data, labels=labels[task])
            runner.cli(stage, f"masked transformer: fine-tune {task} ({finetune_rule})",
                       ["baseline", "masked", "finetune", masked.out, data.out, labels[task].out, "--out", stage.out,
                        *finetune_limit, "--device", config.device, "--config", stage.folder / "finetune.yaml"],
                       files={"finetune.yaml": yaml.safe_dump({"finetune": {"eval_histories": MASKED_EVAL_HISTORIES}})})
            predictions["masked"][task] = stage
        table_models.append(TableModel("masked", FINE_TUNED, Path(), masked_budget(
            masked.out, predictions["masked"], config.budget_minutes, finetune_rule, config.device)))
        rules.append(f"masked pretraining: {config.budget_minutes:g} min of wall time (the same budget); fine-tuning "
                     f"{finetune_rule}, early stopping on tuning")

    if "counts" in models:
        predictions["counts"] = {}
        for task in tasks:
            stage = runner.stage(f"counts_{task}", {"config": "defaults"}, meds=data, labels=labels[task])
            runner.cli(stage, f"count-feature baseline {task}",
                       ["baseline", "counts", data.out, labels[task].out, "--out", stage.out])
            predictions["counts"][task] = stage
        table_models.append(TableModel("counts", COUNT, Path(), {"rule": "fit to convergence", "minutes": sum(
            (s.recorded_seconds() or 0) for s in predictions["counts"].values()) / 60}))

    if "age_sex" in models:
        predictions["age_sex"] = {}
        for task in tasks:
            stage = runner.stage(f"age_sex_{task}", {"features": "age B-spline, sex"}, meds=data, labels=labels[task])
            runner.python(stage, f"age-sex reference {task}",
                          lambda out, labels_dir=labels[task].out: write_age_sex_predictions(data.out, labels_dir, out),
                          f"age_sex_reference on the train label rows of {labels[task].out}")
            predictions["age_sex"][task] = stage
        table_models.append(TableModel("age_sex", REFERENCE, Path(), {}))

    if "oracle" in models:
        predictions["oracle"] = {}
        for task in tasks:
            held = runner.stage(f"held_out_labels_{task}", {}, labels=labels[task])
            runner.python(held, f"held_out label rows of {task} (for the oracle)",
                          lambda out, labels_dir=labels[task].out: print(
                              f"   {write_held_out_labels(labels_dir, out):,} held_out label rows"),
                          f"write_held_out_labels({labels[task].out})")
            stage = runner.stage(f"oracle_{task}", {"samples": config.oracle_samples}, meds=sim_eval, labels=held)
            runner.cli(stage, f"oracle risk {task} ({config.oracle_samples} Monte Carlo futures, on the evaluation "
                              "population's own folder)",
                       ["oracle", sim_eval.out, held.out, "--out", stage.out, "--samples", config.oracle_samples])
            predictions["oracle"][task] = stage
        table_models.append(TableModel("oracle", ORACLE, Path(), {"samples": config.oracle_samples}))

    # evaluation
    flat = [TableModel(m.name, m.kind, predictions[m.name][task].out, m.budget) for task in tasks for m in table_models]
    by_model = {m.name: m for m in table_models}
    evaluation = runner.stage("evaluation", {"bootstrap": config.bootstrap, "seed": config.seed,
                                             "confidence": config.confidence,
                                             "models": [[m.name, m.kind] for m in table_models]},
                              **{f"{name}/{task}": stage for name, per in predictions.items() for task, stage in per.items()})
    reference = DEFAULT_VARIANT if DEFAULT_VARIANT in by_model else None

    def evaluate(out: Path) -> None:
        rows, warnings = quality_rows(flat, config.bootstrap, config.seed, config.confidence, reference)
        out.mkdir(parents=True)
        (out / "table.json").write_text(json.dumps({"rows": rows, "warnings": warnings}, indent=2, default=str) + "\n")

    runner.python(evaluation, "evaluation: AUROC, age-sex AUROC, oracle share, paired differences",
                  evaluate, f"quality_rows over {len(flat)} predictions folders, {config.bootstrap} subject-level resamples")
    result = json.loads((evaluation.out / "table.json").read_text())
    rows = result["rows"]
    for row in rows:  # budgets as measured by this run's stages (unchanged when every stage was cached)
        row["budget"] = by_model[row["model"]].budget
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print("\n" + format_table(rows, "; ".join(rules)))
    if config.samples and DEFAULT_VARIANT in pretrained:
        rows += sampling_table(runner, config, pretrained[DEFAULT_VARIANT][0], data, labels, predictions, table_models,
                               sim_eval)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(rows, indent=2, default=str) + "\n")
        print(f"wrote {len(rows)} rows to {json_path}")
    print("\n".join(runner.timing_lines()))
    return rows


def sampling_table(runner: Runner, config: QualityConfig, pretrain: Stage, data: Stage, labels: dict[str, Stage],
                   predictions: dict[str, dict[str, Stage]], table_models: list[TableModel],
                   sim_eval: Stage | None) -> list[dict]:
    """Monte Carlo risk of the default run by number of samples, both estimators, beside every other model, on
    a random subset of held_out subjects or on case-control rows (``--sample-rows``; docs/sampling.md); prints
    the table, draws the plot, returns the rows (``table: sampling``)."""
    counts = sorted({k for k in config.sample_counts if k < config.samples} | {config.samples})
    flat: list[TableModel] = []
    sampled: dict[str, Stage] = {}
    case_control = bool(config.sample_positive_rows)
    for task in config.sample_tasks or config.tasks:
        if case_control:
            subset = runner.stage(f"sample_case_control_{task}", {"positives": config.sample_positive_rows,
                                                                  "negatives": config.sample_negative_rows,
                                                                  "seed": config.seed}, labels=labels[task])
            runner.python(subset, f"{config.sample_positive_rows:,} positive and {config.sample_negative_rows:,} "
                                  f"negative held_out rows per horizon, drawn at random within each class ({task})",
                          lambda out, labels_dir=labels[task].out: print("   " + json.dumps(write_case_control_labels(
                              labels_dir, out, config.sample_positive_rows, config.sample_negative_rows, config.seed))),
                          f"write_case_control_labels({labels[task].out})")
        else:
            subset = runner.stage(f"sample_labels_{task}", {"subjects": config.sample_subjects, "seed": config.seed},
                                  labels=labels[task])
            runner.python(subset, f"held_out rows of {config.sample_subjects:,} random held_out subjects ({task})",
                          lambda out, labels_dir=labels[task].out: print("   " + json.dumps(write_subject_subset_labels(
                              labels_dir, out, config.sample_subjects, config.seed))),
                          f"write_subject_subset_labels({labels[task].out})")
        stage = runner.stage(f"sample_{DEFAULT_VARIANT}_{task}", {"samples": config.samples, "counts": counts,
                                                                  "device": config.device},
                             run=pretrain, meds=data, labels=subset)
        runner.cli(stage, f"Monte Carlo trajectories {task} ({config.samples} per history)",
                   ["sample", pretrain.out, data.out, subset.out, "--out", stage.out, "--samples", config.samples,
                    "--sample-counts", ",".join(map(str, counts)), "--no-trajectories", "--splits", meds.held_out_split,
                    "--device", config.device])
        sampled[task] = stage
        for model in table_models:
            if model.name == "oracle":
                continue  # scored on the subset itself, below
            cut = runner.stage(f"subset_{model.name}_{task}", {}, predictions=predictions[model.name][task],
                               labels=subset)
            runner.python(cut, f"{model.name} {task} on the sampled subjects",
                          lambda out, source=predictions[model.name][task].out, labels_dir=subset.out: print(
                              f"   {write_prediction_subset(source, labels_dir, out):,} rows"),
                          f"write_prediction_subset({predictions[model.name][task].out})")
            flat.append(TableModel(model.name, model.kind, cut.out, model.budget))
        if sim_eval is not None:
            # the oracle scored on the sampled rows alone (a few thousand subject-days, where the main table's
            # oracle scores every held_out row), so the sampling table does not need the main table's oracle
            oracle = runner.stage(f"sample_oracle_{task}", {"samples": config.oracle_samples}, meds=sim_eval,
                                  labels=subset)
            runner.cli(oracle, f"oracle risk {task} on the sampled rows ({config.oracle_samples} futures)",
                       ["oracle", sim_eval.out, subset.out, "--out", oracle.out, "--samples", config.oracle_samples])
            flat.append(TableModel("oracle", ORACLE, oracle.out, {"samples": config.oracle_samples}))
        for n in counts:
            for estimator in ("monte_carlo", "rao_blackwell"):
                folder = stage.out / (estimator if n == config.samples else f"{estimator}_n{n}")
                flat.append(TableModel(f"{estimator} x{n}", ZERO_SHOT, folder, {"samples": n, "estimator": estimator}))
    evaluation = runner.stage("sampling_evaluation", {"bootstrap": config.bootstrap, "seed": config.seed,
                                                      "models": [m.name for m in flat]},
                              **{f"sample/{task}": s for task, s in sampled.items()})

    def evaluate(out: Path) -> None:
        rows, warnings = quality_rows(flat, config.bootstrap, config.seed, config.confidence, DEFAULT_VARIANT)
        for row in rows:
            model = next(m for m in flat if m.name == row["model"])
            row.update(table="sampling", samples=model.budget.get("samples"), estimator=model.budget.get("estimator"))
        out.mkdir(parents=True)
        (out / "table.json").write_text(json.dumps({"rows": rows, "warnings": warnings}, indent=2, default=str) + "\n")
        draw_sampling_plot(rows, out)

    runner.python(evaluation, "sampling evaluation: every model on the sampled subjects", evaluate,
                  f"quality_rows over {len(flat)} predictions folders")
    result = json.loads((evaluation.out / "table.json").read_text())
    seconds = {task: json.loads((s.out / "sampling.json").read_text()) for task, s in sampled.items()}
    where = (f"{config.sample_positive_rows:,} positive and {config.sample_negative_rows:,} negative held_out rows "
             "per horizon drawn within each class" if case_control
             else f"{config.sample_subjects:,} random held_out subjects")
    print(f"\nSampling: {config.samples} trajectories per history of {where} "
          f"(every model scored on the same rows; differences: {DEFAULT_VARIANT} (horizon query) minus the model)")
    for task, info in seconds.items():
        print(f"  {task}: {info['trajectories']:,} trajectories in {info['seconds']:,} s "
              f"({info['trajectories_per_s']} /s); ended {info['ended']}; undecided pairs "
              f"{info['undecided_row_trajectories']:,}; slides {info['context_slides']:,}")
    print(format_table(result["rows"]))
    print(f"plot: {evaluation.out / 'sampling_auroc.png'}")
    return result["rows"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    defaults = QualityConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__, formatter_class=_Formatter)
    p.add_argument("--dataset", choices=[SIMULATED, SYNTHEA], default=SIMULATED,
                   help="simulated: two populations of the embedded health system (tasks dementia, knee_oa; with the "
                        "oracle); synthea: the Synthea MEDS folder's own splits (dementia_snomed, knee_oa_snomed)")
    p.add_argument("--train-subjects", type=int, default=defaults.train_subjects,
                   help="subjects of the population models train on (80/10/10; its held_out moves to tuning)")
    p.add_argument("--eval-subjects", type=int, default=defaults.eval_subjects,
                   help="subjects of the evaluation population (all held_out)")
    p.add_argument("--train-seed", type=int, default=defaults.train_seed, help="seed of the train population")
    p.add_argument("--eval-seed", type=int, default=defaults.eval_seed, help="seed of the evaluation population")
    p.add_argument("--synthea-dir", type=Path, default=defaults.synthea_dir, help="the Synthea MEDS folder")
    p.add_argument("--work", type=Path, default=defaults.work,
                   help="folder of the cached stages (<stage>-<hash>/); reuse it to skip finished stages")
    p.add_argument("--budget-minutes", type=float, default=defaults.budget_minutes,
                   help="wall time of each next-visit pretraining (as calibrated steps) and of the masked pretraining")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="fixed next-visit pretraining steps instead of calibrating them to --budget-minutes")
    p.add_argument("--finetune-minutes", type=float, default=None,
                   help="time budget of each masked fine-tuning command (per task; tokenizing and predicting "
                        "included)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help=f"masked fine-tuning: at most this many optimizer steps per run, early stopping on tuning "
                        f"(default {defaults.finetune_steps:,}; the result does not depend on how busy the machine is); "
                        f"--finetune-minutes M gives a wall-time budget instead")
    p.add_argument("--preset", default=defaults.preset, help="next-visit preset (a variant may name its own)")
    p.add_argument("--masked-preset", default=defaults.masked_preset, help="masked-transformer preset")
    p.add_argument("--oracle-samples", type=int, default=defaults.oracle_samples,
                   help="Monte Carlo futures per oracle prediction")
    p.add_argument("--bootstrap", type=int, default=defaults.bootstrap, help="subject-level bootstrap resamples")
    p.add_argument("--seed", type=int, default=defaults.seed, help="bootstrap seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device of every stage that trains or scores a model (auto: cuda when available)")
    p.add_argument("--variants", type=Path, default=None,
                   help="YAML of next-visit variants: name -> {pretrain: {RunConfig overrides}, forecast: {aggregator, "
                        "multi_horizon, history_tokens}, preset: optional} (e.g. benchmarks/quality_variants.yaml)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated models to run: {DEFAULT_VARIANT}, the variants' names, "
                        f"{', '.join(BASELINES)}; '{DATA_ONLY}' runs the data stages (simulate, combine, tokenize, labels)")
    p.add_argument("--samples", type=int, default=defaults.samples,
                   help="Monte Carlo trajectories per history for the sampling table (0: none; needs a default run "
                        "with the visit-time head)")
    p.add_argument("--sample-subjects", type=int, default=defaults.sample_subjects,
                   help="held_out subjects (random) the sampling table scores")
    p.add_argument("--sample-counts", default=",".join(map(str, defaults.sample_counts)),
                   help="also the risks of the first k samples, for each k")
    p.add_argument("--sample-rows", default=None, metavar="POSITIVES,NEGATIVES",
                   help="sample case-control rows instead of random subjects: per horizon, this many positive and "
                        "this many negative held_out rows drawn at random within each class (an unbiased AUROC on "
                        "rows with many positive subjects, at a cost a 2-core machine can pay)")
    p.add_argument("--sample-tasks", default=None, help="comma-separated tasks of the sampling table (default: all)")
    p.add_argument("--json", type=Path, default=None,
                   help="write the table as a JSON list of rows (model, kind, task, horizon_days, auroc, auroc_low, "
                        "auroc_high, age_sex_auroc, positive_subjects, budget, oracle_share, difference_vs_zero_shot, ...)")
    return p


def config_from_args(args) -> QualityConfig:
    for name in ("train_subjects", "eval_subjects", "bootstrap", "oracle_samples"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.budget_minutes <= 0 or (args.finetune_minutes is not None and args.finetune_minutes <= 0):
        raise UserError("--budget-minutes and --finetune-minutes must be positive")
    if args.finetune_minutes is not None and args.finetune_steps is not None:
        raise UserError("--finetune-minutes and --finetune-steps: give one (a wall-time or a step budget)")
    if args.pretrain_steps is not None and args.pretrain_steps < 1:
        raise UserError(f"--pretrain-steps {args.pretrain_steps}: must be at least 1")
    if args.finetune_steps is not None and args.finetune_steps < 1:
        raise UserError(f"--finetune-steps {args.finetune_steps}: must be at least 1")
    if args.samples < 0 or args.sample_subjects < 1:
        raise UserError("--samples must be at least 0 and --sample-subjects at least 1")
    try:
        counts = [int(k) for k in str(args.sample_counts).split(",") if k.strip()]
    except ValueError:
        raise UserError(f"--sample-counts {args.sample_counts!r}: expected comma-separated whole numbers") from None
    if any(k < 1 for k in counts):
        raise UserError(f"--sample-counts {args.sample_counts!r}: each must be at least 1")
    positive_rows = negative_rows = 0
    if args.sample_rows:
        try:
            positive_rows, negative_rows = (int(k) for k in str(args.sample_rows).split(","))
        except ValueError:
            raise UserError(f"--sample-rows {args.sample_rows!r}: expected two whole numbers, POSITIVES,NEGATIVES") from None
        if positive_rows < 1 or negative_rows < 1:
            raise UserError(f"--sample-rows {args.sample_rows!r}: each must be at least 1")
    if args.sample_tasks:
        unknown = [t for t in args.sample_tasks.split(",") if t.strip() and t.strip() not in TASKS[args.dataset]]
        if unknown:
            raise UserError(f"--sample-tasks {','.join(unknown)}: not a task of --dataset {args.dataset} "
                            f"({', '.join(TASKS[args.dataset])})")
    if not args.samples:
        given = [flag for flag, value in (("--sample-rows", args.sample_rows), ("--sample-tasks", args.sample_tasks))
                 if value]
        if given:
            raise UserError(f"{' and '.join(given)} only apply to the sampling table: add --samples N (N >= 1)")
    only = tuple(n.strip() for n in args.only.split(",") if n.strip()) if args.only else None
    return QualityConfig(
        dataset=args.dataset, train_subjects=args.train_subjects, eval_subjects=args.eval_subjects,
        train_seed=args.train_seed, eval_seed=args.eval_seed, synthea_dir=args.synthea_dir, work=args.work,
        budget_minutes=args.budget_minutes, pretrain_steps=args.pretrain_steps,
        finetune_minutes=QualityConfig.finetune_minutes if args.finetune_minutes is None else args.finetune_minutes,
        finetune_steps=(None if args.finetune_minutes is not None
                        else QualityConfig.finetune_steps if args.finetune_steps is None else args.finetune_steps),
        preset=args.preset, masked_preset=args.masked_preset, oracle_samples=args.oracle_samples,
        bootstrap=args.bootstrap, seed=args.seed, device=args.device, variants=read_variants(args.variants), only=only,
        samples=args.samples, sample_subjects=args.sample_subjects,
        sample_counts=tuple(counts), sample_positive_rows=positive_rows, sample_negative_rows=negative_rows,
        sample_tasks=tuple(t.strip() for t in args.sample_tasks.split(",") if t.strip()) if args.sample_tasks else None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    rerun = f"cd {REPO_ROOT} && {shlex.quote(sys.executable)} -m benchmarks.quality " + " ".join(shlex.quote(a) for a in argv)
    try:
        run_benchmark(config_from_args(args), rerun, args.json)
    except UserError as exc:
        sys.stderr.write(f"benchmarks.quality: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; a rerun skips the finished stages and redoes the interrupted one\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
