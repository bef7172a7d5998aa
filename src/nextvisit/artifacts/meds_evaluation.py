"""A predictions folder as files `meds-evaluation` accepts: one parquet per (task, horizon, split).

`meds-evaluation` (``meds-evaluation-cli predictions_path=FILE output_file=RESULTS.json``) scores one
parquet file as one binary task, all its rows together, and validates it against its ``PredictionSchema``
(a MEDS label schema), which allows no extra column. Our predictions file (docs/interfaces.md §6) holds
several tasks, horizons and splits and extra columns, so ``export`` writes one file per (task, horizon,
split). It needs only polars: `meds-evaluation` is needed to score the files, not to write them.

On disk, ``OUT/`` (docs/interfaces.md §6, "Export for meds-evaluation"):

- ``<task>/<horizon_days>d/<split>.parquet``: the labelled, scored rows of that task, horizon and split,
  sorted by subject and prediction time, with exactly the columns of ``MEDS_EVALUATION_SCHEMA``:
  ``subject_id`` int64, ``prediction_time`` timestamp[us], ``boolean_value`` bool (never null),
  ``predicted_boolean_value`` bool, all null (our models give risks, not decisions; meds-evaluation
  reads the column even when it computes only the probability metrics, and skips its accuracy and F1
  when the column is all null), ``predicted_boolean_probability`` float32 (its dtype: our float64 risks
  are rounded, and ``probability_ties_from_float32`` counts the distinct risks the rounding merges).
- ``manifest.json``: the source file, model and kind; the exported splits; the columns and their arrow
  types; per file its path, task, horizon, split, rows written, positives, rows skipped per reason and the
  float32 ties; the (task, horizon, split) groups not written and why; the rows of other splits that were
  not exported; warnings; and the command that scores a file.

Rules, in order:

1. The input is one predictions file (a folder holding one, or the file); it is read and checked by
   ``read_predictions``, which groups it by (task, horizon).
2. Refused with a ``UserError`` naming the file and column: a missing column (``boolean_value`` and
   ``prediction_time`` too); a column that cannot be cast to its dtype; a null ``subject_id`` or
   ``prediction_time`` in an exported split (the schema forbids nulls there); a probability outside
   [0, 1] (meds-evaluation computes the Brier score and a calibration curve, which need probabilities);
   a requested split with no row in the file; a task or split name that is not a plain file name.
3. Only the requested splits are exported (default ``held_out``; meds-evaluation would pool the rows of
   several splits into one result); the rows of the other splits are counted in ``rows_not_exported``.
4. A row of an exported split that meds-evaluation cannot score is skipped and counted by reason
   (``SKIP_REASONS``), never dropped silently.
5. A (task, horizon, split) with no row left is not written and is listed in ``not_written``; a file whose
   rows are of one class is written, with a warning (AUROC is undefined there).

Every file and the manifest are written together through ``nextvisit.artifacts.folders.atomic_folder``:
``OUT`` holds all of them or is left as it was.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import meds
import polars as pl

from nextvisit.artifacts.folders import atomic_folder, check_out
from nextvisit.artifacts.predictions import LABEL, PROBABILITY, find_prediction_files, read_predictions
from nextvisit.errors import UserError

MANIFEST_FILE = "manifest.json"
PREDICTED_VALUE = "predicted_boolean_value"  # meds-evaluation's name for a predicted decision
# meds_evaluation.schema.PredictionSchema, column by column (tests/test_meds_evaluation.py checks it
# against the installed package). Its label columns other than boolean_value are optional and left out.
MEDS_EVALUATION_SCHEMA = {
    "subject_id": pl.Int64,
    "prediction_time": pl.Datetime("us"),
    LABEL: pl.Boolean,
    PREDICTED_VALUE: pl.Boolean,
    PROBABILITY: pl.Float32,
}
# MEDS-DEV scores a model's predictions with its own pinned meds-evaluation (0.0.3 in MEDS-DEV's pyproject.toml), whose
# check wants the probability as float64; meds-evaluation 0.0.6 casts it on read (``PredictionSchema.align``), so
# float64 is the dtype both accept (its strict ``PredictionSchema.validate`` alone wants float32).
MEDS_DEV_PROBABILITY = pl.Float64
NON_NULL = ("subject_id", "prediction_time")  # the schema forbids nulls; a null here is a broken file
SKIP_REASONS = {
    # boolean_value is null (censored before the horizon, or never labelled); the schema forbids a null label.
    "unlabelled": LABEL,
    # the model gave no risk (null or NaN); meds-evaluation's metrics cannot rank or score the row.
    "missing_score": PROBABILITY,
}
DEFAULT_SPLITS = (meds.held_out_split,)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a task or split name that is safe as a path part
_EVALUATE_COMMAND = "meds-evaluation-cli predictions_path={file} output_file={results}"


def export(predictions: Path, out: Path, splits=DEFAULT_SPLITS, overwrite: bool = False) -> dict:
    """Write ``out/<task>/<horizon_days>d/<split>.parquet`` for every (task, horizon) of the predictions
    file at ``predictions`` and every split of ``splits``, and ``out/manifest.json``; return the manifest."""
    out = Path(out)
    splits = tuple(dict.fromkeys(splits))  # each split once, in the given order
    file = _one_file(Path(predictions))
    if file.resolve().is_relative_to(out.resolve()):
        raise UserError(f"{out}: holds the predictions it would export ({file}), and writing it would remove "
                        "them; choose another --out")
    check_out(out, overwrite)
    for split in splits:
        _check_plain_name(file, "split", split)
    warnings: list[str] = []
    groups = read_predictions(file, warnings)
    if not groups:
        raise UserError(f"{file}: no rows to export")
    missing = [c for c in MEDS_EVALUATION_SCHEMA if c != PREDICTED_VALUE and c not in groups[0].frame.columns]
    if missing:
        raise UserError(f"{file}: missing column(s) {missing}, which meds-evaluation requires; predictions "
                        "need the label columns of docs/interfaces.md §6")
    present = sorted({s for g in groups for s in g.frame["split"].drop_nulls().unique().to_list()})
    absent = [s for s in splits if s not in present]
    if absent:
        raise UserError(f"{file}: no rows in split(s) {absent}; the file holds {present}; pass --split with "
                        "one of them")

    written: list[tuple[str, pl.DataFrame]] = []
    manifest = {
        "format": "meds-evaluation PredictionSchema (meds_evaluation.schema): one binary task per file",
        "source": str(file), "model": groups[0].name, "kind": groups[0].kind, "splits": list(splits),
        "columns": {f.name: str(f.type) for f in pl.DataFrame(schema=MEDS_EVALUATION_SCHEMA).to_arrow().schema},
        "files": [], "not_written": [], "rows_skipped": dict.fromkeys(SKIP_REASONS, 0), "rows_not_exported": {},
        "warnings": warnings,
    }
    for group in groups:
        _check_plain_name(file, "task", group.task)
        frame = _typed(file, group.frame)
        other = frame.filter(~pl.col("split").is_in(splits) | pl.col("split").is_null())
        for split, count in other["split"].fill_null("null").value_counts().iter_rows():
            manifest["rows_not_exported"][split] = manifest["rows_not_exported"].get(split, 0) + count
        for split in splits:
            where = f"{group.task}, {group.horizon_days} days, split {split}"
            rows, entry = meds_evaluation_rows(file, frame.filter(pl.col("split") == split), where)
            for reason, count in entry["rows_skipped"].items():
                manifest["rows_skipped"][reason] += count
            key = {"task": group.task, "horizon_days": group.horizon_days, "split": split}
            if rows.height == 0:
                skipped = ", ".join(f"{n} {reason}" for reason, n in entry["rows_skipped"].items() if n)
                reason = f"every row skipped ({skipped})" if skipped else "no row in this split"
                manifest["not_written"].append({**key, "reason": reason})
                warnings.append(f"{file} ({where}): not written: {reason}")
                continue
            if entry["positives"] in (0, rows.height):
                warnings.append(f"{file} ({where}): all {rows.height} rows are of one class; meds-evaluation's "
                                "AUROC and average precision are undefined there")
            path = f"{group.task}/{group.horizon_days}d/{split}.parquet"
            manifest["files"].append({"path": path, **key, **entry})
            written.append((path, rows))
    if not written:
        raise UserError(f"{file}: no row of split(s) {list(splits)} can be exported; see the reasons: "
                        + "; ".join(warnings))
    first = manifest["files"][0]["path"]
    results = "results/" + first.removesuffix(".parquet").replace("/", "_") + ".json"
    manifest["evaluate"] = _EVALUATE_COMMAND.format(file=out / first, results=results)

    with atomic_folder(out, overwrite) as staging:
        for path, rows in written:
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            rows.write_parquet(staging / path)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _one_file(predictions: Path) -> Path:
    files = find_prediction_files(predictions)
    if len(files) > 1:
        shown = ", ".join(str(f.parent) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise UserError(f"{predictions}: holds {len(files)} predictions folders ({shown}); export one model's "
                        "predictions folder at a time")
    return files[0]


def _check_plain_name(file: Path, what: str, name: str) -> None:
    if not _PLAIN_NAME.fullmatch(name):
        raise UserError(f"{file}: {what} {name!r} cannot name an output file; use letters, digits, '_', '.' "
                        "and '-' only")


def _typed(file: Path, frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the schema's columns cast to its dtypes (the risk stays float64 until it is written)."""
    targets = {**MEDS_EVALUATION_SCHEMA, PROBABILITY: pl.Float64}
    for column in ("subject_id", "prediction_time", LABEL, PROBABILITY):
        try:
            frame = frame.with_columns(pl.col(column).cast(targets[column]))
        except pl.exceptions.PolarsError:
            raise UserError(f"{file}: column {column} has type {frame.schema[column]}, expected "
                            f"{targets[column]} (meds-evaluation's schema); rewrite the predictions "
                            "(docs/interfaces.md §6)") from None
    return frame


