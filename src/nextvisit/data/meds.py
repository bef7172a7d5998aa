"""Reading MEDS datasets (v0.4). Validation at the edge lives here too, so the rest of the code can trust
typed data: every error names the file, the column, the row and the fix."""

from __future__ import annotations

from pathlib import Path

import meds
import polars as pl

from nextvisit.errors import UserError

BIRTH_CODE = meds.birth_code  # "MEDS_BIRTH"
DEATH_CODE = meds.death_code  # "MEDS_DEATH"
SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)


def data_files(meds_dir: Path) -> list[Path]:
    """The dataset's data shards (``data/**/*.parquet``), sorted; a clear error when there are none, or when
    a shard is unreadable or lacks a MEDS core column (``check_shard_schema``: footers only, cheap)."""
    meds_dir = Path(meds_dir)
    if not meds_dir.is_dir():
        raise UserError(f"{meds_dir}: no such folder; expected a MEDS dataset with data/ and metadata/")
    files = sorted((meds_dir / "data").rglob("*.parquet"))
    if not files:
        raise UserError(f"{meds_dir}: not a MEDS dataset (no data/*.parquet shards found)")
    for path in files:
        check_shard_schema(path)
    return files


def read_splits(meds_dir: Path) -> pl.DataFrame:
    """``subject_id, split`` from ``metadata/subject_splits.parquet``."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
    if not path.exists():
        raise UserError(f"{path}: missing; a MEDS dataset needs subject splits: write it with columns subject_id, "
                        "split (train, tuning or held_out)")
    return pl.read_parquet(path, columns=["subject_id", "split"])


# -- validation at the edge ---------------------------------------------------------------------------------
# The MEDS core columns and what each may hold. Integer widths and float widths other than the standard
# ones are accepted and cast; anything else is an error that names the file and the column.
CORE_COLUMNS = ("subject_id", "time", "code", "numeric_value")


def _arrow_kind(arrow_type) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        return _arrow_kind(arrow_type.value_type)
    if pa.types.is_integer(arrow_type):
        return "integer"
    if pa.types.is_floating(arrow_type):
        return "float"
    if pa.types.is_timestamp(arrow_type) or pa.types.is_date(arrow_type):
        return "time"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return "string"
    if pa.types.is_null(arrow_type):
        return "null"
    return str(arrow_type)


_ALLOWED_KINDS = {
    "subject_id": ("integer",),
    "time": ("time", "null"),
    "code": ("string",),
    "numeric_value": ("float", "integer", "null"),
}
_EXPECTED = {"subject_id": "int64", "time": "timestamp[us]", "code": "string", "numeric_value": "float32"}


def check_shard_schema(path: Path) -> int:
    """Check one data shard's footer: readable parquet, the MEDS core columns with usable types.
    Returns its row count. Reads only the footer, so it is cheap for any shard size."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}); "
                        "re-export this shard") from None
    names = set(schema.names)
    for column in CORE_COLUMNS:
        if column not in names:
            raise UserError(f"{path}: column {column!r} is missing (found {', '.join(schema.names)}); "
                            f"a MEDS shard needs {', '.join(CORE_COLUMNS)}")
        kind = _arrow_kind(schema.field(column).type)
        if kind not in _ALLOWED_KINDS[column]:
            raise UserError(f"{path}: column {column!r} has type {schema.field(column).type}, expected "
                            f"{_EXPECTED[column]}; convert the column to that type")
        zone = getattr(schema.field(column).type, "tz", None)
        if column == "time" and zone:
            # Visits are calendar days of the wall-clock times: converting to UTC would move events across days.
            raise UserError(f"{path}: column 'time' has time zone {zone}; MEDS times carry no time zone: drop it and "
                            "keep the wall-clock times (polars: .dt.replace_time_zone(None)), or convert them to the "
                            "zone the records were made in first")
    return metadata.num_rows


def normalize_events(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """The MEDS core columns with their standard dtypes (``subject_id`` int64, ``time`` datetime[us]
    without a time zone (UTC), ``code`` string, ``numeric_value`` float32). A missing ``numeric_value`` is
    added as nulls only for in-memory frames (files are checked by ``check_shard_schema``)."""
    missing = [c for c in ("subject_id", "time", "code") if c not in frame.columns]
    if missing:
        raise UserError(f"{source}: column(s) {', '.join(missing)} missing; expected {', '.join(CORE_COLUMNS)}")
    if "numeric_value" not in frame.columns:
        frame = frame.with_columns(numeric_value=pl.lit(None, dtype=pl.Float32))
    schema = frame.schema
    time_type = schema["time"]
    if time_type == pl.Date:
        time_expr = pl.col("time").cast(pl.Datetime("us"))
    elif isinstance(time_type, pl.Datetime):
        time_expr = pl.col("time")
        if time_type.time_zone is not None:
            time_expr = time_expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        time_expr = time_expr.dt.cast_time_unit("us")
    elif time_type == pl.Null:
        time_expr = pl.col("time").cast(pl.Datetime("us"))
    else:
        raise UserError(f"{source}: column 'time' has dtype {time_type}, expected datetime[us]")
    if not (schema["subject_id"].is_integer()):
        raise UserError(f"{source}: column 'subject_id' has dtype {schema['subject_id']}, expected int64")
    if schema["code"] not in (pl.String, pl.Categorical) and not isinstance(schema["code"], (pl.Categorical, pl.Enum)):
        raise UserError(f"{source}: column 'code' has dtype {schema['code']}, expected string")
    value_type = schema["numeric_value"]
    if not (value_type.is_numeric() or value_type == pl.Null):
        raise UserError(f"{source}: column 'numeric_value' has dtype {value_type}, expected float32")
    return frame.select(
        pl.col("subject_id").cast(pl.Int64),
        time_expr.alias("time"),
        pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float32),
    )


