"""MEDS validation at the edge: every bad input gives a one-line error naming the file, column and row, or a
counted exclusion in the manifest; never a traceback or a silent drop."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from nextvisit.data import meds
from nextvisit.cli import main
from nextvisit.errors import UserError
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.dataset import tokenize_dataset

SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}


def frame(rows, schema=SCHEMA) -> pl.DataFrame:
    return pl.DataFrame(
        [(s, None if t is None else dt.datetime.fromisoformat(t), c, v) for s, t, c, v in rows],
        schema=list(schema.items()), orient="row",
    )


GOOD = [
    (1, None, "GENDER//F", None), (1, "1960-01-01", "MEDS_BIRTH", None), (1, "2020-01-01", "A", None),
    (1, "2020-02-01", "A", 1.0), (2, "1970-01-01", "MEDS_BIRTH", None), (2, "2021-01-01", "A", 2.0),
]


def dataset(root: Path, data: pl.DataFrame | None = None, splits: dict | None = None, raw: bytes | None = None) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "metadata").mkdir(parents=True)
    if raw is not None:
        (root / "data" / "0.parquet").write_bytes(raw)
    else:
        (frame(GOOD) if data is None else data).write_parquet(root / "data" / "0.parquet")
    splits = splits or {1: "train", 2: "train"}
    pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())},
                 schema={"subject_id": pl.Int64, "split": pl.String}).write_parquet(root / "metadata" / "subject_splits.parquet")
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "t"}))
    return root


def tokenize(root: Path, tmp_path: Path, **config):
    return tokenize_dataset(root, tmp_path / "store", TokenizerConfig(**{"min_count": 1, **config}), workers=1,
                            progress=False)


def test_good_dataset_passes(tmp_path):
    manifest = tokenize(dataset(tmp_path / "m"), tmp_path)
    assert manifest["splits"]["train"]["subjects_out"] == 2


def test_not_a_meds_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        tokenize(tmp_path / "absent", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a MEDS dataset"):
        tokenize(tmp_path / "empty", tmp_path)


def test_missing_column_names_file_and_column(tmp_path):
    root = dataset(tmp_path / "m", frame(GOOD).drop("numeric_value"))
    with pytest.raises(UserError, match=r"0\.parquet: column 'numeric_value' is missing"):
        tokenize(root, tmp_path)


def test_wrong_dtype_names_file_column_and_type(tmp_path):
    data = frame(GOOD).with_columns(pl.col("code").cast(pl.Categorical).to_physical().cast(pl.Int64))
    with pytest.raises(UserError, match=r"0\.parquet: column 'code' has type int64, expected string"):
        tokenize(dataset(tmp_path / "a", data), tmp_path)
    data = frame(GOOD).with_columns(pl.col("time").dt.strftime("%Y-%m-%d"))
    with pytest.raises(UserError, match=r"column 'time' has type .*string.*, expected timestamp\[us\]"):
        tokenize(dataset(tmp_path / "b", data), tmp_path)


def test_other_integer_and_float_widths_are_accepted(tmp_path):
    data = frame(GOOD).with_columns(pl.col("subject_id").cast(pl.Int32), pl.col("numeric_value").cast(pl.Float64),
                                    pl.col("time").dt.cast_time_unit("ms"))
    assert tokenize(dataset(tmp_path / "m", data), tmp_path)["splits"]["train"]["balance_gap"] == 0


def test_unsorted_subjects_name_the_row(tmp_path):
    rows = [GOOD[4], GOOD[5], *GOOD[:4]]
    with pytest.raises(UserError, match=r"not sorted by subject_id: row 2 \(subject 1\)"):
        tokenize(dataset(tmp_path / "m", frame(rows)), tmp_path)


def test_unsorted_times_name_the_row(tmp_path):
    rows = [GOOD[0], GOOD[1], GOOD[3], GOOD[2], GOOD[4], GOOD[5]]
    with pytest.raises(UserError, match=r"not sorted by time within subject 1: row 3"):
        tokenize(dataset(tmp_path / "m", frame(rows)), tmp_path)


def test_static_rows_may_sit_anywhere_within_a_subject(tmp_path):
    rows = [GOOD[1], GOOD[2], GOOD[0], GOOD[3], GOOD[4], GOOD[5]]  # as in the MIMIC-IV demo
    assert tokenize(dataset(tmp_path / "m", frame(rows)), tmp_path)["splits"]["train"]["visits"] == 3


@pytest.mark.parametrize("column,row", [("code", 2), ("subject_id", 3)])
def test_null_subject_or_code_names_the_row(tmp_path, column, row):
    rows = [list(r) for r in GOOD]
    rows[row][0 if column == "subject_id" else 2] = None
    with pytest.raises(UserError, match=rf"column '{column}' is null at row {row}"):
        tokenize(dataset(tmp_path / "m", frame([tuple(r) for r in rows])), tmp_path)


def test_empty_dataset(tmp_path):
    with pytest.raises(UserError, match="the dataset is empty"):
        tokenize(dataset(tmp_path / "m", frame([])), tmp_path)


def test_corrupt_parquet_names_the_file(tmp_path):
    with pytest.raises(UserError, match=r"0\.parquet: not a readable parquet file"):
        tokenize(dataset(tmp_path / "a", raw=b"this is not parquet at all"), tmp_path)
    good = tmp_path / "good.parquet"
    frame(GOOD * 50).write_parquet(good)
    damaged = good.read_bytes()
    damaged = damaged[:100] + b"\x00" * 200 + damaged[300:]  # footer intact, pages damaged
    with pytest.raises(UserError, match=r"0\.parquet: (damaged|not a readable)"):
        tokenize(dataset(tmp_path / "b", raw=damaged), tmp_path)


def test_subject_without_events_is_counted(tmp_path):
    manifest = tokenize(dataset(tmp_path / "m", splits={1: "train", 2: "train", 3: "held_out"}), tmp_path)
    assert manifest["splits"]["held_out"]["subjects_without_events"] == 1


def test_future_times_stop_or_are_counted(tmp_path):
    rows = GOOD + [(2, "2999-01-01", "A", None)]
    root = dataset(tmp_path / "m", frame(rows))
    with pytest.raises(UserError, match=r"row 6 \(subject 2\) has time 2999-01-01.*max_time"):
        tokenize(root, tmp_path, max_time="now")
    manifest = tokenize(root, tmp_path, max_time="2030-01-01", future_events="drop")
    assert manifest["splits"]["train"]["dropped"]["after_max_time"] == 1


def test_bad_splits_file(tmp_path):
    with pytest.raises(UserError, match="'validation' .* is not one of train, tuning, held_out"):
        tokenize(dataset(tmp_path / "a", splits={1: "train", 2: "validation"}), tmp_path)
    root = dataset(tmp_path / "b")
    (root / "metadata" / "subject_splits.parquet").unlink()
    with pytest.raises(UserError, match="subject_splits.parquet: missing"):
        tokenize(root, tmp_path)


def test_subject_split_across_shards_is_refused(tmp_path):
    root = dataset(tmp_path / "m")
    frame(GOOD[:3]).write_parquet(root / "data" / "0.parquet")
    frame(GOOD[3:]).write_parquet(root / "data" / "1.parquet")
    with pytest.raises(UserError, match="subject 1 .* more than one data shard"):
        tokenize(root, tmp_path)


def test_config_typos_are_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("tokenizer:\n  min_cout: 3\n")
    with pytest.raises(UserError, match="unknown field 'min_cout'"):
        TokenizerConfig.load(tmp_path / "c.yaml")
    with pytest.raises(UserError, match="lab_binning"):
        TokenizerConfig(lab_binning="deciles").validate()


def test_cli_bad_input_is_one_line_without_traceback(tmp_path, capsys):
    root = dataset(tmp_path / "m", frame(GOOD).drop("code"))
    assert main(["tokenize", str(root), "--out", str(tmp_path / "store"), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "column 'code' is missing" in err and "Traceback" not in err
    assert not (tmp_path / "store").exists()  # nothing half-written


def test_in_memory_frames_are_normalized():
    data = frame(GOOD).with_columns(pl.col("time").dt.replace_time_zone("Europe/Paris")).drop("numeric_value")
    normalized = meds.normalize_events(data, "events")
    assert normalized.schema == pl.Schema(SCHEMA)
    assert normalized["time"][2] == dt.datetime(2019, 12, 31, 23, 0)  # converted to UTC
    with pytest.raises(UserError, match="events: column 'code' has dtype Int32, expected string"):
        meds.normalize_events(data.with_columns(code=pl.lit(1)), "events")


def test_cli_refuses_a_file_as_out_even_with_overwrite_and_reports_subjects_without_events(tmp_path, capsys):
    root = dataset(tmp_path / "m", splits={1: "train", 2: "train", 3: "held_out"})
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main(["tokenize", str(root), "--out", str(blocker), "--workers", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err and "Traceback" not in err
    assert blocker.read_text() == "mine"
    assert main(["tokenize", str(root), "--out", str(tmp_path / "store"), "--workers", "1",
                 "--config", str(_min_count_one(tmp_path))]) == 0
    assert "subjects in subject_splits.parquet without any event: 1" in capsys.readouterr().out


def _min_count_one(tmp_path: Path) -> Path:
    path = tmp_path / "min_count.yaml"
    path.write_text("tokenizer:\n  min_count: 1\n")
    return path
