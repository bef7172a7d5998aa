"""Reading MEDS datasets (v0.4). Validation at the edge lives here too, so the rest of the code can trust
typed data: every error names the file, the column, the row and the fix."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from nextvisit.errors import UserError

BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"


def data_files(meds_dir: Path) -> list[Path]:
    """The dataset's data shards (``data/**/*.parquet``), sorted; a clear error when there are none."""
    meds_dir = Path(meds_dir)
    if not meds_dir.is_dir():
        raise UserError(f"{meds_dir}: no such folder; expected a MEDS dataset with data/ and metadata/")
    files = sorted((meds_dir / "data").rglob("*.parquet"))
    if not files:
        raise UserError(f"{meds_dir}: not a MEDS dataset (no data/*.parquet shards found)")
    return files


def read_splits(meds_dir: Path) -> pl.DataFrame:
    """``subject_id, split`` from ``metadata/subject_splits.parquet``."""
    path = Path(meds_dir) / "metadata" / "subject_splits.parquet"
    if not path.exists():
        raise UserError(f"{path}: missing; a MEDS dataset needs subject splits (train/tuning/held_out)")
    return pl.read_parquet(path, columns=["subject_id", "split"])


def scan_events(meds_dir: Path) -> pl.LazyFrame:
    """All data shards as one lazy frame with the MEDS core columns."""
    return pl.scan_parquet(data_files(meds_dir)).select("subject_id", "time", "code", "numeric_value")
