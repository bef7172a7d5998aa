"""The simulator's ground truth: the probability of a first diagnosis within a horizon, given everything the
simulator knew at the prediction time (the latent state included). No model can do better on average; its
AUROC is the ceiling that quality goals are stated against.

How it is computed (Monte Carlo, not exact):

1. The subject is re-simulated from its own seed (``SeedSequence([seed, subject_id])``), which reproduces its
   record exactly, up to the last step whose visit falls on or before the prediction day ``t``. The state
   after that visit, plus "no visit and no death between that visit and ``t``", is what the simulator knows
   at ``t``: hazards are constant within a step and waiting times are geometric in days (memoryless), so
   that knowledge is represented exactly by forcing the next visit, the death and any onset that would bring
   the subject in (stroke, knee injury) to fall after ``t``.
2. From that state ``n_samples`` futures are rolled forward with the simulator's own step, without loss to
   follow-up and without the end of data (the risk is the subject's, not the dataset's).
3. The risk is the share of futures in which the first code of the condition (or, for dementia, an
   anti-dementia drug) is recorded on a day in ``(t, t + horizon]``. Death is a competing event: a future
   that dies first has no onset. The standard error is ``sqrt(p (1 - p) / n_samples)``.

The futures of a (subject, day) pair draw from ``SeedSequence([seed, subject_id, day, ORACLE_STREAM])``, so a
risk does not depend on which other queries share its batch.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from nextvisit.errors import UserError
from nextvisit.data.simulate import engine
from nextvisit.data.simulate.dataset import SIMULATOR_FILE, SIMULATOR_VERSION, config_from_dict
from nextvisit.data.simulate.engine import COND, SimulationConfig

ORACLE_STREAM = 7919  # keeps the futures' random numbers apart from the record's
DAY_SHIFT = 1_000_000  # SeedSequence wants non-negative entropy; days before 1970 are negative
# Task names (labels.parquet `task`, task.yaml `name`) the oracle knows, and the simulator condition of each.
CONDITIONS = ("dementia", "knee_oa")  # the conditions whose first diagnosis the oracle can time


@dataclass(frozen=True)
class OracleConfig:
    n_samples: int = 128  # Monte Carlo futures per (subject, prediction day)
    rows_per_batch: int = 16_384  # futures rolled forward together (pairs x n_samples)
    subjects_per_batch: int = 1_000  # subjects re-simulated together
    min_pairs_per_worker: int = 200  # fewer pairs than this per worker: not worth starting processes
    stream: int = ORACLE_STREAM  # another value gives an independent Monte Carlo estimate


@dataclass
class Simulator:
    """What re-creates any subject of a simulated dataset: the seed and the configuration."""

    seed: int
    config: SimulationConfig
    n_subjects: int | None = None
    first_subject_id: int = 1  # the dataset holds subjects first_subject_id .. first_subject_id + n_subjects - 1

    @classmethod
    def from_meds(cls, meds_dir) -> "Simulator":
        path = Path(meds_dir) / "metadata" / SIMULATOR_FILE
        if not path.exists():
            raise UserError(f"{meds_dir}: no metadata/{SIMULATOR_FILE}; the oracle needs a dataset written by "
                            "`nextvisit simulate` (real data has no ground truth)")
        data = json.loads(path.read_text())
        if str(data.get("simulator_version")) != SIMULATOR_VERSION:
            raise UserError(f"{path}: written by simulator version {data.get('simulator_version')}, this is version "
                            f"{SIMULATOR_VERSION}; re-simulate the dataset with this version")
        first = int(data.get("subject_ids", [1])[0])
        return cls(seed=int(data["seed"]), config=config_from_dict(data["config"]), n_subjects=int(data["n_subjects"]),
                   first_subject_id=first)


def _day(time) -> int:
    """Calendar day (days since 1970-01-01) of a datetime, numpy datetime64 or day number."""
    if isinstance(time, (int, np.integer)):
        return int(time)
    if isinstance(time, datetime):
        return (time.date() - engine.EPOCH).days
    return int(np.datetime64(time, "D").astype(np.int64))


def oracle_risk(source, subject_id: int, time, condition: str, horizon_days: int, *,
                config: OracleConfig | None = None) -> float:
    """True probability of the first diagnosis of ``condition`` in ``(time, time + horizon_days]`` (days),
    before death, given the simulator's full state at ``time``. ``source``: a simulated MEDS folder or a
    ``Simulator``. Returns 0.0 if the condition was already recorded by ``time``."""
    risks, _ = oracle_risks(source, [subject_id], [time], [condition], [horizon_days], config=config, progress=False)
    return float(risks[0])


def oracle_risks(source, subject_ids, times, conditions, horizons_days, *, config: OracleConfig | None = None,
                 workers: int = 1, progress: bool = True):
    """Vectorized ``oracle_risk``. Returns ``(risks, prevalent)``: float64 risks and a bool array marking
    queries whose condition was already recorded at the time (risk 0)."""
    sim = source if isinstance(source, Simulator) else Simulator.from_meds(source)
    cfg = config or OracleConfig()
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    days = np.array([_day(t) for t in times], dtype=np.int64)
    horizons = np.asarray(horizons_days, dtype=np.int64)
    for name in set(conditions):
        if name not in CONDITIONS:
            raise UserError(f"condition {name!r} is not one the oracle knows; use one of {', '.join(CONDITIONS)}")
    if np.any(horizons < 1):
        raise UserError("horizon_days must be at least 1 day")
    if sim.n_subjects is not None and len(subject_ids):
        first, last = sim.first_subject_id, sim.first_subject_id + sim.n_subjects - 1
        outside = (subject_ids < first) | (subject_ids > last)
        if outside.any():
            raise UserError(f"subject_id {subject_ids[outside][0]} is not in the simulated dataset "
                            f"(subjects {first}..{last})")
    cond_index = np.array([COND[c] for c in conditions], dtype=np.int64)
    # unique (subject, day) pairs, each with the longest horizon asked of it
    pairs, pair_of_query = np.unique(np.stack([subject_ids, days], axis=1), axis=0, return_inverse=True)
    pair_of_query = pair_of_query.reshape(-1)
    max_horizon = np.zeros(len(pairs), np.int64)
    np.maximum.at(max_horizon, pair_of_query, horizons)
    workers = max(1, min(workers, len(pairs) // cfg.min_pairs_per_worker))
    jobs = _jobs(pairs, max_horizon, sim, cfg, workers)
    risk_of_pair_cond: dict = {}
    from tqdm import tqdm

    bar = tqdm(total=len(pairs), unit="pair", desc="oracle", disable=not progress, file=sys.stderr)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        results = pool.imap(_pair_job, jobs) if pool else map(_pair_job, jobs)
        for job, (pair_idx, first, coded, dead_before) in zip(jobs, results):
            for k, p in enumerate(pair_idx):
                risk_of_pair_cond[p] = (first[k], coded[k], dead_before[k])
            bar.update(len(pair_idx))
    finally:
        if pool:
            pool.terminate()
        bar.close()
    risks = np.zeros(len(subject_ids))
    prevalent = np.zeros(len(subject_ids), bool)
    for q in range(len(subject_ids)):
        first, coded, dead_before = risk_of_pair_cond[pair_of_query[q]]
        if dead_before:
            raise UserError(f"subject {subject_ids[q]} died on or before day {days[q]} "
                            f"({np.datetime64(int(days[q]), 'D')}); the oracle needs a living subject at the time")
        c = cond_index[q]
        if coded[c]:
            prevalent[q] = True
            continue
        risks[q] = np.mean(first[:, CONDITIONS.index(conditions[q])] - days[q] <= horizons[q])
    return risks, prevalent


def _jobs(pairs: np.ndarray, max_horizon: np.ndarray, sim: Simulator, cfg: OracleConfig, workers: int) -> list:
    """Units of work: pairs of consecutive subjects, ``subjects_per_batch`` subjects each."""
    subjects = pairs[:, 0]
    boundaries = np.unique(subjects, return_index=True)[1]
    starts = boundaries[:: cfg.subjects_per_batch].tolist() + [len(pairs)]
    # with several workers, smaller jobs balance better
    if workers > 1 and len(starts) - 1 < 4 * workers:
        step = max(1, len(boundaries) // (4 * workers))
        starts = boundaries[::step].tolist() + [len(pairs)]
    return [(np.arange(a, b), pairs[a:b], max_horizon[a:b], sim, cfg) for a, b in zip(starts[:-1], starts[1:]) if b > a]


def _pair_job(job):
    """Snapshots of a batch of (subject, day) pairs, then their futures."""
    pair_idx, pairs, max_horizon, sim, cfg = job
    snapshots, dead_before = _snapshots(pairs, sim)
    first = np.full((len(pairs), cfg.n_samples, len(CONDITIONS)), engine.NEVER, np.int64)
    coded = np.zeros((len(pairs), engine.C), bool)
    alive = np.nonzero(~dead_before)[0]
    for k in alive:
        coded[k] = snapshots[k].coded[0]
    pairs_per_batch = max(1, cfg.rows_per_batch // cfg.n_samples)
    for start in range(0, len(alive), pairs_per_batch):
        batch = alive[start:start + pairs_per_batch]
        first[batch] = _futures([snapshots[k] for k in batch], pairs[batch], max_horizon[batch], sim, cfg)
    return pair_idx, first, coded, dead_before


def _snapshots(pairs: np.ndarray, sim: Simulator):
    """The state of each pair's subject after its last visit on or before the pair's day (one-row States,
    with ``offset`` = event-free days up to the day), re-simulated exactly as in the dataset."""
    subjects, first_of = np.unique(pairs[:, 0], return_index=True)
    st, gens = engine.new_subjects(subjects, sim.seed, sim.config)
    pending = {i: sorted(pairs[pairs[:, 0] == s, 1].tolist()) for i, s in enumerate(subjects)}
    snapshots: dict = {}
    dead: dict = {}
    active = st
    while len(active):
        before = active.copy()
        uniforms = engine.draw(gens, active.group, engine.STEP.width, one_row_per_group=True)
        result = engine.step(active, uniforms, sim.config, emit=False)
        next_pending = np.array([pending[g][0] if pending[g] else engine.NEVER for g in active.group])
        due = (next_pending < result.new_day) | (result.ended & (next_pending < engine.NEVER))
        for r in np.nonzero(due)[0]:
            g = int(active.group[r])
            while pending[g] and (pending[g][0] < result.new_day[r] or result.ended[r]):
                day = pending[g].pop(0)
                if result.died[r] and day >= result.new_day[r]:
                    dead[(g, day)] = True
                    continue
                snap = before.take([r])
                if snap.offset[0] >= 0:
                    snap.offset[:] = max(day - int(snap.day[0]), 0)
                snapshots[(g, day)] = snap
        if result.ended.any():
            active = active.take(~result.ended)
        # rows with nothing left to answer need no more steps
        keep = np.array([bool(pending[g]) for g in active.group], bool)
        if not keep.all():
            active = active.take(keep)
    index = {int(s): i for i, s in enumerate(subjects)}
    out, dead_before = [], np.zeros(len(pairs), bool)
    for k, (s, day) in enumerate(pairs.tolist()):
        key = (index[s], day)
        dead_before[k] = key in dead
        out.append(snapshots.get(key))
    return out, dead_before


def _futures(snaps: list, pairs: np.ndarray, max_horizon: np.ndarray, sim: Simulator, cfg: OracleConfig) -> np.ndarray:
    """[pairs, n_samples, len(CONDITIONS)] day of the first record of each oracle condition in each future
    (NEVER: none by the horizon or death)."""
    n = cfg.n_samples
    state = engine.State.concat([s.take(np.zeros(n, np.int64)) for s in snaps])
    state.group = np.repeat(np.arange(len(snaps)), n)
    replica = np.arange(len(state))
    gens = [np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [sim.seed, int(s), int(d) + DAY_SHIFT, cfg.stream]))) for s, d in pairs.tolist()]
    stop_day = np.repeat(pairs[:, 1] + max_horizon, n)
    targets = np.array([COND[c] for c in CONDITIONS])
    first = np.full((len(state), engine.C), engine.NEVER, np.int64)
    while len(state):
        uniforms = engine.draw(gens, state.group, engine.ROLLOUT.width, one_row_per_group=False)
        result = engine.step(state, uniforms, sim.config, rollout=True, emit=False)
        in_window = (result.new_day <= stop_day[replica]) & (result.kind >= 0)
        new = result.newly_coded & in_window[:, None]
        rows, cols = np.nonzero(new)
        first[replica[rows], cols] = np.minimum(first[replica[rows], cols], result.new_day[rows])
        done = result.ended | (result.new_day >= stop_day[replica]) | state.coded[:, targets].all(axis=1)
        if done.any():
            state = state.take(~done)
            replica = replica[~done]
    return first[:, targets].reshape(len(snaps), n, len(targets))


# -- predictions for a labels folder ------------------------------------------------------------------------
