"""Incidence tasks as data, and the labels they give on a MEDS dataset.

A task is one YAML file read into ``Task`` (strictly: an unknown field, an empty code set or a horizon
that is not a positive whole number of days is an error naming the field). ``make_labels`` applies it to
a MEDS dataset one shard at a time and returns the label rows (docs/interfaces.md section 5) with a count
of every subject and landmark it excluded, by reason.

The landmark rule, in order (a subject excluded at a step is counted under that step's reason):

1. the subject is in ``metadata/subject_splits.parquet`` (``not_in_subject_splits``) and has a birth date
   (``no_birth_date``) and at least one visit (``no_visits``). A visit is a calendar day holding any timed
   event other than birth and death.
2. candidate prediction times are the visit days, each at the *end* of its day (``date 23:59:59.999999``),
   so every event of that day is known at the prediction time (MEDS: ``time <= prediction_time`` is known).
3. a candidate needs ``min_history_days`` since the subject's first visit (``insufficient_history``), age at
   least ``min_age_years`` (``too_young``), no death at or before it (``no_visit_before_death``) and no code
   of the condition at or before it (``prevalent``; a static condition code makes every candidate prevalent).
4. per horizon H, a candidate serves only if its horizon ends within the data (day + H on or before
   ``follow_up.end_of_data``, by default the dataset's latest event; subjects left without one are counted
   per horizon as ``subjects_past_end_of_data``). Past the end of the data only events (onsets, deaths)
   could be labelled, never plain negatives, so such rows would enrich the labels with events.
5. each candidate is sampled with probability ``sample_probability`` by a seeded hash of (seed,
   subject_id, day), and per horizon the first ``max_per_subject`` sampled visits in time order are kept.
   Whether a visit is kept depends only on its own hash and on earlier visits, never on how many eligible
   visits the subject has later (an onset ends a subject's eligible visits, so a rule that looked at the
   whole list would over-sample the visits just before onsets). Reproducible, independent of sharding, and
   shared between horizons wherever their eligible visits overlap.

Follow-up, per horizon H (day-level, like visits): positive if the first condition code falls in
(t, t + H]; otherwise negative if the record reaches the horizon's last day (its last event is on day d + H
or later), or if the subject died within the horizon (a competing event: ``negative_competing_death``);
otherwise censored (``boolean_value`` null, ``censored_lost_to_followup``). With ``death_is_competing:
false`` a death within the horizon censors the row instead (``censored_death``).

Censoring is handled, not only counted: every row also carries its follow-up in days (``FOLLOW_UP_SCHEMA``)
and an inverse-probability-of-censoring weight from a censoring model fit on the train split
(``nextvisit.tasks.censoring``), so the evaluation can report weighted figures beside the complete-case ones.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from nextvisit.artifacts.folders import atomic_folder, check_out
from nextvisit.config import did_you_mean, yaml_problem
from nextvisit.errors import UserError
from nextvisit.units import DAYS_PER_YEAR, END_OF_DAY
from nextvisit.data.meds import BIRTH_CODE, DEATH_CODE, check_shard_schema, data_files, read_splits_checked
from nextvisit.tasks.censoring import WEIGHT, add_censoring_weights
from nextvisit.tokenize.store import SUPERVISED_KINDS, Vocabulary

TASK_DIR = Path(__file__).resolve().parent
SEX_PREFIX = "GENDER//"
# The end of a visit day: a prediction at this time knows every event of the day.

POSITIVE = "positive"
NEGATIVE = "negative"
NEGATIVE_DEATH = "negative_competing_death"
CENSORED = "censored_lost_to_followup"
CENSORED_DEATH = "censored_death"
LABEL_REASONS = (POSITIVE, NEGATIVE, NEGATIVE_DEATH, CENSORED, CENSORED_DEATH)

# Subject exclusions, in the order the rule applies them (module docstring).
SUBJECT_REASONS = ("not_in_subject_splits", "no_birth_date", "no_visits")
CANDIDATE_REASONS = ("insufficient_history", "too_young", "no_visit_before_death", "prevalent")
PAST_END = "horizon_past_end_of_data"
NOT_SAMPLED = "no_visit_sampled"

LABEL_SCHEMA = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    "boolean_value": pl.Boolean,
    "reason": pl.String,
    "task": pl.String,
    "horizon_days": pl.Int32,
    "split": pl.String,
    "age_years": pl.Float64,
    "sex": pl.String,
}
# Written by `nextvisit label` for the censoring analysis (nextvisit.tasks.censoring; optional on read, so
# labels written by other tools stay readable): days from the landmark day to the first onset (null: none in
# the record), to the record's last event, to the death (null: none recorded), the days of data after the horizon's last day (null: no data end),
# and the inverse-probability-of-censoring weight (null for a censored row).
FOLLOW_UP_SCHEMA = {
    "event_days": pl.Int32,
    "followup_days": pl.Int32,
    "death_days": pl.Int32,
    "days_after_horizon": pl.Int32,
    WEIGHT: pl.Float64,
}


# -- the task ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeSet:
    """MEDS codes matched by prefix (``ICD10CM//F03`` matches ``ICD10CM//F03.90``) or exactly (numeric ids
    such as ``RXNORM//4637`` or ``SNOMED//26929004``, where a prefix would also match longer ids)."""

    code_prefixes: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.code_prefixes or self.codes)

    def matches(self, code: str) -> bool:
        """
        >>> CodeSet(code_prefixes=("ICD10CM//F03",), codes=("RXNORM//4637",)).matches("ICD10CM//F03.90")
        True
        >>> CodeSet(codes=("RXNORM//4637",)).matches("RXNORM//46370")
        False
        """
        return code in self.codes or code.startswith(self.code_prefixes)

    def expr(self, column: str = "code") -> pl.Expr:
        """A polars boolean expression: the column's code is in this set."""
        matched = pl.col(column).is_in(list(self.codes)) if self.codes else pl.lit(False)
        for prefix in self.code_prefixes:
            matched = matched | pl.col(column).str.starts_with(prefix)
        return matched

    def token_ids(self, vocab: Vocabulary, kinds=SUPERVISED_KINDS) -> np.ndarray:
        """Sorted ids of vocabulary tokens of ``kinds`` whose code (the part before ``|``) is in this set."""
        ids = set(vocab.ids_matching(self.code_prefixes, kinds).tolist()) if self.code_prefixes else set()
        wanted = set(self.codes)
        ids.update(i for i, kind in enumerate(vocab.kinds) if kind in kinds and vocab.code_of(i) in wanted)
        return np.array(sorted(ids), dtype=np.int64)


