"""OMOP CDM 5.4 -> MEDS 0.4 (`nextvisit convert omop`), through the maintained converter ``meds_etl_omop``
(PyPI ``meds_etl``, the converter femr and EHRSHOT use) run in its own environment: it pins ``meds==0.3.3``,
which cannot share ours (``make omop-env`` creates ``.venv-omop``; docs/omop.md says why this converter).

The steps, each checked:

1. **Input checks** (before any work): the folder holds ``person`` and ``concept`` (CSV, CSV.gz, parquet, or a
   folder of such shards; file names in any case), every table the converter reads has the columns it needs,
   and every date or datetime parses. Errors name the table file, the column and the row.
2. **Staging**: each table under the lower-case name the converter expects; with ``--concepts standard``
   (the default) the ``*_source_concept_id`` columns are set to 0, so the converter takes the standard concept
   (it prefers a non-zero source concept otherwise: ``--concepts source``).
3. **The converter** runs in a subprocess; its log is kept.
4. **Post-processing into MEDS 0.4**: codes become ``vocabulary_id//concept_code`` (the converter writes one
   slash), ``metadata/codes.parquet`` gets every code's concept name, ``metadata/subject_splits.parquet``
   draws train/tuning/held_out per person from a seed, ``metadata/dataset.json`` says where the data came from.
5. **Accounting** (``metadata/omop_conversion.json``, printed as a table): for every table and every concept
   field the converter reads, the input rows, the events written, and the rows it drops by reason (no concept,
   a concept id missing from the concept table); the converter's output must balance against these counts
   per table, else the conversion stops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from nextvisit.artifacts.folders import atomic_folder, check_out
from nextvisit.data.meds import BIRTH_CODE, DEATH_CODE, check_events, normalize_events
from nextvisit.errors import UserError

CONVERTER = "meds_etl_omop"
CONVERTER_VERSION = "0.3.11"  # the version `make omop-env` installs (converters/omop.txt)
CONVERTER_ENV = "NEXTVISIT_MEDS_ETL_OMOP"  # path of a meds_etl_omop executable, overrides the lookup
CONVERSION_FILE = "omop_conversion.json"
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
TIME_FORMATS = ("%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d")


@dataclass(frozen=True)
class Field:
    """One kind of event the converter makes from each row of a table: a concept field (``concept``), or a
    fixed code (``forced``); ``fallback`` is the concept id it uses when the field is 0."""

    concept: str | None = None
    forced: str | None = None
    fallback: int | None = None
    time_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    """An OMOP table the converter reads: the file stem, the ``table`` label of its events in the output,
    and the events made from each row."""

    stem: str
    label: str
    fields: tuple[Field, ...]
    time_prefix: str

    @property
    def time_columns(self) -> tuple[str, ...]:
        p = self.time_prefix
        return (f"{p}_start_datetime", f"{p}_start_date", f"{p}_datetime", f"{p}_date")


# What meds_etl_omop 0.3.11 reads (its table list, as facts: the tables, the concept fields, the fallback ids).
TABLES = (
    Table("person", "person", (Field(forced=BIRTH_CODE), Field("gender_concept_id"), Field("race_concept_id"),
                               Field("ethnicity_concept_id")), "person"),
    Table("drug_exposure", "drug_exposure", (Field("drug_concept_id"),), "drug_exposure"),
    Table("visit_occurrence", "visit",
          (Field("visit_concept_id", fallback=8),
           Field("discharged_to_concept_id", time_options=("visit_end_datetime", "visit_end_date"))), "visit"),
    Table("condition_occurrence", "condition", (Field("condition_concept_id"),), "condition"),
    Table("death", "death", (Field(forced=DEATH_CODE),), "death"),
    Table("procedure_occurrence", "procedure", (Field("procedure_concept_id"),), "procedure"),
    Table("device_exposure", "device_exposure", (Field("device_concept_id"),), "device_exposure"),
    Table("measurement", "measurement", (Field("measurement_concept_id"),), "measurement"),
    Table("observation", "observation", (Field("observation_concept_id"),), "observation"),
    Table("note", "note", (Field("note_class_concept_id", fallback=46235038),), "note"),
    Table("visit_detail", "visit_detail", (Field("visit_detail_concept_id", fallback=4203722),), "visit_detail"),
)
METADATA_TABLES = ("concept_relationship", "cdm_source")
# The OMOP Gender vocabulary's two standard concepts: vocabulary subsets (e.g. Eunomia's) often lack them, and
# without them no person would have a sex. Added to the staged concept table when absent (and counted).
GENDER_CONCEPTS = {8507: ("M", "MALE"), 8532: ("F", "FEMALE")}
# Demographic vocabularies spelled as the tokenizer's demographic prefixes (GENDER//, RACE//, ETHNICITY//).
DEMOGRAPHIC_VOCABULARIES = {"Gender": "GENDER", "Race": "RACE", "Ethnicity": "ETHNICITY"}


@dataclass
class OmopOptions:
    concepts: str = "standard"  # "standard" or "source"
    converter: Path | None = None
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS
    shards: int | None = None  # default: one per 100,000 persons
    workers: int = 1
    tables: tuple[str, ...] | None = None  # default: every table of TABLES the folder holds


@dataclass
class TableCount:
    """The accounting of one input table: rows in, events out, rows dropped per field and reason."""

    table: str
    file: str
    rows: int
    events: int = 0
    expected_events: int = 0
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    absent_columns: list[str] = field(default_factory=list)


# -- finding and checking the input ---------------------------------------------------------------------------
def table_files(omop_dir: Path, stem: str) -> list[Path]:
    """The files of one table: ``stem.csv``, ``stem.csv.gz``, ``stem.parquet`` or a folder ``stem/`` of such
    shards, matched case-insensitively (OMOP exports often use upper-case names)."""
    matches = []
    for path in sorted(omop_dir.iterdir()):
        name = path.name.lower()
        if path.is_dir() and name == stem:
            shards = sorted(p for p in path.iterdir() if _is_table_file(p))
            if not shards:
                raise UserError(f"{path}: folder of table {stem!r} holds no .csv, .csv.gz or .parquet file")
            matches.append(shards)
        elif path.is_file() and _is_table_file(path) and _stem(path) == stem:
            matches.append([path])
    if len(matches) > 1:
        names = ", ".join(str(m[0].relative_to(omop_dir)) for m in matches)
        raise UserError(f"{omop_dir}: table {stem!r} is given more than once ({names}); keep one")
    return matches[0] if matches else []


def _is_table_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".csv", ".csv.gz", ".parquet")) and not name.startswith(("._", "."))


def _stem(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".csv.gz", ".csv", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_table(files: list[Path]) -> pl.DataFrame:
    """One table, columns lower-cased; CSV read as text (OMOP ids must not be guessed as floats)."""
    frames = []
    for path in files:
        try:
            if path.name.lower().endswith(".parquet"):
                frame = pl.read_parquet(path)
            else:
                frame = pl.read_csv(path, infer_schema=False)
        except Exception as exc:
            raise UserError(f"{path}: unreadable as {'parquet' if path.suffix.lower() == '.parquet' else 'CSV'} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                            "repair or remove the file") from None
        frames.append(frame.rename({c: c.lower() for c in frame.columns}))
    return pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]


def _require_columns(frame: pl.DataFrame, source: str, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{source}: column {missing[0]!r} missing ({what}); the table has "
                        f"{', '.join(frame.columns[:12])}{'...' if frame.width > 12 else ''}; rename or add it "
                        "(OMOP CDM 5.4 names)")


def _parsed_time(frame: pl.DataFrame, column: str) -> pl.Expr:
    dtype = frame.schema[column]
    if dtype == pl.String:
        return pl.coalesce([pl.col(column).str.strip_chars().str.to_datetime(f, strict=False, time_unit="us")
                            for f in TIME_FORMATS])
    return pl.col(column).cast(pl.Datetime("us"), strict=False)


def check_times(frame: pl.DataFrame, source: str, columns: list[str]) -> None:
    """Every non-empty value of each date column parses as a date or datetime; else the row and value."""
    for column in columns:
        if column not in frame.columns:
            continue
        dtype = frame.schema[column]
        if dtype == pl.Date or isinstance(dtype, pl.Datetime) or dtype == pl.Null:
            continue
        if dtype != pl.String:
            raise UserError(f"{source}: column {column!r} has type {dtype}, expected a date or datetime")
        value = pl.col(column).str.strip_chars()
        bad = frame.select(pl.int_range(pl.len()).alias("row"), value.alias("value"),
                           _parsed_time(frame, column).alias("parsed")).filter(
            pl.col("value").is_not_null() & (pl.col("value") != "") & pl.col("parsed").is_null())
        if bad.height:
            row, text, _ = bad.row(0)
            raise UserError(f"{source}: column {column!r} row {row + 1} holds {text!r}, not a date "
                            f"(YYYY-MM-DD or YYYY-MM-DD HH:MM:SS); {bad.height} such row(s); repair them")


def _check_table(table: Table, frame: pl.DataFrame, source: str) -> None:
    _require_columns(frame, source, ["person_id"], "every event needs its person")
    main = next((f.concept for f in table.fields if f.concept), None)
    if main and table.stem != "person":
        _require_columns(frame, source, [main], "the concept of each row")
    if table.stem == "person":
        _require_columns(frame, source, ["year_of_birth"], "the birth date")
        check_times(frame, source, ["birth_datetime"])
        years = frame.get_column("year_of_birth").cast(pl.Int64, strict=False)
        bad = frame.with_row_index("row").filter(years.is_null())
        if bad.height:
            raise UserError(f"{source}: column 'year_of_birth' row {bad['row'][0] + 1} holds "
                            f"{bad['year_of_birth'][0]!r}, not a year; every person needs a year of birth")
        return
    times = [c for c in table.time_columns if c in frame.columns]
    if not times:
        raise UserError(f"{source}: no date column (expected one of {', '.join(table.time_columns)})")
    options = [c for f in table.fields for c in f.time_options if c in frame.columns]
    check_times(frame, source, times + options)


# -- the converter ---------------------------------------------------------------------------------------------
def find_converter(given: Path | None) -> Path:
    """``--converter``, else $NEXTVISIT_MEDS_ETL_OMOP, else ``meds_etl_omop`` on PATH, else the project's
    ``.venv-omop`` (made by ``make omop-env``) beside the environment nextvisit runs in."""
    candidates = []
    if given is not None:
        candidates.append(("--converter", Path(given)))
    elif os.environ.get(CONVERTER_ENV):
        candidates.append((f"${CONVERTER_ENV}", Path(os.environ[CONVERTER_ENV])))
    else:
        on_path = shutil.which(CONVERTER)
        if on_path:
            return Path(on_path)
        candidates.append(("the project's .venv-omop", Path(sys.prefix).resolve().parent / ".venv-omop" / "bin" / CONVERTER))
    source, path = candidates[0]
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise UserError(f"{path}: no {CONVERTER} executable ({source}); create its environment with "
                        f"`make omop-env` (or `python -m venv ENV && ENV/bin/pip install meds_etl=={CONVERTER_VERSION} "
                        f"'polars<2'`) and pass --converter ENV/bin/{CONVERTER}")
    return path


def converter_python(converter: Path) -> Path:
    """The interpreter of the converter's environment: the script's ``#!`` line (console scripts name their
    environment's python there), else the ``python`` beside it."""
    try:
        first = converter.read_bytes()[:512].split(b"\n", 1)[0].decode(errors="replace")
    except OSError:
        first = ""
    if first.startswith("#!") and "python" in first:
        return Path(first[2:].strip().split()[0])
    return converter.parent / "python"


