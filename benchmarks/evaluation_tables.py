"""The evaluation figures of a demo folder (or any folder with the demo's layout), as the markdown tables the
docs quote: per task and horizon, every model's held_out AUROC with its subject-level interval beside the
width the row-level bootstrap would give on the same rows (the "before"), the IPCW, one-landmark and
final-year-excluded figures and the positive rows and subjects; the oracle against the labels (simulator
doc); censoring by days of data after the horizon, and competing deaths.

    .venv/bin/python -m benchmarks.evaluation_tables nextvisit-demo

Reads ``DEMO/report/metrics.json`` (``nextvisit evaluate``), ``DEMO/labels/<task>/labels.parquet`` and
``DEMO/predictions/<task>/<model>/``. Nothing is fit here; the row-level widths reuse the evaluation's own
bootstrap with every row its own cluster (exactly the class-stratified row bootstrap used before).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import polars as pl

from nextvisit.artifacts.predictions import read_predictions
from nextvisit.evaluate.bootstrap import View, percentile_interval, rng_for, subject_bootstrap
from nextvisit.evaluate.metrics import auroc


def _ci(metric: dict) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    ci = metric.get("ci")
    return f"{metric['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{metric['value']:.3f}"


def _value(metric: dict) -> str:
    return "n/a" if not metric or metric.get("value") is None else f"{metric['value']:.3f}"


def row_level_width(source: str, task: str, horizon: int, n_resamples: int, seed: int) -> float:
    """The AUROC interval width of the row-level (class-stratified) bootstrap on the same held_out rows."""
    folder = Path(source)
    entry = next(e for e in read_predictions(folder / "predictions.parquet", [])
                 if e.task == task and e.horizon_days == horizon)
    held = entry.frame.filter((pl.col("split") == "held_out") & pl.col("boolean_value").is_not_null()
                              & pl.col("predicted_boolean_probability").is_not_null()
                              & pl.col("predicted_boolean_probability").is_not_nan())
    labels = held["boolean_value"].to_numpy().astype(bool)
    scores = held["predicted_boolean_probability"].to_numpy()
    boot = subject_bootstrap(labels, scores, np.arange(len(labels)), n_resamples, 2_000_000,
                             rng_for(seed, task, horizon, "all"), {"sample": View()})
    low, high = percentile_interval(boot.get("sample.auroc"), 0.95)
    return high - low


def model_table(metrics: dict) -> str:
    n, seed = metrics["settings"]["n_bootstrap"], metrics["settings"]["seed"]
    lines = ["| task | horizon | model | AUROC [subject-level 95% CI] | width | row-level width | IPCW AUROC | "
             "one landmark | final year excluded | positives rows / subjects |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for table in metrics["tasks"]:
        if table["task"].endswith("_next_visit"):
            continue
        for r in table["rows"]:
            auroc = r["auroc"]
            width = (auroc["ci"][1] - auroc["ci"][0]) if auroc.get("ci") else float("nan")
            before = row_level_width(r["source"], table["task"], table["horizon_days"], n, seed) \
                if auroc.get("ci") else float("nan")
            c = r["counts"]
            lines.append(f"| {table['task']} | {table['horizon_days'] // 365} y | {r['model']} | {_ci(auroc)} | "
                         f"{width:.3f} | {before:.3f} | {_ci(r.get('auroc_ipcw'))} | {_value(r.get('auroc_one_landmark'))} | "
                         f"{_value(r.get('auroc_excluding_final_year'))} | {c['positives']} / {c.get('positive_subjects')} |")
    return "\n".join(lines)


def oracle_table(demo: Path, metrics: dict) -> str:
    lines = ["| task | horizon | rows | positives | observed rate | IPCW observed rate | mean oracle risk | oracle AUROC |",
             "|---|---|---|---|---|---|---|---|"]
    for table in metrics["tasks"]:
        oracle = next((r for r in table["rows"] if r["kind"] == "oracle"), None)
        if oracle is None:
            continue
        frame = pl.read_parquet(Path(oracle["source"]) / "predictions.parquet").filter(
            (pl.col("task") == table["task"]) & (pl.col("horizon_days") == table["horizon_days"])
            & pl.col("boolean_value").is_not_null())
        y = frame["boolean_value"].to_numpy().astype(float)
        w = frame["censoring_weight"].to_numpy() if "censoring_weight" in frame.columns else np.ones(len(y))
        lines.append(f"| {table['task']} | {table['horizon_days'] // 365} y | {len(y):,} | {int(y.sum()):,} | "
                     f"{y.mean():.4f} | {np.sum(w * y) / np.sum(w):.4f} | "
                     f"{frame['predicted_boolean_probability'].mean():.4f} | "
                     f"{auroc(y.astype(bool), frame['predicted_boolean_probability'].to_numpy()):.3f} |")
    return "\n".join(lines)


def censoring_table(demo: Path) -> str:
    lines = ["| task | horizon | label rows | censored | censored, horizon ends < 6 months before data end | "
             "censored, 2+ years before | competing deaths (of labelled) |", "|---|---|---|---|---|---|---|"]
    for labels_dir in sorted((demo / "labels").iterdir()):
        labels = pl.read_parquet(labels_dir / "labels.parquet")
        for (horizon,), rows in sorted(labels.group_by(["horizon_days"]), key=lambda kv: kv[0]):
            censored = rows["boolean_value"].is_null()
            near = rows["days_after_horizon"] < 183
            far = rows["days_after_horizon"] >= 730
            labelled = rows.filter(pl.col("boolean_value").is_not_null())
            deaths = (labelled["reason"] == "negative_competing_death").mean()
            lines.append(f"| {labels_dir.name} | {horizon // 365} y | {rows.height:,} | {censored.mean():.1%} | "
                         f"{censored.filter(near).mean():.1%} ({near.sum():,} rows) | "
                         f"{censored.filter(far).mean():.1%} ({far.sum():,} rows) | {deaths:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="a folder written by `nextvisit demo`")
    demo = parser.parse_args().demo
    metrics = json.loads((demo / "report" / "metrics.json").read_text())
    print("## Models (held_out)\n")
    print(model_table(metrics))
    print("\n## The oracle against the labels (tuning + held_out)\n")
    print(oracle_table(demo, metrics))
    print("\n## Censoring and competing deaths (all splits)\n")
    print(censoring_table(demo))


if __name__ == "__main__":
    main()