@dataclass(frozen=True)
class LandmarkRule:
    """Which visit days become prediction times (module docstring, steps 2-4)."""

    min_history_days: int = 365
    min_age_years: float = 50.0
    max_per_subject: int = 20
    sample_probability: float = 0.1  # chance that an eligible visit is sampled (module docstring, step 5)
    seed: int = 0


@dataclass(frozen=True)
class FollowUpRule:
    death_is_competing: bool = True  # a death within the horizon is a negative (True) or censors (False)
    death_codes: tuple[str, ...] = (DEATH_CODE,)
    # The last day of the data: "auto" (the latest event time in the dataset), an ISO date, or null (none).
    # A landmark serves a horizon only if the horizon ends by then: past it only events (onsets, deaths)
    # could be labelled, never plain negatives, which would bias the labelled rows towards events.
    end_of_data: str | None = "auto"

    def end_of_data_value(self, source: str = "task") -> datetime | None:
        if self.end_of_data in (None, "auto"):
            return None
        try:
            return datetime.fromisoformat(str(self.end_of_data))
        except ValueError:
            raise UserError(f"{source}: field 'follow_up.end_of_data' must be 'auto', null or an ISO date, "
                            f"got {self.end_of_data!r}") from None


@dataclass(frozen=True)
class Task:
    name: str
    condition: CodeSet
    horizons_days: tuple[int, ...]
    description: str = ""
    remove_from_inputs: CodeSet = field(default_factory=CodeSet)  # codes a model must not see (forecast)
    landmarks: LandmarkRule = field(default_factory=LandmarkRule)
    follow_up: FollowUpRule = field(default_factory=FollowUpRule)

    def to_dict(self) -> dict:
        """Plain data for YAML (the form ``Task.from_dict`` reads back)."""

        def plain(value):
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data, source: str = "task") -> "Task":
        """Validate ``data`` strictly; every error names ``source`` and the field."""
        _check_mapping(data, cls, source, "")
        for required in ("name", "condition", "horizons_days"):
            if required not in data:
                raise UserError(f"{source}: field '{required}' is missing; every task needs name, condition and horizons_days")
        name = data["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise UserError(f"{source}: field 'name' must be letters, digits and underscores, got {name!r}")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise UserError(f"{source}: field 'description' must be text, got {description!r}")
        condition = _code_set(data["condition"], source, "condition", allow_empty=False)
        remove = _code_set(data.get("remove_from_inputs", {}), source, "remove_from_inputs", allow_empty=True)
        horizons = data["horizons_days"]
        if isinstance(horizons, int) and not isinstance(horizons, bool):
            horizons = [horizons]
        if not isinstance(horizons, list) or not horizons:
            raise UserError(f"{source}: field 'horizons_days' must be a non-empty list of days, got {horizons!r}")
        for h in horizons:
            if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
                raise UserError(f"{source}: field 'horizons_days' holds {h!r}; a horizon must be a whole number of days >= 1")
        if len(set(horizons)) != len(horizons):
            raise UserError(f"{source}: field 'horizons_days' repeats a horizon: {horizons}")
        lm = data.get("landmarks", {})
        _check_mapping(lm, LandmarkRule, source, "landmarks.")
        landmarks = LandmarkRule(
            min_history_days=_number(lm, "min_history_days", LandmarkRule.min_history_days, source, "landmarks.", int, 0),
            min_age_years=float(_number(lm, "min_age_years", LandmarkRule.min_age_years, source, "landmarks.", float, 0)),
            max_per_subject=_number(lm, "max_per_subject", LandmarkRule.max_per_subject, source, "landmarks.", int, 1),
            sample_probability=_probability(lm, "sample_probability", LandmarkRule.sample_probability, source),
            seed=_number(lm, "seed", LandmarkRule.seed, source, "landmarks.", int, None),
        )
        fu = data.get("follow_up", {})
        _check_mapping(fu, FollowUpRule, source, "follow_up.")
        competing = fu.get("death_is_competing", True)
        if not isinstance(competing, bool):
            raise UserError(f"{source}: field 'follow_up.death_is_competing' must be true or false, got {competing!r}")
        death_codes = fu.get("death_codes", [DEATH_CODE])
        if not isinstance(death_codes, list) or not death_codes or not all(isinstance(c, str) and c for c in death_codes):
            raise UserError(f"{source}: field 'follow_up.death_codes' must be a non-empty list of codes, got {death_codes!r}")
        end_of_data = fu.get("end_of_data", "auto")
        if end_of_data is not None and not isinstance(end_of_data, str):
            end_of_data = str(end_of_data)  # YAML reads an unquoted date as a date
        follow_up = FollowUpRule(death_is_competing=competing, death_codes=tuple(death_codes), end_of_data=end_of_data)
        follow_up.end_of_data_value(source)
        return cls(
            name=name,
            condition=condition,
            horizons_days=tuple(sorted(horizons)),
            description=description,
            remove_from_inputs=remove,
            landmarks=landmarks,
            follow_up=follow_up,
        )


def _check_mapping(data, cls, source: str, where: str) -> None:
    if not isinstance(data, dict):
        raise UserError(f"{source}: {('field ' + repr(where.rstrip('.'))) if where else 'the task'} must be a mapping of fields, got {type(data).__name__}; "
                        f"write it as `field: value` lines ({', '.join(f.name for f in fields(cls))}; docs/tasks.md)")
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise UserError(f"{source}: field '{where}{key}' is unknown{did_you_mean(key, known)}; known fields here: {', '.join(known)}")


def _code_set(data, source: str, where: str, allow_empty: bool) -> CodeSet:
    _check_mapping(data, CodeSet, source, where + ".")
    parts = {}
    for key in ("code_prefixes", "codes"):
        values = data.get(key, []) or []
        if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
            raise UserError(f"{source}: field '{where}.{key}' must be a list of non-empty MEDS codes, got {values!r}")
        parts[key] = tuple(dict.fromkeys(v.strip() for v in values))
    code_set = CodeSet(**parts)
    if not allow_empty and not code_set:
        raise UserError(f"{source}: field '{where}' has an empty code set; list at least one code under {where}.code_prefixes or {where}.codes")
    return code_set


def _number(data: dict, key: str, default, source: str, where: str, kind, minimum):
    value = data.get(key, default)
    ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int else isinstance(value, (int, float)))
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        noun = "a whole number" if kind is int else "a number"
        raise UserError(f"{source}: field '{where}{key}' must be {noun}{bound}, got {value!r}")
    return value


