"""The oracle as a compared model: the simulator's true risk for each label row (``nextvisit oracle``).

It sees the simulator's latent state, so it is the ceiling no model can reach on average, not a model a user
could fit. It takes no task labels and needs no train rows; it reads no history (the simulator re-creates
each subject from its seed, ``nextvisit.data.simulate.oracle``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from nextvisit import compare
from nextvisit.artifacts.predictions import ORACLE, PREDICTION_SPLITS
from nextvisit.compare import ComparedModel, Labels
from nextvisit.data.simulate.dataset import SIMULATOR_VERSION
from nextvisit.data.simulate.oracle import OracleConfig, Simulator, oracle_risks
from nextvisit.errors import UserError

TASK_CONDITIONS = {"dementia": "dementia", "knee_oa": "knee_oa"}  # task name -> simulator condition


def task_conditions(labels: Labels, tasks) -> dict:
    """Map each task name in the labels to a simulator condition (task.yaml's name is honoured)."""
    yaml_path = labels.source.parent / "task.yaml"
    yaml_name = None
    if yaml_path.exists():
        data = yaml.safe_load(yaml_path.read_text()) or {}
        yaml_name = data.get("name") if isinstance(data, dict) else None
    mapping = {}
    for task in tasks:
        key = task if task in TASK_CONDITIONS else yaml_name if yaml_name in TASK_CONDITIONS else None
        if key is None:
            raise UserError(f"{labels.source}: task {task!r} has no ground truth in the simulator; "
                            f"the oracle knows tasks {', '.join(TASK_CONDITIONS)}")
        mapping[task] = TASK_CONDITIONS[key]
    return mapping


class OracleModel(ComparedModel):
    name = "oracle"
    kind = ORACLE
    needs_train_labels = False
    needs_task = False

    def __init__(self, config: OracleConfig | None = None, workers: int | None = None, progress: bool = True):
        self.config = config or OracleConfig()
        self.workers = workers or os.cpu_count() or 1
        self.progress = progress
        self.prevalent = 0

    def read(self, meds_dir: Path, labels: Labels):
        return Simulator.from_meds(meds_dir), labels

    def predict_proba(self, inputs, rows: pl.DataFrame) -> np.ndarray:
        sim, labels = inputs
        mapping = task_conditions(labels, rows["task"].unique().to_list())
        times = rows["prediction_time"].dt.epoch("d").to_numpy().astype(np.int64)
        risks, prevalent = oracle_risks(
            sim, rows["subject_id"].to_numpy(), times, [mapping[t] for t in rows["task"].to_list()],
            rows["horizon_days"].to_numpy(), config=self.config, workers=self.workers, progress=self.progress)
        self.prevalent, self.seed = int(prevalent.sum()), sim.seed
        if self.prevalent:
            sys.stderr.write(f"oracle: {self.prevalent} labelled row(s) already had the condition recorded at the "
                             "prediction time (risk 0); the task's code set and the labels disagree\n")
        return risks

    def info(self) -> dict:
        return {"config": {"method": "monte_carlo", "n_samples": self.config.n_samples, "seed": self.seed,
                           "simulator_version": SIMULATOR_VERSION,
                           "standard_error": "sqrt(p(1-p)/n_samples) per row"},
                "prevalent_at_time": self.prevalent}


def write_oracle_predictions(meds_dir, labels_dir, out, *, overwrite: bool = False,
                             config: OracleConfig | None = None, workers: int | None = None,
                             splits=PREDICTION_SPLITS, progress: bool = True) -> Path:
    """Score the labelled rows of ``splits`` with the oracle and write the predictions folder."""
    return compare.run(OracleModel(config, workers, progress), meds_dir, labels_dir, out, overwrite, splits=splits)


def run_cli(args) -> int:
    write_oracle_predictions(args.meds_dir, args.labels, args.out, overwrite=args.overwrite,
                             config=OracleConfig(n_samples=args.samples), workers=args.workers)
    return 0
