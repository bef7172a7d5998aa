"""The stages MEDS-DEV's ``model.yaml`` runs (``nextvisit medsdev STAGE``; the folders they read and write:
``nextvisit.medsdev``). Each maps MEDS-DEV's folders onto our own stages and writes ``OUT/nextvisit.json``.

The predict stage's rows, in order (every label row read ends in exactly one count of ``ROW_FATES``):

1. every ``*.parquet`` under ``{labels_dir}`` is read as MEDS label rows (``nextvisit.data.meds.read_label_files``);
2. a row's split is its subject's in the dataset's ``metadata/subject_splits.parquet``: rows of subjects not
   listed there are ``not_in_subject_splits``, rows of another split than ``{split}`` are ``other_splits``;
3. a row of ``{split}`` with a null ``boolean_value`` is ``unlabelled`` (meds-evaluation forbids a null label);
4. every other row is scored by the horizon query (``nextvisit.predict.horizon``: the history known at the
   prediction time, a query at the horizon, the condition's logits) and written once to
   ``OUT/predictions.parquet`` (``predicted``), unless the model gives it no risk (``missing_score``).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import polars as pl

from nextvisit.artifacts.folders import atomic_folder, atomic_write
from nextvisit.artifacts.meds_evaluation import MEDS_DEV_PROBABILITY, meds_evaluation_rows
from nextvisit.artifacts.predictions import ZERO_SHOT
from nextvisit.config import resolve
from nextvisit.data.meds import SPLITS, read_label_files, read_splits_checked
from nextvisit.errors import UserError
from nextvisit.medsdev import (
    DEMO_STEPS, MODEL_README, MODEL_YAML, PREDICTIONS, RUN, STAGE_FILE, STORE,
)
from nextvisit.model.run import CHECKPOINT, CONFIG_FILE, WEIGHTS_FILE
from nextvisit.predict.horizon import ForecastConfig, HorizonQueryModel
from nextvisit.tasks import Task, load_task
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.dataset import tokenize_dataset
from nextvisit.train.trainer import train

ROW_FATES = ("not_in_subject_splits", "other_splits", "unlabelled", "missing_score", "predicted")
CONDITION_TASK = "condition_codes"  # the task name of a condition given as --condition-codes


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


# -- unsupervised train ----------------------------------------------------------------------------------------


def unsupervised_train(dataset_dir: Path, output_dir: Path, demo: bool = False, preset: str = "tiny",
                       pretrain_config: Path | None = None, tokenizer_config: Path | None = None,
                       max_steps: int | None = None, max_minutes: float | None = None, device: str | None = None,
                       progress: bool = True) -> dict:
    """Tokenize ``dataset_dir`` into ``output_dir/store`` and pretrain ``output_dir/run`` on its train split.
    ``demo``: preset tiny and ``DEMO_STEPS`` steps (an explicit ``max_steps`` still wins)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if demo:
        if preset != "tiny":
            sys.stderr.write(f"demo: preset tiny instead of {preset}\n")
        preset = "tiny"
        max_steps = DEMO_STEPS if max_steps is None else max_steps
    config = resolve(preset, pretrain_config)  # before any work: a bad preset or YAML fails at once
    tokenizer = (TokenizerConfig.load(tokenizer_config) if tokenizer_config is not None
                 else TokenizerConfig(max_time=None).validate())
    store, run = output_dir / STORE, output_dir / RUN
    manifest = tokenize_dataset(dataset_dir, store, config=tokenizer, overwrite=True, progress=progress)
    if run.exists():  # left by an earlier attempt of this stage, which MEDS-DEV runs again only when it failed
        shutil.rmtree(run)
    final = train(store, run, config, max_minutes=max_minutes, max_steps=max_steps, device_name=device,
                  progress=progress)
    record = {
        "stage": "unsupervised train", "dataset_dir": str(dataset_dir), "demo": demo, "preset": preset,
        "pretrain_config": str(pretrain_config) if pretrain_config else None,
        "tokenizer_config": str(tokenizer_config) if tokenizer_config else "defaults with max_time: null",
        "max_steps": max_steps, "max_minutes": max_minutes, "store": str(store), "run": str(run),
        "vocab_size": manifest["vocab_size"],
        "splits": {split: {k: c[k] for k in ("subjects_out", "visits", "tokens_out")}
                   for split, c in manifest["splits"].items()},
        "final_metrics": final,
    }
    _write_json(output_dir / STAGE_FILE, record)
    return record