def builtin_tasks() -> list[str]:
    """Names of the tasks shipped with nextvisit."""
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def load_task(name_or_path) -> Task:
    """A built-in task by name, or a task YAML file."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"{path}: no such task file; give a task YAML or one of the built-in tasks: {', '.join(builtin_tasks())}")
    elif (TASK_DIR / f"{text}.yaml").is_file():
        path = TASK_DIR / f"{text}.yaml"
    else:
        raise UserError(f"unknown task {text!r}; built-in tasks: {', '.join(builtin_tasks())}, or give a task YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({yaml_problem(exc)}); fix the syntax there") from None
    return Task.from_dict(data, source=str(path))


# -- labelling ---------------------------------------------------------------------------------------------


def _probability(data: dict, key: str, default: float, source: str) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise UserError(f"{source}: field 'landmarks.{key}' must be a number in (0, 1], got {value!r}")
    return float(value)


def _landmark_keys(seed: int, subject_ids: np.ndarray, days: np.ndarray) -> np.ndarray:
    """A deterministic pseudo-random uint64 per (seed, subject, day): the SplitMix64 finalizer."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
             ^ subject_ids.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
             ^ days.astype(np.int64).astype(np.uint64) * np.uint64(0x8CB92BA72F3D8DD7))
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def sampled_landmarks(rule: LandmarkRule, subject_ids: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Step 5's seeded draw: whether each eligible visit (subject, day since 1970-01-01) is sampled."""
    return _landmark_keys(rule.seed, subject_ids, days).astype(np.float64) < rule.sample_probability * 2.0**64


def first_per_subject(rule: LandmarkRule) -> pl.Expr:
    """Step 5's cap on sampled visits: the first ``max_per_subject`` rows of each ``subject_id`` by ``day``."""
    return pl.col("day").rank("ordinal").over("subject_id") <= rule.max_per_subject


def _shard_tables(path: Path, task: Task) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per subject facts and the subject's visit days, for one shard (two lazy queries, collected once)."""
    events = pl.scan_parquet(path).select("subject_id", "time", "code")
    timed = pl.col("time").is_not_null()
    is_birth = pl.col("code") == BIRTH_CODE
    is_death = pl.col("code").is_in(list(task.follow_up.death_codes))
    is_condition = task.condition.expr()
    is_visit_event = timed & ~is_birth & ~is_death
    subjects = events.group_by("subject_id").agg(
        birth_time=pl.col("time").filter(is_birth).min(),
        death_time=pl.col("time").filter(is_death & timed).min(),
        first_condition_time=pl.col("time").filter(is_condition & timed).min(),
        static_condition=(is_condition & ~timed).any(),
        last_event_time=pl.col("time").max(),
        first_visit_day=pl.col("time").filter(is_visit_event).min().dt.date(),
        sex=pl.col("code").filter(pl.col("code").str.starts_with(SEX_PREFIX)).min().str.strip_prefix(SEX_PREFIX),
    )
    visits = events.filter(is_visit_event).select("subject_id", day=pl.col("time").dt.date()).unique()
    return tuple(pl.collect_all([subjects, visits]))


def _shard_landmarks(subjects: pl.DataFrame, visits: pl.DataFrame, splits: pl.DataFrame, task: Task,
                     end_of_data: datetime | None):
    """Chosen landmarks of one shard (one row per landmark and horizon), the subject exclusion reasons,
    and per horizon the eligible visits and the subjects with none inside the data."""
    rule = task.landmarks
    subjects = subjects.join(splits, on="subject_id", how="left")
    subject_reason = (
        pl.when(pl.col("split").is_null()).then(pl.lit("not_in_subject_splits"))
        .when(pl.col("birth_time").is_null()).then(pl.lit("no_birth_date"))
        .when(pl.col("first_visit_day").is_null()).then(pl.lit("no_visits"))
    )
    subjects = subjects.with_columns(reason=subject_reason)
    candidates = (
        visits.join(subjects.filter(pl.col("reason").is_null()).drop("reason"), on="subject_id", how="inner")
        .with_columns(prediction_time=pl.col("day").cast(pl.Datetime("us")) + END_OF_DAY)
        .with_columns(
            age_years=(pl.col("prediction_time") - pl.col("birth_time")).dt.total_microseconds()
            / (86_400e6 * DAYS_PER_YEAR),
        )
    )
    # Cumulative eligibility flags, in the order of CANDIDATE_REASONS.
    steps = [
        (pl.col("day") - pl.col("first_visit_day")).dt.total_days() >= rule.min_history_days,
        pl.col("age_years") >= rule.min_age_years,
        pl.col("death_time").is_null() | (pl.col("death_time") > pl.col("prediction_time")),
        ~pl.col("static_condition")
        & (pl.col("first_condition_time").is_null() | (pl.col("first_condition_time") > pl.col("prediction_time"))),
    ]
    passed, cumulative = [], pl.lit(True)
    for i, step in enumerate(steps):
        cumulative = cumulative & step
        passed.append(cumulative.alias(f"pass_{i}"))
    candidates = candidates.with_columns(passed)
    survivors = candidates.group_by("subject_id").agg([pl.col(f"pass_{i}").sum() for i in range(len(steps))])
    reason = pl.lit(None, dtype=pl.String)
    for i in reversed(range(len(steps))):
        reason = pl.when(pl.col(f"pass_{i}") == 0).then(pl.lit(CANDIDATE_REASONS[i])).otherwise(reason)
    candidate_reasons = survivors.select("subject_id", reason.alias("candidate_reason"))
    subjects = subjects.join(candidate_reasons, on="subject_id", how="left").with_columns(
        reason=pl.coalesce("reason", "candidate_reason")
    )

    eligible = candidates.filter(pl.col(f"pass_{len(steps) - 1}"))
    sampled = sampled_landmarks(rule, eligible["subject_id"].to_numpy(), eligible["day"].cast(pl.Int32).to_numpy())
    n_before_sampling = eligible["subject_id"].n_unique()
    eligible = eligible.filter(pl.Series(sampled)).sort("subject_id", "day")
    n_subjects = eligible["subject_id"].n_unique()
    chosen, per_horizon = [], {}
    for horizon in task.horizons_days:
        # Only landmarks whose horizon ends within the data (FollowUpRule.end_of_data). The hash key does not
        # depend on the horizon, so the horizons share landmarks wherever their eligible visits overlap.
        inside = eligible if end_of_data is None else eligible.filter(
            pl.col("day") + timedelta(days=horizon) <= pl.lit(end_of_data.date()))
        per_horizon[horizon] = {"eligible_visits": inside.height,
                                "subjects_past_end_of_data": n_subjects - inside["subject_id"].n_unique()}
        chosen.append(
            inside.filter(first_per_subject(rule))
            .with_columns(horizon_days=pl.lit(horizon, dtype=pl.Int32))
            .select(
                "subject_id", "prediction_time", "day", "horizon_days", "split", "age_years", "sex",
                "death_time", "first_condition_time", "last_event_time",
            )
        )
    per_horizon["eligible_subjects"] = n_subjects
    per_horizon["subjects_not_sampled"] = n_before_sampling - n_subjects
    return pl.concat(chosen), subjects.select("subject_id", "reason"), per_horizon


def _follow_up(chosen: pl.DataFrame, task: Task, end_of_data: datetime | None = None) -> pl.DataFrame:
    """The label of each chosen (landmark, horizon) row (module docstring, follow-up), with the follow-up
    columns of ``FOLLOW_UP_SCHEMA`` (the censoring weight still null)."""
    horizon = pl.duration(days=pl.col("horizon_days"))
    horizon_end = pl.col("prediction_time") + horizon
    last_day = pl.col("day").cast(pl.Datetime("us")) + horizon
    positive = pl.col("first_condition_time").is_not_null() & (pl.col("first_condition_time") <= horizon_end)
    died = pl.col("death_time").is_not_null() & (pl.col("death_time") <= horizon_end)
    reached = pl.col("last_event_time") >= last_day
    death_reason = NEGATIVE_DEATH if task.follow_up.death_is_competing else CENSORED_DEATH
    reason = (
        pl.when(positive).then(pl.lit(POSITIVE))
        .when(died).then(pl.lit(death_reason))
        .when(reached).then(pl.lit(NEGATIVE))
        .otherwise(pl.lit(CENSORED))
    )
    value = (
        pl.when(pl.col("reason") == POSITIVE).then(True)
        .when(pl.col("reason").is_in([NEGATIVE, NEGATIVE_DEATH])).then(False)
        .otherwise(None)
    )
    day = pl.col("day").cast(pl.Date)
    days_after = (pl.lit(end_of_data.date()) - day).dt.total_days() - pl.col("horizon_days") if end_of_data else pl.lit(None)
    follow = dict(
        event_days=(pl.col("first_condition_time").dt.date() - day).dt.total_days(),
        followup_days=(pl.col("last_event_time").dt.date() - day).dt.total_days(),
        death_days=(pl.col("death_time").dt.date() - day).dt.total_days(),
        days_after_horizon=days_after,
        **{WEIGHT: pl.lit(None, dtype=pl.Float64)},
    )
    return chosen.with_columns(reason=reason, **follow).with_columns(boolean_value=value, task=pl.lit(task.name)).select(
        [pl.col(name).cast(dtype) for name, dtype in {**LABEL_SCHEMA, **FOLLOW_UP_SCHEMA}.items()]
    )


@dataclass
class LabelResult:
    labels: pl.DataFrame  # LABEL_SCHEMA, sorted by subject_id, prediction_time, horizon_days
    counts: dict


def make_labels(meds_dir: Path, task: Task, progress: bool = True) -> LabelResult:
    """Apply ``task`` to a MEDS dataset, one shard at a time (a subject must not span shards)."""
    from tqdm import tqdm

    meds_dir = Path(meds_dir)
    files = data_files(meds_dir)
    if sum(check_shard_schema(path) for path in files) == 0:
        raise UserError(f"{meds_dir}: the dataset is empty (its {len(files)} data shard(s) hold no rows); give a MEDS "
                        "dataset with events (check that its export finished)")
    splits = read_splits_checked(meds_dir)
    end_of_data = task.follow_up.end_of_data_value()
    if task.follow_up.end_of_data == "auto":
        end_of_data = pl.scan_parquet(files).select(pl.col("time").max()).collect().item()
    seen: set[int] = set()
    chosen_parts, reason_parts = [], []
    per_horizon = {h: {"eligible_visits": 0, "subjects_past_end_of_data": 0} for h in task.horizons_days}
    eligible_subjects = not_sampled = 0
    for path in tqdm(files, desc=f"label {task.name}", unit="shard", disable=not progress, file=sys.stderr):
        subjects, visits = _shard_tables(path, task)
        shard_ids = set(subjects["subject_id"].to_list())
        overlap = seen & shard_ids
        if overlap:
            raise UserError(f"{path}: subject {min(overlap)} also appears in an earlier shard; MEDS shards must hold whole subjects")
        seen |= shard_ids
        chosen, reasons, shard_horizons = _shard_landmarks(subjects, visits, splits, task, end_of_data)
        chosen_parts.append(chosen)
        reason_parts.append(reasons)
        eligible_subjects += shard_horizons.pop("eligible_subjects")
        not_sampled += shard_horizons.pop("subjects_not_sampled")
        for h, counts in shard_horizons.items():
            for key, n in counts.items():
                per_horizon[h][key] += n
    chosen = pl.concat(chosen_parts)
    reasons = pl.concat(reason_parts)
    labels = _follow_up(chosen, task, end_of_data)
    # The censoring model is fit on the train rows only; every row gets its weight (null when censored).
    labels, censoring = add_censoring_weights(labels)
    labels = labels.sort("subject_id", "prediction_time", "horizon_days")
    counts = _counts(meds_dir, task, reasons, labels, per_horizon)
    counts["censoring_model"] = censoring
    # subjects with eligible visits, none of them with any horizon inside the data (step 4)
    counts["subjects"]["excluded"][PAST_END] = eligible_subjects - counts["subjects"]["with_landmarks"]
    # subjects with eligible visits of which none was sampled (step 5)
    counts["subjects"]["excluded"][NOT_SAMPLED] = not_sampled
    counts["end_of_data"] = end_of_data.isoformat() if end_of_data is not None else None
    return LabelResult(labels=labels, counts=counts)


def _counts(meds_dir, task, reasons, labels, per_horizon) -> dict:
    excluded = {r: 0 for r in SUBJECT_REASONS + CANDIDATE_REASONS}
    for reason, n in reasons.filter(pl.col("reason").is_not_null()).group_by("reason").len().iter_rows():
        excluded[reason] = n
    horizons = {}
    death_reason = NEGATIVE_DEATH if task.follow_up.death_is_competing else CENSORED_DEATH
    for horizon in task.horizons_days:
        rows = labels.filter(pl.col("horizon_days") == horizon)
        counts = row_counts(rows, (POSITIVE, NEGATIVE, death_reason, CENSORED))
        horizons[str(horizon)] = {
            "subjects": counts.pop("subjects"),
            # eligible subjects none of whose eligible visits has this horizon inside the data
            "subjects_past_end_of_data": per_horizon[horizon]["subjects_past_end_of_data"],
            "eligible_visits": per_horizon[horizon]["eligible_visits"],
            **counts,
        }
    return {
        "task": task.name,
        "meds_dir": str(meds_dir),
        "subjects": {
            "total": reasons.height,
            "with_landmarks": labels["subject_id"].n_unique(),
            "excluded": excluded,
        },
        "landmarks": {"chosen": labels.select("subject_id", "prediction_time").n_unique(),
                      "max_per_subject_and_horizon": task.landmarks.max_per_subject},
        "horizons": horizons,
    }


def row_counts(rows: pl.DataFrame, reasons: tuple[str, ...]) -> dict:
    """Label rows of one horizon: subjects, rows, labelled, positive, censored, and the rows by reason (every
    one of ``reasons`` listed, 0 where absent) and by split and reason (counts.json's per-horizon block)."""
    by_reason = {r: 0 for r in reasons}
    by_reason.update(dict(rows.group_by("reason").len().iter_rows()))
    by_split = {}
    for split, reason, n in rows.group_by("split", "reason").len().sort("split", "reason").iter_rows():
        by_split.setdefault(split, {})[reason] = n
    return {
        "subjects": rows["subject_id"].n_unique(),
        "rows": rows.height,
        "labelled": int(rows["boolean_value"].is_not_null().sum()),
        "positive": int(rows["boolean_value"].fill_null(False).sum()),
        "censored": int(rows["boolean_value"].is_null().sum()),
        "by_reason": by_reason,
        "by_split": by_split,
    }


def format_counts(counts: dict) -> str:
    """The counts as a short readable block (printed by ``nextvisit label``)."""
    s = counts["subjects"]
    end = (counts.get("end_of_data") or "not used").replace("T", " ")
    excluded = ", ".join(f"{r} {n:,}" for r, n in s["excluded"].items() if n) or "none"
    lines = [
        f"task {counts['task']}: {s['total']:,} subjects, {s['with_landmarks']:,} with landmarks, "
        f"{counts['landmarks']['chosen']:,} landmarks (data end {end})",
        f"subjects excluded: {excluded}",
        "label rows per horizon (only_past_end: subjects whose eligible visits all lie within H days of the data end):",
    ]
    reasons = list(next(iter(counts["horizons"].values()), {}).get("by_reason", {}))
    table = [["horizon", "subjects", "only_past_end", "labelled", *reasons]]
    for horizon, h in counts["horizons"].items():
        table.append([f"{horizon} d", f"{h['subjects']:,}", f"{h['subjects_past_end_of_data']:,}", f"{h['labelled']:,}",
                      *(f"{h['by_reason'].get(r, 0):,}" for r in reasons)])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


# -- files -------------------------------------------------------------------------------------------------


def write_labels(out: Path, result: LabelResult, task: Task, overwrite: bool = False,
                 also: dict[str, str] | None = None) -> Path:
    """The labels folder: labels.parquet, task.yaml, counts.json, and ``also``'s text files (name: text)."""
    with atomic_folder(out, overwrite) as tmp:
        result.labels.write_parquet(tmp / "labels.parquet")
        (tmp / "task.yaml").write_text(yaml.safe_dump(task.to_dict(), sort_keys=False))
        (tmp / "counts.json").write_text(json.dumps(result.counts, indent=2))
        for name, text in (also or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def labels_path(labels: Path) -> Path:
    labels = Path(labels)
    return labels / "labels.parquet" if labels.is_dir() else labels


def read_labels(labels: Path) -> pl.DataFrame:
    """Label rows of a labels folder (or its parquet file), validated against ``LABEL_SCHEMA``."""
    path = labels_path(labels)
    if not path.is_file():
        raise UserError(f"{path}: no labels here; create them with `nextvisit label MEDS_DIR TASK --out LABELS`")
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__}); write the labels again with "
                        "`nextvisit label`") from None
    return check_label_schema(frame, path)