def check_events(frame: pl.DataFrame, source: str, row_offset: int = 0, require_sorted: bool = True) -> None:
    """Rows a MEDS reader cannot trust: a null ``subject_id`` or ``code``, or (``require_sorted``) rows not
    sorted by ``subject_id`` then ``time`` (static rows, with a null time, may sit anywhere within their
    subject). The error names the source, the column and the row (0-based, counting from ``row_offset``)."""
    for column in ("subject_id", "code"):
        nulls = frame.get_column(column).is_null()
        if nulls.any():
            row = int(nulls.arg_true()[0]) + row_offset
            raise UserError(f"{source}: column {column!r} is null at row {row}; every MEDS event needs a "
                            f"{column} (drop or repair those rows)")
    if not require_sorted or frame.height < 2:
        return
    subject = frame.get_column("subject_id")
    backwards = subject.diff() < 0
    if backwards.any():
        row = int(backwards.arg_true()[0]) + row_offset
        raise UserError(f"{source}: rows are not sorted by subject_id: row {row} (subject {subject[row - row_offset]}) "
                        f"comes after subject {subject[row - row_offset - 1]}; sort each shard by subject_id, time")
    timed = frame.select(pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), "subject_id", "time").filter(
        pl.col("time").is_not_null()
    )
    unsorted = timed.filter((pl.col("time").diff() < 0) & (pl.col("subject_id").diff() == 0))
    if unsorted.height:
        row, subject_id, time = unsorted.row(0)
        raise UserError(f"{source}: rows are not sorted by time within subject {subject_id}: row "
                        f"{row + row_offset} ({time}) is earlier than the row before it; sort each shard by "
                        "subject_id, time")


def read_splits_checked(meds_dir: Path) -> pl.DataFrame:
    """``read_splits`` plus checks: the columns, known split names, one split per subject."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
    try:
        splits = read_splits(meds_dir)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc}); it needs columns subject_id, split") from None
    if splits.get_column("subject_id").null_count() or splits.get_column("split").null_count():
        raise UserError(f"{path}: null subject_id or split; every subject needs exactly one split")
    splits = splits.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
    unknown = splits.filter(~pl.col("split").is_in(SPLITS))
    if unknown.height:
        raise UserError(f"{path}: split {unknown['split'][0]!r} (subject {unknown['subject_id'][0]}) is not one of "
                        f"{', '.join(SPLITS)}; rename it")
    duplicated = splits.filter(pl.col("subject_id").is_duplicated())
    if duplicated.height:
        raise UserError(f"{path}: subject {duplicated['subject_id'][0]} is listed in more than one row; "
                        "keep one row per subject (each subject belongs to exactly one split)")
    return splits


def read_code_descriptions(meds_dir: Path) -> pl.DataFrame:
    """``code, description`` from ``metadata/codes.parquet``; an empty frame when the dataset has none
    (descriptions are optional in MEDS)."""
    path = Path(meds_dir) / "metadata" / "codes.parquet"
    empty = pl.DataFrame(schema={"code": pl.String, "description": pl.String})
    if not path.exists():
        return empty
    try:
        codes = pl.read_parquet(path)
    except Exception as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc}); repair or remove it") from None
    if "code" not in codes.columns or "description" not in codes.columns:
        return empty
    return (
        codes.select(pl.col("code").cast(pl.String), pl.col("description").cast(pl.String))
        .filter(pl.col("code").is_not_null() & pl.col("description").is_not_null())
        .unique("code", keep="first", maintain_order=True)
    )


# -- MEDS label files ----------------------------------------------------------------------------------------
# The columns of the MEDS label schema (``meds.LabelSchema``) that a binary task uses; its other value columns
# (integer_value, float_value, categorical_value) are not read.
LABEL_COLUMNS = {"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}


def read_label_files(labels_dir: Path) -> tuple[pl.DataFrame, list[dict]]:
    """Label rows of every ``*.parquet`` under ``labels_dir`` (any depth, as ACES and MEDS-DEV write them,
    e.g. ``train/0.parquet``), in the MEDS label schema: ``subject_id, prediction_time, boolean_value`` (null:
    no binary label), file by file in path order; and per file ``{"path", "rows"}``. A missing file or column,
    a column of another type, or a null ``subject_id`` or ``prediction_time`` is an error naming the file."""
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise UserError(f"{labels_dir}: no such folder; expected MEDS label files (*.parquet)")
    files = sorted(labels_dir.rglob("*.parquet"))
    if not files:
        raise UserError(f"{labels_dir}: no *.parquet label files in it or its subfolders")
    frames, read = [], []
    for path in files:
        try:
            frame = pl.read_parquet(path)
        except Exception as exc:
            raise UserError(f"{path}: unreadable ({type(exc).__name__}); MEDS label files are parquet") from None
        missing = [c for c in LABEL_COLUMNS if c not in frame.columns]
        if missing:
            raise UserError(f"{path}: column(s) {missing} missing; MEDS label files need "
                            f"{', '.join(LABEL_COLUMNS)}")
        try:
            frame = frame.select(pl.col(c).cast(dtype, strict=True) for c, dtype in LABEL_COLUMNS.items())
        except pl.exceptions.PolarsError:
            found = {c: str(frame.schema[c]) for c in LABEL_COLUMNS}
            raise UserError(f"{path}: columns have types {found}; the MEDS label schema wants int64, "
                            "timestamp[us] and bool") from None
        for column in ("subject_id", "prediction_time"):
            nulls = frame[column].null_count()
            if nulls:
                raise UserError(f"{path}: {nulls} row(s) with a null {column}; every label row needs one")
        frames.append(frame)
        read.append({"path": str(path), "rows": frame.height})
    return pl.concat(frames), read