# -- supervised train ------------------------------------------------------------------------------------------


def find_run(model_initialization_dir: Path) -> Path:
    """The model run of a train stage's output folder (``DIR/run``), or ``DIR`` itself when it is a run folder."""
    folder = Path(model_initialization_dir)
    for candidate in (folder / RUN, folder):
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / CONFIG_FILE).is_file():
            return candidate
    raise UserError(f"{folder}: holds no model run ({folder / RUN / WEIGHTS_FILE} missing); point "
                    "model_initialization_dir at the output folder of the unsupervised (or supervised) train stage")


def supervised_train(model_initialization_dir: Path, output_dir: Path) -> dict:
    """Fit nothing (zero-shot): copy the pretrained run, without its checkpoint, to ``output_dir/run``."""
    source = find_run(model_initialization_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_folder(output_dir / RUN, overwrite=True) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CHECKPOINT))
    record = {
        "stage": "supervised train", "fitted": "nothing: the model is scored zero-shot; no label was read",
        "pretrained_run": str(source.resolve()), "run": str(output_dir / RUN),
        "not_copied": f"{CHECKPOINT}/ (optimizer state for resuming pretraining)",
    }
    _write_json(output_dir / STAGE_FILE, record)
    return record


# -- predict ---------------------------------------------------------------------------------------------------


def resolve_task(task: str | None, condition_codes: str | None, horizon_days: int | None) -> tuple[Task, int]:
    """The condition (a task, or code prefixes) and the horizon of the query."""
    if task and condition_codes:
        raise UserError("give the condition once: --task (NEXTVISIT_TASK) or --condition-codes "
                        "(NEXTVISIT_CONDITION_CODES), not both")
    if task:
        resolved = load_task(task)
        if horizon_days is not None:
            return resolved, horizon_days
        if len(resolved.horizons_days) != 1:
            raise UserError(f"task {resolved.name} has horizons {list(resolved.horizons_days)} days; set "
                            "--horizon-days (NEXTVISIT_HORIZON_DAYS) to the horizon of the MEDS-DEV task")
        return resolved, resolved.horizons_days[0]
    if condition_codes:
        if horizon_days is None:
            raise UserError("--condition-codes needs --horizon-days (NEXTVISIT_HORIZON_DAYS): the days after the "
                            "prediction time that the MEDS-DEV task's label looks at")
        prefixes = [code.strip() for code in condition_codes.split(",") if code.strip()]
        data = {"name": CONDITION_TASK, "condition": {"code_prefixes": prefixes}, "horizons_days": [horizon_days]}
        return Task.from_dict(data, source="--condition-codes"), horizon_days
    raise UserError("MEDS-DEV passes no task configuration to a model: set NEXTVISIT_TASK (a built-in task or a "
                    "task YAML) or NEXTVISIT_CONDITION_CODES, with NEXTVISIT_HORIZON_DAYS (docs/meds-dev.md)")


