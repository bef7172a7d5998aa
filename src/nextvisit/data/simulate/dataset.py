"""Running the simulator over a cohort and writing it as a MEDS 0.4 dataset.

Subjects ``first..first+N-1`` (``first_subject_id``, default 1) are simulated in chunks (in worker processes)
and streamed into data shards of at most ``shard_size`` subjects, so memory does not grow with N. A subject's
record depends only on ``(seed, subject_id)`` (``engine.subject_generator``), so subject 40,001 of a run that
starts there is the same person as subject 40,001 of a run of 40,001 or more subjects with the same seed.
``split`` puts every subject into one split instead of the 80/10/10 draw (the draw still happens, so the
records are unchanged): a population meant only for evaluation. The dataset is written into a staging folder
(``nextvisit.artifacts.folders``) and published at the end: an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nextvisit.artifacts.folders import atomic_folder
from nextvisit.data.simulate import engine
from nextvisit.data.simulate.engine import TABLES, SimulationConfig
from nextvisit.errors import UserError
from nextvisit.units import US_PER_DAY

SIMULATOR_VERSION = "1"  # bump whenever the same seed would give different records
SIMULATOR_FILE = "simulator.json"  # metadata/ sibling of dataset.json: what the oracle needs to re-create subjects
SPLIT_SHARES = ((meds.train_split, 0.8), (meds.tuning_split, 0.1), (meds.held_out_split, 0.1))
NO_TIME = np.iinfo(np.int64).min  # the day of static rows (null time)
DATA_SCHEMA = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
                         ("numeric_value", pa.float32())])


@dataclass(frozen=True)
class WriteOptions:
    shard_size: int = 50_000  # subjects per data shard (MEDS: a subject lives in exactly one shard)
    chunk_size: int = 1_000  # subjects per unit of work for a worker process


def split_of(split_u: np.ndarray, split: str | None = None) -> np.ndarray:
    """Split names from a subject's split uniform (80/10/10), or ``split`` for every subject when given."""
    if split is not None:
        return np.full(len(split_u), split, dtype=object)
    edges = np.cumsum([share for _, share in SPLIT_SHARES])
    names = np.array([name for name, _ in SPLIT_SHARES], dtype=object)
    return names[np.minimum(np.searchsorted(edges, split_u, side="right"), len(names) - 1)]


def simulate_subjects(subject_ids: np.ndarray, seed: int, cfg: SimulationConfig):
    """Simulate subjects from entry to the end of their follow-up.

    Returns ``(events, state)``: events as numpy columns ``subject_id, day, code, value`` (``day`` is None-able:
    static rows have ``day == NO_TIME``) in MEDS order, and the final state of every subject.
    """
    st, gens = engine.new_subjects(np.asarray(subject_ids, dtype=np.int64), seed, cfg)
    n = len(st)
    T = TABLES
    parts_row, parts_day, parts_code, parts_value = [], [], [], []
    # static rows and birth
    idx = np.arange(n)
    for codes in (T.static_codes["sex"][st.male.astype(np.int64)], T.static_codes["race"][st.race],
                  T.static_codes["ethnicity"][st.ethnicity]):
        parts_row.append(idx), parts_day.append(np.full(n, NO_TIME)), parts_code.append(codes)
        parts_value.append(np.full(n, np.nan, np.float32))
    parts_row.append(idx), parts_day.append(st.birth_day.copy()), parts_code.append(np.full(n, T.static_codes["birth"]))
    parts_value.append(np.full(n, np.nan, np.float32))
    final = st.copy()
    active = st
    while len(active):
        uniforms = engine.draw(gens, active.group, engine.STEP.width, one_row_per_group=True)
        result = engine.step(active, uniforms, cfg)
        for rows, codes, values in zip(result.rows, result.codes, result.values):
            parts_row.append(active.group[rows]), parts_day.append(active.day[rows])
            parts_code.append(codes), parts_value.append(values)
        if result.ended.any():
            done = active.take(result.ended)
            for name in engine.STATE_FIELDS:
                getattr(final, name)[done.group] = getattr(done, name)
            active = active.take(~result.ended)
    row = np.concatenate(parts_row)
    day = np.concatenate(parts_day)
    code = np.concatenate(parts_code).astype(np.int32)
    value = np.concatenate(parts_value).astype(np.float32)
    order = np.lexsort((np.arange(len(row)), day, row))
    events = {"subject_id": final.subject_id[row[order]], "day": day[order], "code": code[order],
              "value": value[order]}
    return events, final


