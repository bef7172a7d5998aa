"""The Python API (``nextvisit.api``, docs/python.md): the worked example of docs/python.md runs as written, its
results are the command line's number for number, its objects' reprs state counts that are true, bad arguments
get the project's one-line errors, and ``import nextvisit`` stays cheap.

The worked example is run once (module fixture: every ``python`` block of docs/python.md, in order, in one
namespace, in an empty folder); the other tests reuse what it made."""

from __future__ import annotations

import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import nextvisit
import nextvisit.api as nv
from nextvisit.cli import main
from nextvisit.errors import UserError

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"
PROBABILITY = "predicted_boolean_probability"
KEYS = ["task", "horizon_days", "split", "subject_id", "prediction_time"]


def python_blocks(text: str) -> list[str]:
    """The code of every ```python block of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    """The namespace the worked example leaves, and its folder (the working folder of this module's tests: the
    example's paths are relative, as a notebook's would be)."""
    folder = tmp_path_factory.mktemp("worked_example")
    namespace: dict = {"__name__": "worked_example"}
    before = Path.cwd()
    os.chdir(folder)
    try:
        for i, block in enumerate(python_blocks(DOC.read_text())):
            exec(compile(block, f"{DOC}:python block {i + 1}", "exec"), namespace)
        namespace["folder"] = folder
        yield namespace
    finally:
        os.chdir(before)


def at(worked, name: str) -> Path:
    return worked["folder"] / name


def test_the_doc_has_the_whole_example():
    code = "\n".join(python_blocks(DOC.read_text()))
    for call in ("nv.simulate(", "nv.tokenize(", "nv.pretrain(", "nv.label(", "nv.load_run(", ".forecast(",
                 ".sample(", "nv.evaluate("):
        assert call in code, call


def test_the_worked_example_writes_what_the_commands_write(worked):
    for folder, files in {"meds": ["metadata/subject_splits.parquet"], "store": ["store.json", "manifest.json"],
                          "run": ["config.yaml", "model.safetensors", "metrics.csv"],
                          "labels": ["labels.parquet", "task.yaml", "counts.json"],
                          "forecast": ["predictions.parquet", "info.json"],
                          "sample": ["sampling.json", "monte_carlo/predictions.parquet", "trajectories/0.parquet"],
                          "report": ["metrics.json", "report.html"]}.items():
        for name in files:
            assert (at(worked, folder) / name).is_file(), f"{folder}/{name}"
    assert worked["run"].steps == 40
    # the report evaluates the three models it was given, on the rows each scored
    metrics = json.loads((at(worked, "report") / "metrics.json").read_text())
    assert set(metrics["models"]) == {"run", "run[monte_carlox4]", "run[rao_blackwellx4]"}


def test_forecast_is_the_commands_forecast(worked, capsys):
    """The same run, MEDS and labels through `nextvisit forecast`: the same rows and the same numbers, whether the
    API wrote its folder or held the predictions in memory."""
    run, written = worked["run"], worked["predictions"]
    device = str(next(run.model.parameters()).device)
    cli_out = at(worked, "cli_forecast")
    assert main(["forecast", str(run.path), str(worked["meds"].path), str(worked["labels"].path), "--out",
                 str(cli_out), "--device", device]) == 0
    command = pl.read_parquet(cli_out / "predictions.parquet")
    in_memory = run.forecast(worked["meds"], worked["labels"], progress=False)
    assert command.height == written.frame.height == in_memory.frame.height > 0
    for frame in (written.frame, in_memory.frame):
        assert frame.columns == command.columns
        assert frame.equals(command)  # every column, every risk, exactly
    assert written.path == Path("forecast") and in_memory.path is None


def test_evaluate_is_the_commands_evaluate(worked, capsys):
    cli_report = at(worked, "cli_report")
    folder = at(worked, "forecast")
    assert main(["evaluate", str(folder), "--out", str(cli_report), "--bootstrap", "200", "--seed", "0"]) == 0
    command = json.loads((cli_report / "metrics.json").read_text())
    api = nv.evaluate(nv.load_predictions(folder), bootstrap=200, seed=0, progress=False)

    def figures(metrics):
        return [(t["task"], t["horizon_days"], r["model"], r["auroc"], r["auprc"], r["brier"], r["counts"]["rows"])
                for t in metrics["tasks"] for r in t["rows"]]

    assert figures(api.metrics) == figures(command)
    table = api.table
    assert table.height == len(figures(command))
    first = command["tasks"][0]["rows"][0]
    assert table.row(0, named=True)["auroc"] == first["auroc"]["value"]
    assert table.row(0, named=True)["auroc_low"] == first["auroc"]["ci"][0]


def test_a_labels_frame_scores_as_its_folder(worked):
    """MEDS label rows completed by the API (split from the dataset, the task's name, the horizon) give the
    folder's rows of that horizon their very risks; labelling the MEDS folder in memory gives the folder's."""
    folder = worked["predictions"].frame
    at_two_years = worked["at_two_years"].frame
    expected = folder.filter(pl.col("horizon_days") == 730)
    assert at_two_years.height == expected.height > 0
    joined = expected.join(at_two_years, on=["subject_id", "prediction_time"], suffix="_frame")
    assert joined.height == expected.height
    assert (joined[PROBABILITY] == joined[f"{PROBABILITY}_frame"]).all()
    assert (joined["split"] == joined["split_frame"]).all()
    assert worked["labelled_here"].frame.select(*KEYS, PROBABILITY).equals(folder.select(*KEYS, PROBABILITY))


def test_reprs_state_true_counts(worked):
    meds, store, run, labels = worked["meds"], worked["store"], worked["run"], worked["labels"]
    splits = pl.read_parquet(meds.path / "metadata" / "subject_splits.parquet")
    assert sum(meds.subjects.values()) == splits.height == 2000
    text = repr(meds)
    assert "2,000 subjects" in text and f"held_out {splits.filter(pl.col('split') == 'held_out').height:,}" in text

    assert f"vocabulary {len(run.vocab):,} tokens" in repr(store)
    assert store.vocab_size == len(run.vocab)

    parameters = sum(p.numel() for p in run.model.parameters())
    text = repr(run)
    assert f"{parameters / 1e6:.2f}M parameters" in text and "40 steps trained" in text
    assert f"vocabulary {len(run.vocab):,}" in text and f"{run.config.model.n_layers} layers" in text

    frame = labels.frame
    labelled = frame.filter(pl.col("boolean_value").is_not_null())
    text = repr(labels)
    assert f"{frame.height:,} rows of {frame['subject_id'].n_unique():,} subjects" in text
    assert f"{labelled.height:,} labelled ({int(labelled['boolean_value'].sum()):,} positive)" in text
    assert f"{frame.height - labelled.height:,} censored" in text

    for predictions in (worked["predictions"], worked["at_two_years"]):
        frame = predictions.frame
        text = repr(predictions)
        assert f"{frame.height:,} rows of {frame['subject_id'].n_unique():,} subjects" in text
        assert f"held_out {frame.filter(pl.col('split') == 'held_out').height:,}" in text
    assert "horizons 730 d;" in repr(worked["at_two_years"])

    sampled = worked["sampled"]
    histories = sampled.monte_carlo.frame.select("subject_id", "prediction_time").n_unique()
    assert sampled.summary["trajectories"] == 4 * histories
    assert f"{4 * histories:,} trajectories (4 per history, {histories:,} histories" in repr(sampled)
    assert sampled.trajectories(3).height > 0

    evaluation = worked["evaluation"]
    text = repr(evaluation)
    for row in evaluation.table.iter_rows(named=True):
        assert f"{row['task']} {row['horizon_days']} d, {row['model']}: AUROC" in text
        assert f"{row['positives']:,} positive of {row['rows']:,} rows" in text
        if row["auroc"] is not None:
            assert f"AUROC {row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]" in text
    assert "200 subject-level bootstrap resamples" in text


def test_loading_gives_what_was_written(worked):
    labels = nv.load_labels(at(worked, "labels"))
    assert labels.frame.equals(worked["labels"].frame) and labels.task == worked["labels"].task
    assert labels.counts == worked["labels"].counts
    assert nv.load_predictions(at(worked, "forecast") / "predictions.parquet").frame.equals(worked["predictions"].frame)
    assert repr(nv.load_store(at(worked, "store"))) == repr(worked["store"]).replace(
        "; store>", f"; {at(worked, 'store')}>")


@pytest.mark.parametrize("call, message", [
    (lambda w: w["run"].forecast(w["meds"], w["labels"], splits="train,bogus"), r"--splits 'train,bogus': expected"),
    (lambda w: w["run"].forecast(w["meds"]), r"nothing to score: give labels"),
    (lambda w: w["run"].forecast(w["meds"], w["labels"], task="dementia"), r"labels carry their task"),
    (lambda w: w["run"].forecast(w["meds"], w["labels"], aggregator="mean"), r"aggregator 'mean' is unknown"),
    (lambda w: w["run"].forecast(w["meds"], w["labels"], horizon=365), r"horizon=365: the labels have no row"),
    (lambda w: w["run"].forecast(w["meds"], w["labels"].frame.drop("boolean_value"), task="knee_oa"),
     r"labels frame: column 'boolean_value' is missing"),
    (lambda w: w["run"].forecast(w["meds"], w["labels"].frame.select("subject_id", "prediction_time",
                                                                     "boolean_value"), task="knee_oa"),
     r"task knee_oa has horizons \[730, 1825\] days; give horizon="),
    (lambda w: w["run"].forecast(w["meds"], task="knee_oa", codes=["ICD10CM//M17"]), r"give the condition once"),
    (lambda w: w["run"].forecast(w["meds"], codes=["ICD10CM//M17"]), r"codes= needs horizon="),
    (lambda w: w["run"].forecast(w["meds"], task="no_such_task"), r"unknown task 'no_such_task'"),
    (lambda w: w["run"].forecast(w["meds"], w["labels"], out=w["folder"] / "labels"), r"labels.*not empty"),
    (lambda w: w["run"].sample(w["meds"], w["labels"], out=w["folder"] / "never", samples=0), r"--samples"),
    (lambda w: nv.load_run(w["folder"] / "nowhere"), r"nowhere/config.yaml: missing; give a run folder"),
    (lambda w: nv.pretrain(w["store"], w["folder"] / "never", preset="huge"), r"unknown preset 'huge'"),
    (lambda w: nv.pretrain(w["store"], w["folder"] / "never", config={"train": {"max_step": 3}}),
     r"config: unknown field 'train.max_step'"),
    (lambda w: nv.label(w["meds"], "knee_oa", codes="ICD10CM//M17"), r"--codes: only for ACES task configs"),
    (lambda w: nv.evaluate(w["predictions"], bootstrap=0), r"bootstrap=0: must be at least 1"),
    (lambda w: nv.evaluate(), r"no predictions given"),
    (lambda w: nv.tokenize(w["labels"].filter(pl.col("split") == "train"), w["folder"] / "never"),
     r"meds: expected a folder path or a nextvisit object holding one, got Labels held in memory"),
])
def test_a_bad_argument_is_a_user_error(worked, call, message):
    with pytest.raises(UserError, match=message) as raised:
        call(worked)
    assert "\n" not in str(raised.value)
    assert not (worked["folder"] / "never").exists()


def test_import_nextvisit_is_cheap_and_exports_the_api():
    code = ("import sys, nextvisit; heavy = [m for m in ('torch', 'polars') if m in sys.modules]; "
            "nextvisit.load_run; print(heavy, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "False"]
    for name in nextvisit._API:
        assert getattr(nextvisit, name) is getattr(nv, name), name
    # an export named like a stage package would be replaced by that package once it is imported
    packages = {m.name for m in pkgutil.iter_modules(nextvisit.__path__)}
    assert not packages & set(nextvisit._API)
    with pytest.raises(AttributeError):
        nextvisit.no_such_name  # noqa: B018