def predict(dataset_dir: Path, labels_dir: Path, model_initialization_dir: Path, output_dir: Path, split: str,
            task: str | None = None, condition_codes: str | None = None, horizon_days: int | None = None,
            device: str | None = None, progress: bool = True) -> dict:
    """Score the label rows of ``split`` (module docstring) into ``output_dir/predictions.parquet``."""
    if split not in SPLITS:
        raise UserError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    condition, horizon = resolve_task(task, condition_codes, horizon_days)
    run = find_run(model_initialization_dir)
    output_dir = Path(output_dir)
    labels, files = read_label_files(labels_dir)
    rows = labels.join(read_splits_checked(dataset_dir), on="subject_id", how="left")
    listed, labelled = pl.col("split").is_not_null(), pl.col("boolean_value").is_not_null()
    fates = {
        "not_in_subject_splits": rows.filter(~listed).height,
        "other_splits": rows.filter(listed & (pl.col("split") != split)).height,
        "unlabelled": rows.filter((pl.col("split") == split) & ~labelled).height,
    }
    scored = rows.filter((pl.col("split") == split) & labelled)
    if scored.height == 0:
        raise UserError(f"{labels_dir}: no labelled row of split {split} among its {labels.height:,} rows "
                        f"({', '.join(f'{n:,} {fate}' for fate, n in fates.items())}); nothing to predict")
    frame = scored.with_columns(
        pl.lit(condition.name).alias("task"), pl.lit(horizon, pl.Int32).alias("horizon_days"),
        pl.lit(None, pl.Float64).alias("age_years"), pl.lit(None, pl.String).alias("sex"),
    )
    model = HorizonQueryModel(run, ForecastConfig(splits=(split,)), device, progress=progress)
    result = model.score(Path(dataset_dir), frame, condition, (split,))
    path = output_dir / PREDICTIONS
    where = f"{condition.name}, {horizon} days, split {split}"
    predictions, entry = meds_evaluation_rows(path, result.predictions, where, probability_dtype=MEDS_DEV_PROBABILITY)
    fates["missing_score"] = entry["rows_skipped"]["missing_score"]
    fates["predicted"] = predictions.height
    assert sum(fates.values()) == labels.height, (fates, labels.height)
    warnings = []
    if entry["positives"] in (0, predictions.height):
        warnings.append(f"all {predictions.height} predicted rows are of one class; meds-evaluation's AUROC and "
                        "average precision are undefined there")
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, predictions.write_parquet)
    record = {
        "stage": "supervised predict", "model": model.name, "kind": ZERO_SHOT, "run": str(run),
        "task": condition.to_dict(), "horizon_days": horizon, "split": split, "label_files": files,
        "rows": {"read": labels.height, **fates}, "positives": entry["positives"],
        "forecast": {k: result.info[k] for k in ("queries", "events_not_seen", "precision")},
        "forecast_config": asdict(model.config),
        "predictions": {"path": str(path), "columns": {f.name: str(f.type) for f in predictions.to_arrow().schema}},
        "warnings": warnings,
    }
    _write_json(output_dir / STAGE_FILE, record)
    for warning in warnings:
        sys.stderr.write(f"warning: {warning}\n")
    return record


# -- registering the model with MEDS-DEV -------------------------------------------------------------------------


def write_model_dir(out: Path, requirement: str, overwrite: bool = False) -> list[Path]:
    """MEDS-DEV's model folder (its ``src/MEDS_DEV/models/<name>/``): ``model.yaml``, ``README.md`` and a
    ``requirements.txt`` holding ``requirement`` (how MEDS-DEV's model environment installs nextvisit)."""
    requirement = requirement.strip()
    if not requirement or "\n" in requirement:
        raise UserError(f"--requirement {requirement!r}: give one pip requirement for nextvisit, e.g. "
                        "'nextvisit @ file:///path/to/nextvisit' or a wheel path")
    with atomic_folder(out, overwrite) as staging:  # refuses a non-empty folder without overwrite
        shutil.copyfile(MODEL_YAML, staging / MODEL_YAML.name)
        shutil.copyfile(MODEL_README, staging / MODEL_README.name)
        (staging / "requirements.txt").write_text(requirement + "\n")
    return [Path(out) / name for name in (MODEL_YAML.name, MODEL_README.name, "requirements.txt")]


# -- command line ----------------------------------------------------------------------------------------------


def unsupervised_train_cli(args) -> int:
    record = unsupervised_train(args.dataset_dir, args.output_dir, demo=args.demo, preset=args.preset or "tiny",
                                pretrain_config=args.pretrain_config, tokenizer_config=args.tokenizer_config,
                                max_steps=args.max_steps, max_minutes=args.max_minutes, device=args.device)
    print(f"pretrained {record['run']} (preset {record['preset']}) on {record['store']}")
    return 0


def supervised_train_cli(args) -> int:
    record = supervised_train(args.model_initialization_dir, args.output_dir)
    print(f"nothing to fit (zero-shot): copied {record['pretrained_run']} to {record['run']}")
    return 0


def predict_cli(args) -> int:
    record = predict(args.dataset_dir, args.labels_dir, args.model_initialization_dir, args.output_dir, args.split,
                     task=args.task, condition_codes=args.condition_codes, horizon_days=args.horizon_days,
                     device=args.device)
    rows = record["rows"]
    print(f"wrote {rows['predicted']:,} predictions ({record['positives']:,} positive) to "
          f"{record['predictions']['path']}; of {rows['read']:,} label rows: "
          + ", ".join(f"{rows[fate]:,} {fate}" for fate in ROW_FATES))
    return 0


def model_dir_cli(args) -> int:
    for path in write_model_dir(args.out, args.requirement, args.overwrite):
        print(f"wrote {path}")
    return 0