def _clean_env() -> dict:
    """Our environment without PYTHONPATH/PYTHONHOME, so the converter's interpreter sees its own packages only."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def converter_versions(converter: Path) -> dict:
    """The converter environment's meds_etl and meds versions (it must not be ours: meds 0.3.3)."""
    python = converter_python(converter)
    if not python.exists():
        return {"meds_etl": "unknown", "meds": "unknown"}
    code = "import meds, meds_etl, json; print(json.dumps({'meds_etl': meds_etl.__version__, 'meds': meds.__version__}))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=_clean_env())
    if out.returncode:
        raise UserError(f"{converter}: its environment ({python}) cannot import meds_etl "
                        f"({(out.stderr.strip().splitlines() or ['no output'])[-1]}); recreate it with `make omop-env`")
    return json.loads(out.stdout)


# -- the conversion --------------------------------------------------------------------------------------------
def convert_omop(omop_dir: Path, out: Path, options: OmopOptions, overwrite: bool = False,
                 log=print) -> dict:
    """Convert an OMOP CDM folder into a MEDS 0.4 dataset at ``out``; returns the accounting summary."""
    omop_dir = Path(omop_dir)
    if not omop_dir.is_dir():
        raise UserError(f"{omop_dir}: no such folder; give the folder holding the OMOP CDM tables (person, concept, ...)")
    if options.concepts not in ("standard", "source"):
        raise UserError(f"--concepts {options.concepts!r}: expected standard or source")
    check_out(out, overwrite)
    converter = find_converter(options.converter)
    versions = converter_versions(converter)
    started = time.perf_counter()

    concept_files = table_files(omop_dir, "concept")
    person_files = table_files(omop_dir, "person")
    if not person_files:
        raise UserError(f"{omop_dir}: the required table 'person' is missing (person.csv, .csv.gz, .parquet or "
                        "person/); every OMOP CDM export has one")
    if not concept_files:
        raise UserError(f"{omop_dir}: the required table 'concept' is missing (concept.csv, .csv.gz, .parquet or "
                        "concept/); codes are spelled vocabulary//concept_code from it: export it with the data")
    concept = read_table(concept_files)
    _require_columns(concept, str(concept_files[0]), ["concept_id", "vocabulary_id", "concept_code", "concept_name"],
                     "codes are built from it")
    concept = concept.select(pl.col("concept_id").cast(pl.Int64, strict=False), "vocabulary_id", "concept_code",
                             "concept_name").filter(pl.col("concept_id").is_not_null())
    added = {cid: v for cid, v in GENDER_CONCEPTS.items() if cid not in set(concept.get_column("concept_id"))}
    if added:
        concept = pl.concat([concept, pl.DataFrame({
            "concept_id": list(added), "vocabulary_id": ["Gender"] * len(added),
            "concept_code": [v[0] for v in added.values()], "concept_name": [v[1] for v in added.values()]},
            schema=concept.schema)])
    known = set(concept.get_column("concept_id").to_list())

    wanted = set(options.tables) if options.tables else None
    if wanted:
        unknown = sorted(wanted - {t.stem for t in TABLES})
        if unknown:
            raise UserError(f"--tables: {unknown[0]!r} is not a table the converter reads "
                            f"({', '.join(t.stem for t in TABLES)})")
        wanted.add("person")
    counts: list[TableCount] = []
    with atomic_folder(out, overwrite) as staging:
        work = staging / ".work"
        staged = work / "omop"
        staged.mkdir(parents=True)
        for table in TABLES:
            files = table_files(omop_dir, table.stem)
            if not files or (wanted and table.stem not in wanted):
                continue
            frame = read_table(files)
            source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"
            _check_table(table, frame, source)
            absent = [f.concept for f in table.fields if f.concept and f.concept not in frame.columns]
            if absent:  # a secondary concept column (e.g. race, discharged_to) absent: no event from it
                frame = frame.with_columns(pl.lit(None, pl.String).alias(c) for c in absent)
            if options.concepts == "standard":
                frame = frame.with_columns(pl.lit(0).cast(frame.schema[c]).alias(c)
                                           for c in frame.columns if c.endswith("_source_concept_id"))
            counts.append(_expected(table, frame, known, source))
            counts[-1].absent_columns = absent
            if frame.height:
                frame.write_parquet(staged / f"{table.stem}.parquet")
        concept.with_columns(pl.col("concept_id").cast(pl.String)).write_parquet(staged / "concept.parquet")
        for stem in METADATA_TABLES:
            files = table_files(omop_dir, stem)
            if files:
                read_table(files).write_parquet(staged / f"{stem}.parquet")
        log(f"staged {len(counts)} OMOP tables ({sum(c.rows for c in counts):,} rows) from {omop_dir}")

        n_persons = next(c.rows for c in counts if c.table == "person")
        shards = options.shards or max(1, -(-n_persons // 100_000))
        converted = work / "meds"
        _run_converter(converter, staged, converted, shards, options.workers, work / "converter.log", log)
        summary = _finish(converted, staging, counts, concept, options, versions, omop_dir, added, log)
        shutil.rmtree(work)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    _write_summary(out / "metadata" / CONVERSION_FILE, summary)
    log(_summary_table(summary))
    return summary


def _expected(table: Table, frame: pl.DataFrame, known: set[int], source: str) -> TableCount:
    """Rows per field the converter turns into an event (its rule: the source concept when non-zero, else the
    concept, else the fallback; an id missing from the concept table gives no code and the row is dropped)."""
    count = TableCount(table=table.stem, file=source, rows=frame.height)
    for f in table.fields:
        if f.forced:
            count.expected_events += frame.height
            continue
        name = f.concept
        concept = pl.col(name).cast(pl.Int64, strict=False) if name in frame.columns else pl.lit(None, pl.Int64)
        source_name = name.replace("_concept_id", "_source_concept_id")
        source_id = (pl.col(source_name).cast(pl.Int64, strict=False) if source_name in frame.columns
                     else pl.lit(0, pl.Int64))
        chosen = (pl.when(source_id.fill_null(0) != 0).then(source_id)
                  .when(concept.fill_null(0) != 0).then(concept)
                  .otherwise(pl.lit(f.fallback, pl.Int64)))
        ids = frame.select(chosen.alias("id")).get_column("id")
        no_concept = int(ids.is_null().sum())
        mapped = int(ids.is_in(list(known)).sum()) if len(known) else 0
        unknown = frame.height - no_concept - mapped
        count.expected_events += mapped
        dropped = {}
        if no_concept:
            dropped["no concept (0 or empty, no fallback)"] = no_concept
        if unknown:
            dropped["concept id not in the concept table"] = unknown
        if dropped:
            count.dropped[name] = dropped
    return count


def _run_converter(converter: Path, staged: Path, dest: Path, shards: int, workers: int, log_path: Path, log) -> None:
    command = [str(converter), str(staged), str(dest), "--num_shards", str(shards), "--num_proc", str(workers)]
    log(f"running {converter.name} ({shards} shard(s), {workers} worker(s)) ...")
    with open(log_path, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=_clean_env())
    if done.returncode:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        kept = Path(str(dest.parents[2]) + ".convert.log") if len(dest.parents) > 2 else log_path
        shutil.copy(log_path, kept)
        raise UserError(f"{converter.name} failed (exit {done.returncode}): {tail[0] if tail else 'no output'}; "
                        f"its log: {kept}")


def _finish(converted: Path, staging: Path, counts: list[TableCount], concept: pl.DataFrame, options: OmopOptions,
            versions: dict, omop_dir: Path, added: dict, log) -> dict:
    files = sorted((converted / "data").glob("*.parquet"))
    if not files:
        raise UserError(f"{CONVERTER} wrote no data shard from {omop_dir}; see its log")
    (staging / "data").mkdir()
    label_of = {t.stem: t.label for t in TABLES}
    produced: dict[str, int] = {}
    no_time = 0
    subjects = []
    for index, path in enumerate(files):
        frame = pl.read_parquet(path)
        for label, n in frame.group_by("table").len().iter_rows():
            produced[label] = produced.get(label, 0) + n
        no_time += int(frame.get_column("time").is_null().sum())
        frame = frame.filter(pl.col("time").is_not_null())
        frame = frame.with_columns(code=_meds_code(pl.col("code")))
        core = normalize_events(frame, str(path))
        extra = [c for c in frame.columns if c not in core.columns]
        frame = pl.concat([core, frame.select(extra)], how="horizontal_extend").sort("subject_id", "time", maintain_order=True)
        check_events(frame, f"{CONVERTER} output {path.name}")
        table = meds.DataSchema.align(frame.to_arrow())  # the MEDS column types and order, extras kept
        meds.DataSchema.validate(table)
        pq.write_table(table, staging / "data" / f"{index}.parquet")
        subjects.append(frame.get_column("subject_id").unique())
    for count in counts:
        count.events = produced.pop(label_of[count.table], 0)
    if produced:
        raise UserError(f"{CONVERTER} output holds events of unexpected tables {sorted(produced)}; "
                        "the converter version differs from the one this was checked with "
                        f"({CONVERTER_VERSION})")
    unbalanced = [c for c in counts if c.events != c.expected_events]
    if unbalanced:
        c = unbalanced[0]
        raise UserError(f"{c.file}: {c.rows:,} rows gave {c.events:,} events, but {c.expected_events:,} were expected "
                        f"from its concepts; the conversion does not balance (converter {versions.get('meds_etl')}, "
                        f"checked with {CONVERTER_VERSION})")

    ids = pl.concat(subjects).unique().sort()
    persons = _person_ids(omop_dir)
    without_events = persons.filter(~pl.col("subject_id").is_in(ids.implode())).height
    splits = _splits(ids.to_numpy(), options.split_seed, options.split_fractions)
    meds.SubjectSplitSchema.validate(splits)
    (staging / "metadata").mkdir()
    pq.write_table(splits, staging / "metadata" / "subject_splits.parquet")
    pq.write_table(_codes(staging / "data", concept), staging / "metadata" / "codes.parquet")
    source_meta = json.loads((converted / "metadata" / "dataset.json").read_text())
    dataset = {"dataset_name": source_meta.get("dataset_name") or omop_dir.name,
               "dataset_version": source_meta.get("dataset_version") or "",
               "etl_name": f"nextvisit convert omop (meds_etl {versions.get('meds_etl')})",
               "etl_version": _version(), "meds_version": getattr(meds, "__version__", "0.4")}
    meds.DatasetMetadataSchema.validate(dataset)
    (staging / "metadata" / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    split_counts = pl.from_arrow(splits).group_by("split").len().sort("split").rows()
    return {
        "source": str(omop_dir), "concepts": options.concepts, "converter": {"name": CONVERTER, **versions},
        "tables": [vars(c) for c in counts],
        "rows_in": sum(c.rows for c in counts), "events_out": sum(c.events for c in counts) - no_time,
        "dropped_no_time": no_time, "persons": persons.height, "subjects": ids.len(),
        "persons_without_events": without_events,
        "splits": {name: n for name, n in split_counts}, "split_seed": options.split_seed,
        "concepts_added": [f"Gender//{v[0]} ({cid})" for cid, v in added.items()],
    }


def _meds_code(code: pl.Expr) -> pl.Expr:
    """``vocabulary_id/concept_code`` (the converter's spelling) -> ``vocabulary_id//concept_code``, with the
    demographic vocabularies upper-cased (``GENDER//F``); MEDS_BIRTH and MEDS_DEATH unchanged."""
    vocabulary = code.str.split_exact("/", 1).struct.field("field_0")
    rest = code.str.splitn("/", 2).struct.field("field_1")
    spelled = pl.coalesce(vocabulary.replace_strict(DEMOGRAPHIC_VOCABULARIES, default=vocabulary)) + "//" + rest
    return pl.when(code.is_in([BIRTH_CODE, DEATH_CODE]) | ~code.str.contains("/", literal=True)).then(code) \
        .otherwise(spelled)


def _plain_strings(table: pa.Table) -> pa.Table:
    """Arrow ``string`` where polars gives ``large_string`` (the MEDS schema asks for ``string``)."""
    fields = [pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields))


def _person_ids(omop_dir: Path) -> pl.DataFrame:
    frame = read_table(table_files(omop_dir, "person"))
    return frame.select(pl.col("person_id").cast(pl.Int64, strict=False).alias("subject_id")).unique()


def _splits(ids: np.ndarray, seed: int, fractions: tuple[float, float, float]) -> pa.Table:
    """train/tuning/held_out per subject: a seeded permutation cut at the fractions."""
    order = np.random.default_rng(seed).permutation(len(ids))
    cut1 = int(round(fractions[0] * len(ids)))
    cut2 = cut1 + int(round(fractions[1] * len(ids)))
    names = np.empty(len(ids), dtype=object)
    names[order[:cut1]], names[order[cut1:cut2]], names[order[cut2:]] = (
        meds.train_split, meds.tuning_split, meds.held_out_split)
    return pa.table({"subject_id": pa.array(ids, pa.int64()), "split": pa.array(names.tolist(), pa.string())})


def _codes(data: Path, concept: pl.DataFrame) -> pa.Table:
    """Every code of the data with its concept name (the converter's own codes.parquet holds custom ones only)."""
    codes = pl.scan_parquet(data / "*.parquet").select("code").unique().collect()
    names = concept.select(_meds_code(pl.col("vocabulary_id") + "/" + pl.col("concept_code")).alias("code"),
                           pl.col("concept_name").alias("description")).unique("code", keep="first")
    fixed = pl.DataFrame({"code": [BIRTH_CODE, DEATH_CODE], "description": ["Birth", "Death"]})
    table = codes.join(pl.concat([names, fixed]), on="code", how="left").sort("code")
    table = table.with_columns(parent_codes=pl.lit([], dtype=pl.List(pl.String)))
    arrow = _plain_strings(table.to_arrow()).cast(pa.schema([("code", pa.string()), ("description", pa.string()),
                                             ("parent_codes", pa.list_(pa.string()))]))
    meds.CodeMetadataSchema.validate(arrow)
    return arrow


def _version() -> str:
    from nextvisit import __version__

    return __version__


def _write_summary(path: Path, summary: dict) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def _summary_table(summary: dict) -> str:
    lines = [f"{'table':<22}{'rows in':>10}{'events out':>12}  dropped (field: reason rows)"]
    for t in summary["tables"]:
        drops = "; ".join(f"{f}: {reason} {n:,}" for f, reasons in t["dropped"].items() for reason, n in reasons.items())
        lines.append(f"{t['table']:<22}{t['rows']:>10,}{t['events']:>12,}  {drops}")
    lines.append(f"{summary['rows_in']:,} rows in, {summary['events_out']:,} MEDS events out "
                 f"({summary['dropped_no_time']:,} events without a date dropped); {summary['subjects']:,} subjects "
                 f"of {summary['persons']:,} persons ({summary['persons_without_events']:,} without any event); "
                 f"splits {summary['splits']}; {summary['concepts']} concepts; {summary.get('seconds', 0)} s")
    return "\n".join(lines)


def run_cli(args) -> int:
    fractions = tuple(args.split_fractions) if args.split_fractions else SPLIT_FRACTIONS
    options = OmopOptions(concepts=args.concepts, converter=args.converter, split_seed=args.split_seed,
                          split_fractions=fractions, shards=args.shards, workers=args.workers,
                          tables=tuple(args.tables.split(",")) if args.tables else None)
    convert_omop(args.omop_dir, args.out, options, overwrite=args.overwrite)
    return 0


__all__ = ["convert_omop", "OmopOptions", "TABLES", "find_converter", "CONVERSION_FILE", "run_cli"]
