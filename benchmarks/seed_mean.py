"""The mean over pretraining seeds of zero-shot forecasts, in the quality benchmark's table.

One pretraining run moves a knee OA cell of the quality benchmark by up to about 0.02-0.04 (docs/model.md, "A
12-minute budget, and how much one pretraining run decides"); the subject-level intervals do not cover that. This
script averages the logits of several runs' forecasts of the same rows (each run is a `nextvisit forecast` output
folder, e.g. the benchmark's ``forecast_<variant>_<task>-<hash>/out``) and prints the benchmark's table with the
mean beside each single run and the other models, on the same resampled subjects:

    .venv/bin/python -m benchmarks.seed_mean --out W/seed_mean \\
        --mean W/forecast_nextvisit_dementia-*/out W/forecast_seed_1_dementia-*/out \\
        --mean W/forecast_nextvisit_knee_oa-*/out W/forecast_seed_1_knee_oa-*/out \\
        --model fine-tuned:masked=W/masked_finetune_dementia-*/out ... --json seed_mean.json

Each ``--mean`` is one task's runs, in the same order for every task (``--names`` names them); each ``--model
KIND:NAME=FOLDER`` adds a predictions folder (repeat the same NAME for each task). The differences are the mean
minus each model. The mean costs the pretraining of every run averaged: N seeds, N times the compute.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.quality import COUNT, FINE_TUNED, ORACLE, REFERENCE, ZERO_SHOT, TableModel, format_table, quality_rows
from nextvisit.artifacts.predictions import find_prediction_files, write_predictions
from nextvisit.errors import UserError

KEY = ("subject_id", "prediction_time", "task", "horizon_days")
PROBABILITY = "predicted_boolean_probability"
EPS = 1e-7
KINDS = (ZERO_SHOT, FINE_TUNED, COUNT, ORACLE, REFERENCE)


def mean_logit_predictions(folders: list[Path], out: Path, name: str = "seed_mean") -> Path:
    """``out/predictions.parquet``: the rows of the first folder's predictions with the probability replaced by the
    sigmoid of the mean logit over ``folders``. Every folder must hold the same rows (task, horizon, subject,
    prediction time) with the same labels; a ``UserError`` names the folder otherwise."""
    if len(folders) < 2:
        raise UserError(f"--mean needs at least two forecast folders, got {len(folders)}")
    frames = []
    for folder in folders:
        files = find_prediction_files(folder)
        if len(files) != 1:
            raise UserError(f"{folder}: expected one predictions.parquet, found {len(files)}")
        frames.append(pl.read_parquet(files[0]).sort(list(KEY)))
    base = frames[0]
    logits = []
    for folder, frame in zip(folders, frames):
        if frame.height != base.height or not frame.select(KEY).equals(base.select(KEY)):
            raise UserError(f"{folder}: its prediction rows differ from {folders[0]}'s ({frame.height:,} against "
                            f"{base.height:,} rows, or other subjects and times); average forecasts of the same labels")
        if not frame["boolean_value"].equals(base["boolean_value"]):
            raise UserError(f"{folder}: its labels differ from {folders[0]}'s on the same rows")
        p = np.clip(frame[PROBABILITY].cast(pl.Float64).fill_null(np.nan).to_numpy(), EPS, 1 - EPS)
        logits.append(np.log(p) - np.log1p(-p))
    mean = np.mean(logits, axis=0)
    # a row any run could not score (null) stays unscored (null), as the schema writes it
    result = base.with_columns(pl.Series(PROBABILITY, 1.0 / (1.0 + np.exp(-mean))).fill_nan(None),
                               pl.lit(name).alias("model"))
    return write_predictions(out, result, {"model": name, "kind": ZERO_SHOT,
                                           "mean_of_logits": [str(f) for f in folders]}, overwrite=True)


def parse_model(text: str) -> TableModel:
    """``KIND:NAME=FOLDER`` as a table model."""
    try:
        head, folder = text.split("=", 1)
        kind, name = head.split(":", 1)
    except ValueError:
        raise UserError(f"--model {text!r}: expected KIND:NAME=FOLDER (e.g. fine-tuned:masked=W/masked_finetune_dementia-1a2b/out)") from None
    if kind not in KINDS:
        raise UserError(f"--model {text!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return TableModel(name, kind, Path(folder), {"rule": "as in the run that wrote " + folder})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seed_mean", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mean", nargs="+", action="append", required=True, metavar="FORECAST",
                   help="one task's forecast folders to average (repeat per task)")
    p.add_argument("--names", default="", help="comma-separated names of the averaged runs, in --mean order "
                                               "(default run_1, run_2, ...), shown as their own rows")
    p.add_argument("--model", action="append", default=[], metavar="KIND:NAME=FOLDER",
                   help="another model's predictions folder for the same labels (repeat; once per task)")
    p.add_argument("--out", type=Path, required=True, help="folder for the averaged predictions (one per task)")
    p.add_argument("--bootstrap", type=int, default=1000, help="subject-level resamples (default 1,000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0, as the benchmark)")
    p.add_argument("--json", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    try:
        width = {len(group) for group in args.mean}
        if len(width) != 1:
            raise UserError("every --mean must average the same number of runs")
        names = [n for n in args.names.split(",") if n] or [f"run_{k + 1}" for k in range(width.pop())]
        models = []
        for k, group in enumerate(args.mean):
            folders = [Path(f) for f in group]
            if len(names) != len(folders):
                raise UserError(f"--names gives {len(names)} names for {len(folders)} runs")
            path = mean_logit_predictions(folders, args.out / f"task_{k}")
            models.append(TableModel("seed_mean", ZERO_SHOT, path.parent,
                                     {"rule": f"mean of the logits of {len(folders)} pretraining runs"}))
            models += [TableModel(n, ZERO_SHOT, f, {"rule": "one pretraining run"}) for n, f in zip(names, folders)]
        models += [parse_model(m) for m in args.model]
        rows, warnings = quality_rows(models, args.bootstrap, args.seed, zero_shot_reference="seed_mean")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
