"""ACES task configs (the MEDS ecosystem's task language, package ``es-aces``): labels computed by ACES
itself, and our incidence tasks written as ACES configs.

**Labels from an ACES config** (``nextvisit label MEDS_DIR CONFIG.yaml --out LABELS``). A task YAML with any
of the keys ``predicates``, ``trigger``, ``windows`` is an ACES config (a nextvisit task has none of them). It
is loaded by ``aces.config.TaskExtractorConfig.load``; for each MEDS shard (``data/**/*.parquet``, a subject
must not span shards: ACES reads one shard at a time, so its windows would see part of a record) the
predicates are built by ``aces.predicates.get_predicates_df`` and the rows found by ``aces.query.query``.
Every row ACES returns becomes one label row (``LABEL_SCHEMA``):

- ``prediction_time``: the config's ``index_timestamp``; ``boolean_value``: the label window's count of its
  label predicate > 0; ``reason``: ``positive`` or ``negative``;
- ``horizon_days``, ``task``: the horizon query's (below); ``split``: ``metadata/subject_splits.parquet``
  (rows of subjects not listed there are dropped and counted as ``not_in_subject_splits``);
- ``age_years`` at the prediction time from ``MEDS_BIRTH`` (null without one), ``sex`` from ``GENDER//``.

ACES returns only the triggers that satisfy every window; the others are counted, never silently lost:
``counts.json`` (and stdout) give the triggers found (the rows whose trigger predicate holds, as ACES
counts them) against the rows ACES labelled, per shard and in total. There are no censored rows (ACES drops
what it cannot label), so no follow-up columns and no censoring weights are written.

The horizon query (``forecast``, ``sample``, ``occurrence``, the oracle) needs a code set and a horizon,
which an ACES config does not carry as such:

- the code set: ``--codes`` (MEDS codes; an entry ending in ``*`` is a prefix), or the predicate named by
  ``--condition-predicate`` (default: the label window's predicate). A plain predicate's ``code`` string and
  ``{any: [...]}`` list are exact codes; ``{regex: "^(?:A|B)"}`` whose alternatives are literal is a list of
  prefixes (``...)$``: exact codes), the form ``nextvisit export-aces`` writes; any other regex is resolved to
  the codes of MEDS_DIR that match it (by ACES's own expression). An ``or(...)`` predicate is the union of
  its inputs. ``and(...)``, value bounds, other columns and static predicates have no code set: an error.
- the horizon: ``--horizon-days``, or the label window's length where it is a fixed whole number of days
  that starts at the prediction time (``start: trigger, end: start + 730d`` with ``index_timestamp`` at
  the trigger); an error otherwise, and when both are given and differ.

``LABELS/`` holds ``labels.parquet``, ``task.yaml`` (the query's task: ``name``, ``condition``,
``horizons_days``, ``remove_from_inputs``; its ``landmarks`` and ``follow_up`` fields are unused defaults,
as its description says), ``aces.yaml`` (the config as given) and ``counts.json``.

**Our tasks as ACES configs** (``nextvisit export-aces TASK --horizon-days H --out FILE.yaml``): one config
per horizon (ACES labels one window). The trigger is a visit (any timed code other than birth and death;
ACES has no negation and its regexes no look-around, so the predicate is the complement regex written out);
windows: no condition code and no death up to the trigger (``history``, the prediction time at its end), a
visit at least ``min_history_days`` before it, a birth at least ``min_age_years`` before it, the label
window (trigger, trigger + H] and, as MEDS-DEV's tasks do, a ``censoring_protection_window`` that needs an
event at or after the horizon's end. What ACES cannot express of our rule is listed in docs/tasks.md.
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path

import polars as pl
import yaml

from nextvisit.artifacts.folders import atomic_write, check_out
from nextvisit.data.meds import BIRTH_CODE, data_files, read_splits_checked
from nextvisit.errors import UserError
from nextvisit.tasks import (
    LABEL_SCHEMA, NEGATIVE, POSITIVE, SEX_PREFIX, CodeSet, LabelResult, Task, labels_path, load_task, row_counts,
    write_labels,
)
from nextvisit.units import DAYS_PER_YEAR

ACES_KEYS = ("predicates", "trigger", "windows")
CONFIG_FILE = "aces.yaml"  # the ACES config, copied into the labels folder
REGEX_META = set(r"\.+*?()|[]{}^$")
PREFIX_MARK = "*"  # in --codes and --remove-from-inputs: an entry ending in * is a code prefix


# -- reading an ACES config --------------------------------------------------------------------------------


def is_aces_config(task: str | Path) -> bool:
    """Whether ``task`` names a YAML file holding an ACES config (a mapping with a key of ``ACES_KEYS``)."""
    path = Path(str(task))
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False  # load_task reports it
    return isinstance(data, dict) and any(key in data for key in ACES_KEYS)


def load_config(path: Path):
    """(the ``aces.config.TaskExtractorConfig``, the raw YAML mapping); errors name the file."""
    from aces.config import TaskExtractorConfig

    path = Path(path)
    if path.suffix != ".yaml":
        raise UserError(f"{path}: ACES reads task configs named *.yaml only; rename the file")
    raw = yaml.safe_load(path.read_text())
    if "trigger" not in raw:
        raise UserError(f"{path}: field 'trigger' is missing; an ACES config needs predicates, trigger and windows")
    try:
        config = TaskExtractorConfig.load(config_path=path)
    except (ValueError, KeyError, TypeError) as exc:
        message = str(exc).strip("'\"").splitlines()[0]
        raise UserError(f"{path}: not a valid ACES task config ({message})") from None
    if config.label_window is None:
        raise UserError(f"{path}: no window has a 'label'; set `label: PREDICATE` on the outcome window")
    if config.index_timestamp_window is None:
        raise UserError(f"{path}: no window has an 'index_timestamp'; set `index_timestamp: end` on the window "
                        "that ends at the prediction time")
    return config, raw


def parse_codes(text: str, option: str) -> CodeSet:
    """A code set from a comma-separated list; an entry ending in ``*`` is a prefix.

    >>> parse_codes("ICD10CM//F03*, RXNORM//4637", "--codes")
    CodeSet(code_prefixes=('ICD10CM//F03',), codes=('RXNORM//4637',))
    """
    entries = [entry.strip() for entry in text.split(",")]
    if not all(entry.rstrip(PREFIX_MARK) for entry in entries):
        raise UserError(f"{option} {text!r}: an empty code; give MEDS codes separated by commas, a prefix ending in *")
    prefixes = tuple(dict.fromkeys(e[:-1] for e in entries if e.endswith(PREFIX_MARK)))
    codes = tuple(dict.fromkeys(e for e in entries if not e.endswith(PREFIX_MARK)))
    return CodeSet(code_prefixes=prefixes, codes=codes)


def _literal(pattern: str) -> str | None:
    """The text a regex matches literally (metacharacters escaped), or None if it has an unescaped one.

    >>> _literal(r"ICD10CM//G31\\.01"), _literal("ICD10CM//(F03|G30)")
    ('ICD10CM//G31.01', None)
    """
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern) and pattern[i + 1] in REGEX_META:
            out.append(pattern[i + 1])
            i += 2
            continue
        if char in REGEX_META:
            return None
        out.append(char)
        i += 1
    return "".join(out)


def _regex_as_code_set(pattern: str) -> CodeSet | None:
    """``^(?:A|B)`` (prefixes) or ``^(?:A|B)$`` (exact codes) with literal alternatives, else None.

    >>> _regex_as_code_set(r"^(?:ICD10CM//F03|ICD10CM//G31\\.1)")
    CodeSet(code_prefixes=('ICD10CM//F03', 'ICD10CM//G31.1'), codes=())
    >>> _regex_as_code_set("^(?:RXNORM//4637)$").codes, _regex_as_code_set("^ICD10CM//(F03|G30)")
    (('RXNORM//4637',), None)
    """
    if not pattern.startswith("^"):
        return None
    exact = pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1:-1] if exact else pattern[1:]
    if body.startswith("(?:") and body.endswith(")"):
        body = body[3:-1]
    parts = [_literal(part) for part in body.split("|")]
    if not parts or any(not part for part in parts):
        return None  # a metacharacter (or an escaped |) somewhere: not a plain list
    return CodeSet(codes=tuple(parts)) if exact else CodeSet(code_prefixes=tuple(parts))


def _predicate_code_set(path: Path, raw: dict, name: str, dataset_codes, seen: tuple = ()) -> CodeSet:
    """The code set of predicate ``name`` of the raw config (module docstring)."""
    from aces.config import DerivedPredicateConfig, PlainPredicateConfig

    predicates = raw.get("predicates") or {}
    fix = "give the condition's codes with --codes"
    if name in (raw.get("patient_demographics") or {}):
        raise UserError(f"{path}: predicate '{name}' is a static patient_demographics predicate; the horizon query "
                        f"asks about timed codes; {fix}")
    if name not in predicates:
        raise UserError(f"{path}: no predicate '{name}' (--condition-predicate); its predicates: "
                        f"{', '.join(sorted(predicates))}")
    if name in seen:
        raise UserError(f"{path}: predicate '{name}' refers to itself through {' -> '.join(seen)}")
    spec = predicates[name]
    if not isinstance(spec, dict):
        raise UserError(f"{path}: predicate '{name}' is {spec!r}, not a mapping with 'code' or 'expr'")
    try:
        if "expr" in spec:
            derived = DerivedPredicateConfig(**spec)
        else:
            plain_fields = {k: v for k, v in spec.items() if k in PlainPredicateConfig.__dataclass_fields__}
            plain = PlainPredicateConfig(**plain_fields, other_cols={k: v for k, v in spec.items() if k not in plain_fields})
            plain.MEDS_eval_expr()  # ACES's own check of the code field
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: predicate '{name}' is not valid ACES ({str(exc).splitlines()[0]})") from None
    if "expr" in spec:
        if derived.is_and:
            raise UserError(f"{path}: predicate '{name}' is {derived.expr!r}; an and() of predicates is no code set; {fix}")
        parts = [_predicate_code_set(path, raw, p, dataset_codes, (*seen, name)) for p in derived.input_predicates]
        return CodeSet(code_prefixes=tuple(dict.fromkeys(c for p in parts for c in p.code_prefixes)),
                       codes=tuple(dict.fromkeys(c for p in parts for c in p.codes)))
    if plain.value_min is not None or plain.value_max is not None or plain.other_cols:
        raise UserError(f"{path}: predicate '{name}' bounds values or other columns ({', '.join(k for k in spec if k != 'code')}); "
                        f"a code set cannot hold them; {fix}")
    code = plain.code
    if isinstance(code, str):
        return CodeSet(codes=(code,))
    if "any" in code:
        return CodeSet(codes=tuple(dict.fromkeys(code["any"])))
    as_list = _regex_as_code_set(code["regex"])
    if as_list is not None:
        return as_list
    matched = dataset_codes().filter(plain.MEDS_eval_expr())["code"].sort().to_list()
    if not matched:
        raise UserError(f"{path}: predicate '{name}' (regex {code['regex']!r}) matches no code of the dataset; {fix}")
    return CodeSet(codes=tuple(matched))


def _boundary(config, reference: tuple) -> timedelta | None:
    """The time of a window boundary (``('trigger',)``, ``('input', 'end')``) after the trigger, or None where
    it is an event (``-> predicate``, the record's start or end) rather than a fixed time from the trigger."""
    from aces.types import TemporalWindowBounds

    def step(expr) -> timedelta | None:
        if expr is None:
            return timedelta(0)
        return expr.window_size if isinstance(expr, TemporalWindowBounds) else None

    if reference == ("trigger",):
        return timedelta(0)
    window_name, side = reference
    window = config.windows[window_name]
    anchor = _boundary(config, window.referenced_event)
    if window.root_node == "start":  # the start is placed from outside, the end from the start
        start = None if anchor is None or step(window.start_endpoint_expr) is None else anchor + step(window.start_endpoint_expr)
        if side == "start" or start is None:
            return start
        length = step(window.end_endpoint_expr)
        return None if length is None else start + length
    end = None if anchor is None or step(window.end_endpoint_expr) is None else anchor + step(window.end_endpoint_expr)
    if side == "end" or end is None:
        return end
    length = step(window.start_endpoint_expr)
    return None if length is None else end + length


def window_horizon(config) -> tuple[int | None, str]:
    """(the label window's length in days, where it starts at the prediction time and is a whole number of
    days; else None, why not)."""
    label, index = config.label_window, config.index_timestamp_window
    index_side = config.windows[index].index_timestamp
    prediction = _boundary(config, (index, index_side))
    start, end = _boundary(config, (label, "start")), _boundary(config, (label, "end"))
    where = f"the label window '{label}'"
    if start is None or end is None:
        return None, f"{where} is bounded by an event, not by a fixed time"
    if prediction is None or prediction != start:
        return None, f"{where} does not start at the prediction time ({index}.{index_side})"
    if (end - start) % timedelta(days=1) or end <= start:
        return None, f"{where} lasts {end - start}, not a whole number of days"
    return (end - start).days, f"{where} ({(end - start).days} days from the prediction time)"


@dataclass(frozen=True)
class AcesQuery:
    """The horizon query asked of an ACES-labelled folder, and where each part came from."""

    name: str
    condition: CodeSet
    condition_source: str
    horizon_days: int
    horizon_source: str
    remove_from_inputs: CodeSet

    def task(self, config_path: Path) -> Task:
        """The labels folder's task.yaml (what forecast, sample and the oracle read)."""
        return Task(
            name=self.name, condition=self.condition, horizons_days=(self.horizon_days,),
            remove_from_inputs=self.remove_from_inputs,
            description=(f"Labelled by ACES from {Path(config_path).name} (aces.yaml beside this file): its trigger "
                         "and windows chose the rows; the landmarks and follow_up fields below were not used."),
        )


def resolve_query(config_path: Path, config, raw: dict, meds_dir: Path, *, condition_predicate: str | None = None,
                  codes: str | None = None, horizon_days: int | None = None, remove_from_inputs: str | None = None,
                  task_name: str | None = None) -> AcesQuery:
    """The code set, horizon, removed codes and task name of the query (module docstring); errors name the option."""
    if condition_predicate is not None and codes is not None:
        raise UserError("--condition-predicate and --codes both give the condition; give one")
    if codes is not None:
        condition, condition_source = parse_codes(codes, "--codes"), "--codes"
    else:
        name = condition_predicate or config.windows[config.label_window].label
        files = data_files(meds_dir)
        condition = _predicate_code_set(config_path, raw, name, lambda: pl.scan_parquet(files).select(
            pl.col("code").unique()).collect())
        origin = "--condition-predicate" if condition_predicate else "the label predicate"
        condition_source = f"predicate '{name}' ({origin})"
    derived, why = window_horizon(config)
    if horizon_days is not None:
        if derived is not None and derived != horizon_days:
            raise UserError(f"{config_path}: --horizon-days {horizon_days} differs from {why}; drop the option or "
                            "give the window's length")
        horizon, horizon_source = horizon_days, "--horizon-days"
    elif derived is None:
        raise UserError(f"{config_path}: {why}, so the horizon is not known; give it with --horizon-days")
    else:
        horizon, horizon_source = derived, why
    removed = parse_codes(remove_from_inputs, "--remove-from-inputs") if remove_from_inputs else CodeSet()
    name = task_name if task_name is not None else re.sub(r"[^A-Za-z0-9_]", "_", Path(config_path).stem)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise UserError(f"--task-name {name!r}: use letters, digits and underscores")
    return AcesQuery(name=name, condition=condition, condition_source=condition_source, horizon_days=horizon,
                     horizon_source=horizon_source, remove_from_inputs=removed)


# -- labelling ---------------------------------------------------------------------------------------------


def _subject_facts(path: Path) -> pl.DataFrame:
    """``subject_id, birth_time, sex`` of one shard."""
    events = pl.scan_parquet(path).select("subject_id", "time", "code")
    return events.group_by("subject_id").agg(
        birth_time=pl.col("time").filter(pl.col("code") == BIRTH_CODE).min(),
        sex=pl.col("code").filter(pl.col("code").str.starts_with(SEX_PREFIX)).min().str.strip_prefix(SEX_PREFIX),
    ).collect()


def make_aces_labels(meds_dir: Path, config_path: Path, query: AcesQuery, progress: bool = True) -> LabelResult:
    """Label a MEDS dataset with an ACES config, one shard at a time (module docstring)."""
    from aces.predicates import get_predicates_df
    from aces.query import query as aces_query
    from omegaconf import DictConfig
    from tqdm import tqdm

    meds_dir = Path(meds_dir)
    files = data_files(meds_dir)
    splits = read_splits_checked(meds_dir)
    seen: set[int] = set()
    parts, shards = [], []
    n_subjects = 0
    for path in tqdm(files, desc=f"label {query.name} (ACES)", unit="shard", disable=not progress, file=sys.stderr):
        facts = _subject_facts(path)
        overlap = seen & set(facts["subject_id"].to_list())
        if overlap:
            raise UserError(f"{path}: subject {min(overlap)} also appears in an earlier shard; MEDS shards must hold "
                            "whole subjects (ACES reads one shard at a time)")
        seen |= set(facts["subject_id"].to_list())
        n_subjects += facts.height
        # A fresh config per shard: es-aces 0.7.3's query adds to its window tree's offsets in place, so a
        # second query on one config finds other rows (justin13601/ACES#211).
        config, _ = load_config(config_path)
        predicates = get_predicates_df(config, DictConfig({"path": str(path), "standard": "meds"}))
        # the rows ACES starts from: a timestamp where the trigger predicate holds (aces.query.query)
        triggers = predicates.filter(pl.col("timestamp").is_not_null() & (pl.col(config.trigger.predicate) > 0)).height
        found = aces_query(config, predicates)
        rows = (pl.DataFrame(schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "label": pl.Int64})
                if found.is_empty() else
                found.select("subject_id", pl.col("index_timestamp").alias("prediction_time"), pl.col("label").cast(pl.Int64)))
        shards.append({"file": str(path.relative_to(meds_dir)), "triggers": triggers, "rows": rows.height})
        parts.append(rows.join(facts, on="subject_id", how="left"))
    found = pl.concat(parts)
    duplicated = found.group_by("subject_id", "prediction_time").len().filter(pl.col("len") > 1)
    if duplicated.height:
        row = duplicated.row(0, named=True)
        raise UserError(f"{config_path}: {duplicated.height} (subject_id, prediction_time) pairs are labelled more than once "
                        f"(e.g. subject {row['subject_id']} at {row['prediction_time']}); give each trigger its own "
                        "index_timestamp")
    found = found.join(splits, on="subject_id", how="left")
    not_in_splits = found.filter(pl.col("split").is_null())
    positive = pl.col("label") > 0
    labels = (
        found.filter(pl.col("split").is_not_null())
        .with_columns(
            boolean_value=positive,
            reason=pl.when(positive).then(pl.lit(POSITIVE)).otherwise(pl.lit(NEGATIVE)),
            task=pl.lit(query.name),
            horizon_days=pl.lit(query.horizon_days),
            age_years=(pl.col("prediction_time") - pl.col("birth_time")).dt.total_microseconds() / (86_400e6 * DAYS_PER_YEAR),
        )
        .select([pl.col(name).cast(dtype) for name, dtype in LABEL_SCHEMA.items()])
        .sort("subject_id", "prediction_time", "horizon_days")
    )
    n_triggers = sum(s["triggers"] for s in shards)
    counts = {
        "task": query.name,
        "meds_dir": str(meds_dir),
        "labelled_by": {"tool": "es-aces", "version": version("es-aces"), "config": str(config_path)},
        "query": {"condition": {"source": query.condition_source, "code_prefixes": list(query.condition.code_prefixes),
                                "codes": list(query.condition.codes)},
                  "horizon_days": query.horizon_days, "horizon_source": query.horizon_source},
        "subjects": {"total": n_subjects, "with_rows": labels["subject_id"].n_unique()},
        "triggers": n_triggers,
        "rows_from_aces": found.height,
        "triggers_excluded_by_aces": n_triggers - found.height,
        "rows_dropped": {"not_in_subject_splits": not_in_splits.height},
        "shards": shards,
        "horizons": {str(query.horizon_days): row_counts(labels, (POSITIVE, NEGATIVE))},
    }
    return LabelResult(labels=labels, counts=counts)