def events_table(events: dict) -> pa.Table:
    """The MEDS data table of simulated events."""
    day = events["day"]
    static = day == NO_TIME
    time = pa.array(np.where(static, 0, day) * US_PER_DAY, type=pa.int64(), mask=static).cast(pa.timestamp("us"))
    code = pa.array(TABLES.book.codes, type=pa.string()).take(pa.array(events["code"]))
    value = pa.array(events["value"], type=pa.float32(), from_pandas=True)  # NaN -> null
    return pa.Table.from_arrays([pa.array(events["subject_id"], pa.int64()), time, code, value], schema=DATA_SCHEMA)


def _chunk_job(job):
    first_id, count, seed, cfg, split = job
    ids = np.arange(first_id, first_id + count, dtype=np.int64)
    events, final = simulate_subjects(ids, seed, cfg)
    codes_seen = np.bincount(events["code"], minlength=len(TABLES.book.codes)) > 0
    stats = _chunk_stats(events, final, cfg)
    splits = (ids, split_of(final.split_u, split))
    return events_table(events), splits, codes_seen, stats


def _chunk_stats(events: dict, final, cfg: SimulationConfig) -> dict:
    """Counts for the summary: visits, events, deaths, and first diagnoses after the first visit (incident)."""
    timed = events["day"] != NO_TIME
    visit_codes = TABLES.visit_code
    is_visit = np.isin(events["code"], visit_codes)
    stats = {"subjects": int(len(final)), "events": int(len(events["code"])), "visits": int(is_visit.sum()),
             "deaths": int((events["code"] == TABLES.static_codes["death"]).sum()),
             "timed_events": int(timed.sum())}
    # first visit day per subject, and incident diagnoses (first code after the first visit day)
    sid = events["subject_id"]
    vs = sid[is_visit]
    vd = events["day"][is_visit]
    uniq, first_idx = np.unique(vs, return_index=True)
    first_visit = dict(zip(uniq.tolist(), vd[first_idx].tolist()))
    incident = {}
    for name in ("dementia", "knee_oa"):
        c = engine.COND[name]
        member = np.isin(events["code"], np.concatenate([TABLES.dx_code[c], TABLES.drug_code[TABLES.event_drugs[c]]]))
        s = sid[member]
        d = events["day"][member]
        u, fi = np.unique(s, return_index=True)
        incident[name] = int(sum(day > first_visit[int(subject)] for subject, day in zip(u, d[fi])))
        incident[name + "_prevalent_at_first_visit"] = int(len(u) - incident[name])
    stats["incident"] = incident
    return stats