def meds_evaluation_rows(file: Path, part: pl.DataFrame, where: str,
                         probability_dtype=MEDS_EVALUATION_SCHEMA[PROBABILITY]) -> tuple[pl.DataFrame, dict]:
    """The rows of one (task, horizon, split) in meds-evaluation's schema, and their manifest entry; ``part``
    holds the schema's columns but ``predicted_boolean_value``, in its dtypes (``_typed``). ``probability_dtype``:
    float32 (the installed meds-evaluation's schema) or ``MEDS_DEV_PROBABILITY`` (what MEDS-DEV's pinned one
    reads)."""
    for column in NON_NULL:
        nulls = part[column].null_count()
        if nulls:
            raise UserError(f"{file}: column {column} is null in {nulls} row(s) ({where}); meds-evaluation's "
                            "schema forbids nulls there; rewrite the predictions")
    risk = pl.col(PROBABILITY)
    unlabelled = pl.col(LABEL).is_null()
    missing_score = ~unlabelled & (risk.is_null() | risk.is_nan())
    skipped = {"unlabelled": part.filter(unlabelled).height, "missing_score": part.filter(missing_score).height}
    kept = part.filter(~unlabelled & ~missing_score)
    outside = kept.filter((risk < 0) | (risk > 1))
    if outside.height:
        example = outside.row(0, named=True)
        raise UserError(f"{file}: column {PROBABILITY} holds {outside.height} value(s) outside [0, 1] ({where}; "
                        f"e.g. {example[PROBABILITY]} for subject {example['subject_id']}); meds-evaluation computes "
                        "the Brier score and a calibration curve from it, which need probabilities: export a "
                        "model that writes probabilities")
    rows = kept.sort("subject_id", "prediction_time").select(
        pl.col("subject_id"), pl.col("prediction_time"), pl.col(LABEL),
        pl.lit(None, dtype=pl.Boolean).alias(PREDICTED_VALUE), risk.cast(probability_dtype),
    )
    assert rows.schema == pl.Schema({**MEDS_EVALUATION_SCHEMA, PROBABILITY: probability_dtype}), rows.schema
    entry = {
        "rows": rows.height, "positives": int(rows[LABEL].sum()), "rows_skipped": skipped,
        "probability_ties_from_float32": kept[PROBABILITY].n_unique() - rows[PROBABILITY].n_unique(),
    }
    return rows, entry


def run_cli(args) -> int:
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits:
        raise UserError(f"--split {args.split!r}: name at least one split (e.g. held_out)")
    manifest = export(args.predictions, args.out, splits=splits, overwrite=args.overwrite)
    for warning in manifest["warnings"]:
        sys.stderr.write(f"warning: {warning}\n")
    for entry in manifest["files"]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in entry["rows_skipped"].items())
        sys.stdout.write(f"{Path(args.out) / entry['path']}: {entry['rows']} rows ({entry['positives']} positive); "
                         f"skipped {skipped}\n")
    sys.stdout.write(f"Manifest: {Path(args.out) / MANIFEST_FILE}\nScore a file with: {manifest['evaluate']}\n")
    return 0