def format_aces_counts(counts: dict) -> str:
    """The counts as a short readable block (printed by ``nextvisit label`` for an ACES config)."""
    horizon, h = next(iter(counts["horizons"].items()))
    dropped = ", ".join(f"{r} {n:,}" for r, n in counts["rows_dropped"].items() if n) or "none"
    q = counts["query"]
    cond = q["condition"]
    return "\n".join([
        f"task {counts['task']} by ACES ({counts['labelled_by']['config']}, es-aces {counts['labelled_by']['version']}): "
        f"{counts['subjects']['total']:,} subjects in {len(counts['shards'])} shard(s)",
        f"triggers found {counts['triggers']:,}; rows ACES labelled {counts['rows_from_aces']:,} "
        f"({counts['triggers_excluded_by_aces']:,} triggers excluded by the config's windows); rows dropped: {dropped}",
        f"label rows {horizon} d: {h['rows']:,} of {h['subjects']:,} subjects, positive {h['positive']:,}, "
        f"negative {h['by_reason'][NEGATIVE]:,}",
        f"query: condition from {cond['source']}: {len(cond['code_prefixes'])} prefixes, {len(cond['codes'])} codes; "
        f"horizon {q['horizon_days']} days from {q['horizon_source']}",
    ])


def label_aces(meds_dir: Path, config_path: Path, out: Path | None = None, overwrite: bool = False,
               progress: bool = True, **query_options) -> tuple[LabelResult, Task]:
    """Label a MEDS dataset with the ACES config ``config_path`` (``resolve_query``'s keyword options give the
    horizon query); with ``out``, write the labels folder with the config beside them as aces.yaml. Returns the
    labels and the query's task."""
    config_path = Path(config_path)
    config, raw = load_config(config_path)
    if out is not None:
        check_out(out, overwrite)
    query = resolve_query(config_path, config, raw, meds_dir, **query_options)
    result = make_aces_labels(meds_dir, config_path, query, progress)
    task = query.task(config_path)
    if out is not None:
        write_labels(out, result, task, overwrite=overwrite, also={CONFIG_FILE: config_path.read_text()})
    return result, task