def _merge_stats(total: dict, stats: dict) -> dict:
    for key, value in stats.items():
        if isinstance(value, dict):
            total[key] = _merge_stats(total.get(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def simulate(n_subjects: int, out, seed: int = 0, *, first_subject_id: int = 1, split: str | None = None,
             workers: int | None = None, overwrite: bool = False, config: SimulationConfig | None = None,
             options: WriteOptions | None = None, progress: bool = True) -> dict:
    """Simulate subjects ``first_subject_id .. first_subject_id + n_subjects - 1`` and write a MEDS 0.4 dataset
    to ``out``; returns the summary counts. ``split`` (train, tuning or held_out) puts every subject in that
    split; None draws 80/10/10.

    The same ``(n_subjects, seed, first_subject_id, split, config)`` gives byte-identical files, whatever
    ``workers`` is.
    """
    cfg = config or SimulationConfig()
    options = options or WriteOptions()
    if n_subjects < 1:
        raise UserError(f"--subjects {n_subjects}: must be at least 1")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be zero or positive")
    if first_subject_id < 1:
        raise UserError(f"--first-subject-id {first_subject_id}: must be at least 1")
    split_names = [name for name, _ in SPLIT_SHARES]
    if split is not None and split not in split_names:
        raise UserError(f"--split {split!r}: expected one of {', '.join(split_names)}")
    workers = max(1, min(workers or os.cpu_count() or 1, -(-n_subjects // options.chunk_size)))
    jobs = []
    for shard_start in range(0, n_subjects, options.shard_size):
        shard_end = min(shard_start + options.shard_size, n_subjects)
        for first in range(shard_start, shard_end, options.chunk_size):
            jobs.append((first_subject_id + first, min(options.chunk_size, shard_end - first), seed, cfg, split))
    with atomic_folder(Path(out), overwrite) as tmp:
        (tmp / "data").mkdir()
        (tmp / "metadata").mkdir()
        summary = _run_jobs(jobs, tmp, options, workers, progress, n_subjects, first_subject_id)
        _write_metadata(tmp, summary, n_subjects, seed, cfg, options, first_subject_id, split)
    return summary["stats"]


def _run_jobs(jobs, tmp: Path, options: WriteOptions, workers: int, progress: bool, n_subjects: int,
              first_subject_id: int) -> dict:
    from tqdm import tqdm

    codes_seen = np.zeros(len(TABLES.book.codes), bool)
    split_ids, split_names = [], []
    stats: dict = {}
    writer, writer_shard = None, None
    bar = tqdm(total=n_subjects, unit="subject", desc="simulate", disable=not progress, file=sys.stderr)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_chunk_job, jobs) if pool else map(_chunk_job, jobs)
        for job, (table, (ids, names), seen, chunk_stats) in zip(jobs, results):
            shard = (job[0] - first_subject_id) // options.shard_size
            if shard != writer_shard:
                if writer:
                    writer.close()
                writer = pq.ParquetWriter(tmp / "data" / f"{shard}.parquet", DATA_SCHEMA)
                writer_shard = shard
            meds.DataSchema.validate(table)
            writer.write_table(table, row_group_size=len(table) or None)
            codes_seen |= seen
            split_ids.append(ids), split_names.append(names)
            stats = _merge_stats(stats, chunk_stats)
            bar.update(job[1])
    finally:
        if writer:
            writer.close()
        if pool:
            pool.terminate()
        bar.close()
    return {"codes_seen": codes_seen, "split_ids": np.concatenate(split_ids),
            "split_names": np.concatenate(split_names), "stats": stats}


def _write_metadata(tmp: Path, summary: dict, n_subjects: int, seed: int, cfg: SimulationConfig,
                    options: WriteOptions, first_subject_id: int, split: str | None) -> None:
    book = TABLES.book
    seen = np.nonzero(summary["codes_seen"])[0]
    codes = pa.table({"code": pa.array([book.codes[i] for i in seen], pa.string()),
                      "description": pa.array([book.descriptions[i] for i in seen], pa.string()),
                      "parent_codes": pa.array([[] for _ in seen], pa.list_(pa.string()))})
    meds.CodeMetadataSchema.validate(codes)
    pq.write_table(codes, tmp / "metadata" / "codes.parquet")
    splits = pa.table({"subject_id": pa.array(summary["split_ids"], pa.int64()),
                       "split": pa.array(summary["split_names"].tolist(), pa.string())})
    meds.SubjectSplitSchema.validate(splits)
    pq.write_table(splits, tmp / "metadata" / "subject_splits.parquet")
    dataset = {"dataset_name": "nextvisit-synthetic-health-system", "dataset_version": f"seed-{seed}",
               "etl_name": "nextvisit.data.simulate", "etl_version": SIMULATOR_VERSION,
               "meds_version": _meds_version()}
    meds.DatasetMetadataSchema.validate(dataset)
    (tmp / "metadata" / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    simulator = {"format": "nextvisit-simulator", "simulator_version": SIMULATOR_VERSION, "seed": seed,
                 "n_subjects": n_subjects, "subject_ids": [first_subject_id, first_subject_id + n_subjects - 1],
                 "split": split or "drawn 80/10/10",
                 "config": _config_dict(cfg), "write_options": asdict(options), "summary": summary["stats"]}
    (tmp / "metadata" / SIMULATOR_FILE).write_text(json.dumps(simulator, indent=2) + "\n")


def _meds_version() -> str:
    return getattr(meds, "__version__", "0.4")


def _config_dict(cfg: SimulationConfig) -> dict:
    data = asdict(cfg)
    return {k: (v.isoformat() if isinstance(v, date) else [list(x) for x in v] if k == "age_bands" else v)
            for k, v in data.items()}


def config_from_dict(data: dict) -> SimulationConfig:
    values = dict(data)
    for key in ("care_start", "entry_end", "data_end"):
        values[key] = date.fromisoformat(values[key])
    values["age_bands"] = tuple(tuple(x) for x in values["age_bands"])
    return SimulationConfig(**values)


__all__ = ["simulate", "simulate_subjects", "events_table", "SIMULATOR_VERSION", "SIMULATOR_FILE", "WriteOptions",
           "config_from_dict", "split_of"]