def check_label_schema(frame: pl.DataFrame, path) -> pl.DataFrame:
    """``frame`` with its ``LABEL_SCHEMA`` (and any ``FOLLOW_UP_SCHEMA``) columns cast to their types; a missing
    or uncastable column is an error naming ``path`` (the file, or where the rows came from)."""
    for name, dtype in LABEL_SCHEMA.items():
        if name not in frame.columns:
            raise UserError(f"{path}: column '{name}' is missing; labels need {', '.join(LABEL_SCHEMA)}")
        if frame.schema[name] != dtype:
            try:
                frame = frame.with_columns(pl.col(name).cast(dtype, strict=True))
            except pl.exceptions.PolarsError:
                raise UserError(f"{path}: column '{name}' is {frame.schema[name]}, expected {dtype}") from None
    for name, dtype in FOLLOW_UP_SCHEMA.items():
        if name in frame.columns and frame.schema[name] != dtype:
            try:
                frame = frame.with_columns(pl.col(name).cast(dtype, strict=True))
            except pl.exceptions.PolarsError:
                raise UserError(f"{path}: column '{name}' is {frame.schema[name]}, expected {dtype}") from None
    return frame


def label_counts(labels: pl.DataFrame) -> dict:
    """Label rows per ``"task@horizon"`` and split: labelled, positive, negative and censored (null
    ``boolean_value``). Every predictions folder records these in its info.json, so a report can show the
    censored rows that no model scores.

    >>> frame = pl.DataFrame({"task": ["t", "t", "t"], "horizon_days": [730, 730, 730], "split": ["held_out"] * 3,
    ...                       "boolean_value": [True, False, None]})
    >>> label_counts(frame)
    {'t@730': {'held_out': {'labelled': 2, 'positive': 1, 'negative': 1, 'censored': 1}}}

    With prediction times, each split also gets its rows and censored rows by calendar year of the horizon's
    end (``censored_by_horizon_end_year``: ``{year: {"rows": n, "censored": n}}``).
    """
    counts: dict = {}
    by_year: dict = {}
    if "prediction_time" in labels.columns:
        years = (
            labels.with_columns(year=(pl.col("prediction_time") + pl.duration(days=pl.col("horizon_days"))).dt.year())
            .group_by("task", "horizon_days", "split", "year")
            .agg(pl.len().alias("rows"), pl.col("boolean_value").is_null().sum().alias("censored"))
            .sort("task", "horizon_days", "split", "year")
        )
        for r in years.iter_rows(named=True):
            by_year.setdefault((r["task"], r["horizon_days"], r["split"]), {})[str(r["year"])] = {
                "rows": int(r["rows"]), "censored": int(r["censored"])}
    summary = (
        labels.group_by("task", "horizon_days", "split")
        .agg(
            pl.col("boolean_value").is_null().sum().alias("censored"),
            (pl.col("boolean_value") == True).sum().alias("positive"),  # noqa: E712 - null-aware comparison
            (pl.col("boolean_value") == False).sum().alias("negative"),  # noqa: E712
        )
        .sort("task", "horizon_days", "split")
    )
    for r in summary.iter_rows(named=True):
        counts.setdefault(f"{r['task']}@{r['horizon_days']}", {})[r["split"]] = {
            "labelled": int(r["positive"] + r["negative"]),
            "positive": int(r["positive"]),
            "negative": int(r["negative"]),
            "censored": int(r["censored"]),
        }
        key = (r["task"], r["horizon_days"], r["split"])
        if key in by_year:
            counts[f"{r['task']}@{r['horizon_days']}"][r["split"]]["censored_by_horizon_end_year"] = by_year[key]
    return counts