# -- export ------------------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    return "".join("\\" + c if c in REGEX_META else c for c in text)


def none_of(words) -> str:
    """A regex (no look-around, which ACES's polars regexes lack) matching every string except ``words``.

    >>> pattern = none_of(["MEDS_BIRTH", "MEDS_DEATH"])
    >>> pl.Series(["MEDS_BIRTH", "MEDS_DEATH", "MEDS_BIRTHX", "MEDS_", "ICD10CM//F03"]).str.contains(pattern).to_list()
    [False, False, True, True, True]
    """
    words = set(words)

    def node(prefix: str) -> str:
        following = sorted({w[len(prefix)] for w in words if w.startswith(prefix) and len(w) > len(prefix)})
        options = [] if prefix in words else [""]  # the string may end here
        if following:
            excluded = "".join("\\" + c if c in "\\]-^[&~" else c for c in following)
            options.append(f"[^{excluded}].*")
            options += [_escape(c) + node(prefix + c) for c in following]
        else:
            options.append(".+")
        return "(?:" + "|".join(options) + ")"

    return "(?s)^" + node("") + "$"


def _code_set_predicates(name: str, code_set: CodeSet) -> dict:
    """ACES predicates for a code set: ``name`` itself, and its two parts when it has prefixes and codes."""
    prefixes = {"code": {"regex": "^(?:" + "|".join(_escape(p) for p in code_set.code_prefixes) + ")"}}
    codes = {"code": {"any": list(code_set.codes)}}
    if code_set.code_prefixes and code_set.codes:
        return {name: {"expr": f"or({name}_prefixes, {name}_codes)"}, f"{name}_prefixes": prefixes, f"{name}_codes": codes}
    return {name: prefixes if code_set.code_prefixes else codes}