def read_labels_task(labels: Path) -> Task:
    """The task a labels folder was made with (its ``task.yaml``)."""
    labels = Path(labels)
    path = (labels if labels.is_dir() else labels.parent) / "task.yaml"
    if not path.is_file():
        raise UserError(f"{path}: missing; a labels folder written by `nextvisit label` holds the resolved task")
    return load_task(path)


# -- command line ------------------------------------------------------------------------------------------


# `nextvisit label` options that only an ACES task config takes (nextvisit.tasks.aces)
ACES_OPTIONS = ("condition_predicate", "codes", "horizon_days", "remove_from_inputs", "task_name")


def label(meds_dir: Path, task, out: Path | None = None, overwrite: bool = False, progress: bool = True, *,
          condition_predicate: str | None = None, codes: str | None = None, horizon_days: int | None = None,
          remove_from_inputs: str | None = None, task_name: str | None = None) -> tuple[LabelResult, Task]:
    """``nextvisit label``: apply ``task`` (a built-in name, a task YAML, a ``Task``, or an ACES task config,
    labelled by es-aces with the keyword options, ``ACES_OPTIONS``) to a MEDS dataset. With ``out``, write the
    labels folder (checked before any work). Returns the labels and the task they were made with (an ACES
    config's: its horizon query)."""
    from nextvisit.tasks.aces import is_aces_config, label_aces

    options = {"condition_predicate": condition_predicate, "codes": codes, "horizon_days": horizon_days,
               "remove_from_inputs": remove_from_inputs, "task_name": task_name}
    if not isinstance(task, Task) and is_aces_config(task):
        return label_aces(meds_dir, Path(task), out, overwrite, progress, **options)
    given = [f"--{name.replace('_', '-')}" for name in ACES_OPTIONS if options[name] is not None]
    if given:
        raise UserError(f"{', '.join(given)}: only for ACES task configs; {task} is a nextvisit task, whose "
                        "YAML holds its condition and horizons_days")
    task = task if isinstance(task, Task) else load_task(task)
    if out is not None:
        check_out(out, overwrite)
    result = make_labels(meds_dir, task, progress)
    if out is not None:
        write_labels(out, result, task, overwrite=overwrite)
    return result, task


def condition_absent(result: LabelResult, task: Task) -> str | None:
    """The warning for labels whose condition never occurs (0 prevalent, 0 positive): most likely a code set in
    another coding than the dataset's; None otherwise, and for labels ACES made (it has no prevalence count)."""
    counts = result.counts
    if "labelled_by" in counts:
        return None
    if (result.labels.height and not counts["subjects"]["excluded"].get("prevalent")
            and not any(h["positive"] for h in counts["horizons"].values())):
        return (f"task {task.name}'s condition codes never occur in the candidate subjects (0 prevalent, 0 positive); "
                "check that its code set matches the dataset's coding (built-in tasks: "
                f"{', '.join(builtin_tasks())})")
    return None


def label_cli(args) -> int:
    from nextvisit.tasks.aces import format_aces_counts, is_aces_config

    result, task = label(args.meds_dir, args.task, args.out, args.overwrite,
                         **{name: getattr(args, name) for name in ACES_OPTIONS})
    print(format_aces_counts(result.counts) if is_aces_config(args.task) else format_counts(result.counts))
    print(f"wrote {result.labels.height:,} label rows to {labels_path(args.out)}")
    warning = condition_absent(result, task)
    if warning:
        sys.stderr.write(f"warning: {warning}\n")
    return 0