def export_config(task: Task, horizon_days: int) -> str:
    """``task`` at one horizon as the text of an ACES config (module docstring; docs/tasks.md)."""
    rule, follow = task.landmarks, task.follow_up
    predicates = {
        **_code_set_predicates("condition", task.condition),
        "visit": {"code": {"regex": none_of([BIRTH_CODE, *follow.death_codes])}},
        "birth": {"code": BIRTH_CODE},
        "death": {"code": {"any": list(follow.death_codes)}},
    }
    windows = {
        "history": {"start": None, "end": "trigger", "start_inclusive": True, "end_inclusive": True,
                    "has": {"condition": "(None, 0)", "death": "(None, 0)"}, "index_timestamp": "end"},
    }
    if rule.min_history_days:
        windows["min_history"] = {"start": None, "end": f"trigger - {rule.min_history_days} days",
                                  "start_inclusive": True, "end_inclusive": True, "has": {"visit": "(1, None)"}}
    if rule.min_age_years:
        days = f"{rule.min_age_years * DAYS_PER_YEAR:.6f}".rstrip("0").rstrip(".")  # 50 years: 18262.5 days
        windows["min_age"] = {"start": None, "end": f"trigger - {days} days",
                              "start_inclusive": True, "end_inclusive": True, "has": {"birth": "(1, None)"}}
    windows["target"] = {"start": "trigger", "end": f"start + {horizon_days} days", "start_inclusive": False,
                         "end_inclusive": True, "label": "condition"}
    if not follow.death_is_competing:
        windows["target"]["has"] = {"death": "(None, 0)"}
    windows["censoring_protection_window"] = {"start": "target.end", "end": None, "start_inclusive": True,
                                              "end_inclusive": True, "has": {"_ANY_EVENT": "(1, None)"}}
    config = {
        "metadata": {"description": f"{task.description} Exported from the nextvisit task '{task.name}' at "
                                    f"{horizon_days} days (nextvisit export-aces)."},
        "predicates": predicates,
        "trigger": "visit",
        "windows": windows,
    }
    removed = ", ".join([*task.remove_from_inputs.code_prefixes, *(c for c in task.remove_from_inputs.codes)])
    header = [
        f"# The nextvisit task '{task.name}' at a {horizon_days}-day horizon, written by `nextvisit export-aces`.",
        "# Label it with `nextvisit label MEDS_DIR THIS.yaml --out LABELS` (horizon and condition are read from the",
        "# target window and its label predicate) or with aces-cli. What ACES cannot express (docs/tasks.md):",
        "# - the prediction time: ACES gives the trigger's event time, not the end of the visit day;",
        f"# - landmark sampling: ACES keeps every valid trigger (the task draws each with probability "
        f"{rule.sample_probability:g}, seed {rule.seed}, at most {rule.max_per_subject} per subject);",
        "# - censoring: ACES drops rows it cannot label; the censoring_protection_window (as in MEDS-DEV) keeps only",
        "#   rows whose record reaches the horizon's end, so onsets and deaths without later events are dropped too",
        f"#   (the task labels them{' and counts a death within the horizon as a negative' if follow.death_is_competing else ''}); no censoring weights;",
        f"# - the end of the data ({follow.end_of_data or 'none'}): a dataset-wide date no ACES window can refer to;",
        "# - a static condition code (the task: prevalent); ACES static predicates can require codes, not exclude them;",
        f"# - remove_from_inputs ({removed or 'none'}): codes hidden from models; give them to `nextvisit label` "
        "with --remove-from-inputs.",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, width=10_000)


def export_cli(args) -> int:
    from aces.config import TaskExtractorConfig

    task = load_task(args.task)
    horizon = args.horizon_days
    if horizon is None:
        if len(task.horizons_days) > 1:
            raise UserError(f"task {task.name} has horizons {', '.join(map(str, task.horizons_days))} days; an ACES "
                            "config labels one window, so choose one with --horizon-days")
        horizon = task.horizons_days[0]
    out = Path(args.out)
    if out.suffix != ".yaml":
        raise UserError(f"{out}: ACES reads task configs named *.yaml only; give --out FILE.yaml")
    if out.exists() and (out.is_dir() or not args.overwrite):
        raise UserError(f"{out}: exists; choose another --out or pass --overwrite to replace it")
    text = export_config(task, horizon)
    with tempfile.TemporaryDirectory() as folder:  # the config must load in ACES before it is written
        check = Path(folder) / out.name
        check.write_text(text)
        TaskExtractorConfig.load(config_path=check)
    atomic_write(out, lambda tmp: tmp.write_text(text))
    print(f"wrote the ACES config of task {task.name} at {horizon} days to {out}")
    return 0
