"""Zero-shot forecasting by horizon query and next-visit occurrence scoring: no leakage from after the
prediction time, the at-time rule, removed codes, determinism, and clear errors. The model is a small
random-init network (nothing is trained): these tests are about what reaches the model, not its skill."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import save_file

from nextvisit.cli import main
from nextvisit.config import preset
from nextvisit.errors import UserError
from nextvisit.artifacts.predictions import CARRIED_LABEL_COLUMNS, PROBABILITY
from nextvisit.data.histories import cut
from nextvisit.predict.horizon import ForecastConfig, forecast, query_horizons, score_queries
from nextvisit.predict.occurrence import OccurrenceConfig, occurrence
from nextvisit.predict.scoring import aggregate
from nextvisit.model.transformer import NextVisitModel
from nextvisit.tokenize.store import SplitWriter, TokenStore, write_store_info
from nextvisit.tasks import Task, make_labels, read_labels, write_labels
from nextvisit.units import END_OF_DAY
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.tokenizer import Tokenizer
from test_tasks import DATA, write_meds

CODES = ["ICD10CM//I10", "ICD10CM//E11.9", "ICD10CM//J45.909", "RXNORM//6809", "ICD10CM//M17.11", "ICD10CM//R41.1"]
F03 = "ICD10CM//F03.90"
TASK = Task.from_dict({
    "name": "dementia_test",
    "condition": {"code_prefixes": ["ICD10CM//F03", "ICD10CM//G30"]},
    "remove_from_inputs": {"code_prefixes": ["ICD10CM//R41.1"]},
    "horizons_days": [730, 1825],
    "landmarks": {"min_history_days": 365, "min_age_years": 50, "max_per_subject": 2, "sample_probability": 1.0, "seed": 0},
})
N_SUBJECTS = 24


def cohort_rows(seed: int = 0) -> list[tuple]:
    """Subjects aged 55-80 with 6-10 visits of common codes; every third one gets dementia late."""
    rng = np.random.default_rng(seed)
    rows = []
    for sid in range(1, N_SUBJECTS + 1):
        birth = datetime(1935 + int(rng.integers(0, 20)), 1 + int(rng.integers(0, 12)), 1)
        rows += [(sid, None, "GENDER//F" if sid % 2 else "GENDER//M"), (sid, birth, "MEDS_BIRTH")]
        day = datetime(2005, 1, 1) + timedelta(days=int(rng.integers(0, 300)))
        n_visits = int(rng.integers(6, 11))
        for v in range(n_visits):
            rows.append((sid, day, "VISIT//OUTPATIENT"))
            for code in rng.choice(CODES, size=int(rng.integers(1, 4)), replace=False):
                rows.append((sid, day + timedelta(hours=int(rng.integers(8, 18))), str(code)))
            rows.append((sid, day, "LOINC//4548-4", float(rng.normal(6, 1))))
            if sid % 3 == 0 and v == n_visits - 2:
                rows.append((sid, day, F03))
            day += timedelta(days=int(rng.integers(150, 500)))
    return rows


SPLITS = {sid: ("tuning" if sid % 4 == 0 else "held_out") for sid in range(1, N_SUBJECTS + 1)}


def make_run(folder: Path, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """A run folder (docs/interfaces.md section 4) holding a random-init small model."""
    folder.mkdir(parents=True)
    config = preset("tiny")
    config.model.d_model, config.model.n_layers, config.model.n_heads = 32, 2, 2
    config.model.vocab_size = len(tokenizer.vocab)
    config.data.query_max_tokens = 63
    torch.manual_seed(seed)
    model = NextVisitModel(config.model)
    config.save(folder / "config.yaml")
    tokenizer.save(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast")
    rows = cohort_rows()
    meds = write_meds(root / "meds", [rows], SPLITS)
    tokenizer = Tokenizer.fit(pl.read_parquet(meds / "data"), TokenizerConfig(min_count=1, max_time=None))
    run = make_run(root / "run", tokenizer)
    labels_dir = root / "labels"
    write_labels(labels_dir, make_labels(meds, TASK, progress=False), TASK)
    from nextvisit.model.run import load_next_visit_run as load_run

    model, vocab, config = load_run(run, "cpu")
    return {"root": root, "rows": rows, "meds": meds, "tokenizer": tokenizer, "run": run, "labels": labels_dir,
            "model": model, "vocab": vocab, "config": config}


def run_forecast(world, meds=None, labels=None, task=TASK, **options) -> pl.DataFrame:
    config = ForecastConfig(**options)
    labels = read_labels(world["labels"]) if labels is None else labels
    result = forecast(world["model"], world["vocab"], world["tokenizer"], world["config"].data.query_max_tokens,
                      meds or world["meds"], labels, task, config, model_name="test", progress=False)
    return result.predictions


def with_extra_events(world, name: str, extra: list[tuple]) -> Path:
    return write_meds(world["root"] / name, [world["rows"] + extra], SPLITS)


def test_predictions_cover_labelled_rows_with_the_contract_columns(world):
    labels = read_labels(world["labels"])
    predictions = run_forecast(world)
    expected = labels.filter(pl.col("boolean_value").is_not_null())
    assert predictions.height == expected.height > 10
    assert set(predictions["split"].unique()) == {"tuning", "held_out"}
    assert predictions.columns == ["subject_id", "prediction_time", "boolean_value", "task", "horizon_days", "split",
                                   "age_years", "sex", PROBABILITY, "model", *CARRIED_LABEL_COLUMNS]
    p = predictions[PROBABILITY].to_numpy()
    assert np.all((p > 0) & (p < 1)) and np.std(p) > 0
    # same history, two horizons: the query day differs, so the risks do
    pairs = predictions.pivot(on="horizon_days", index=["subject_id", "prediction_time"], values=PROBABILITY).drop_nulls()
    assert pairs.height > 0 and not np.allclose(pairs["730"], pairs["1825"])


def test_event_after_prediction_time_changes_no_prediction(world):
    labels = read_labels(world["labels"])
    base = run_forecast(world, labels=labels)
    # a dementia code one microsecond after each subject's last prediction time, and a visit a year later
    extra = []
    last = labels.group_by("subject_id").agg(pl.col("prediction_time").max())
    for sid, t in last.iter_rows():
        extra += [(sid, t + timedelta(microseconds=1), F03), (sid, t + timedelta(days=365), "ICD10CM//I10")]
    later = run_forecast(world, meds=with_extra_events(world, "later", extra), labels=labels)
    assert later[PROBABILITY].to_list() == base[PROBABILITY].to_list()


def test_event_at_exactly_the_prediction_time_is_known(world):
    labels = read_labels(world["labels"]).filter(pl.col("boolean_value").is_not_null())
    # a subject's last landmark, so no later landmark of the subject legitimately sees the new event
    sid, t = labels.group_by("subject_id").agg(pl.col("prediction_time").max()).sort("subject_id").row(0)
    # the unit rule: time <= prediction_time is known
    events = pl.DataFrame({"subject_id": [sid] * 3, "time": [t - timedelta(hours=1), t, t + timedelta(microseconds=1)],
                           "code": ["A", "B", "C"], "numeric_value": [None] * 3},
                          schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                  "numeric_value": pl.Float32})
    histories = pl.DataFrame({"history_id": [7], "subject_id": [sid], "prediction_time": [t]},
                             schema={"history_id": pl.Int64, "subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    known, counts = cut(events, histories)
    assert known["code"].to_list() == ["A", "B"] and known["history_id"].to_list() == [7, 7]
    assert counts == {"after_prediction_time": 1, "removed_from_inputs": 0}
    # end to end: a code stamped exactly at the prediction time reaches the model
    base = run_forecast(world, labels=labels)
    at_time = run_forecast(world, meds=with_extra_events(world, "at_time", [(sid, t, "ICD10CM//J45.909"), (sid, t, F03)]),
                           labels=labels)
    changed = base.with_columns(after=at_time[PROBABILITY]).filter(pl.col(PROBABILITY) != pl.col("after"))
    assert set(changed["subject_id"].to_list()) == {sid}
    assert set(changed["prediction_time"].to_list()) == {t}


def test_removed_codes_never_reach_the_model(world):
    """R41.1 (remove_from_inputs) at the prediction day changes nothing; the same day's I10 does."""
    labels = read_labels(world["labels"]).filter(pl.col("boolean_value").is_not_null())
    base = run_forecast(world, labels=labels)
    extra = [(sid, t - timedelta(hours=2), "ICD10CM//R41.1") for sid, t in
             labels.select("subject_id", "prediction_time").unique().iter_rows()]
    removed = run_forecast(world, meds=with_extra_events(world, "r41", extra), labels=labels)
    assert removed[PROBABILITY].to_list() == base[PROBABILITY].to_list()
    kept_task = Task.from_dict({**TASK.to_dict(), "remove_from_inputs": {}})
    plain = run_forecast(world, labels=labels, task=kept_task)
    with_r41 = run_forecast(world, meds=with_extra_events(world, "r41b", extra), labels=labels, task=kept_task)
    assert with_r41[PROBABILITY].to_list() != plain[PROBABILITY].to_list()


def test_same_inputs_same_predictions_and_batch_size_invariance(world):
    a = run_forecast(world, batch_size=64)
    b = run_forecast(world, batch_size=64)
    assert a.equals(b)
    c = run_forecast(world, batch_size=1)
    assert np.allclose(a[PROBABILITY], c[PROBABILITY], rtol=1e-5, atol=1e-9)
    # histories tokenized a few at a time (bounded memory) give the same answers
    d = run_forecast(world, batch_size=64, histories_per_chunk=3)
    assert np.allclose(a[PROBABILITY], d[PROBABILITY], rtol=1e-5, atol=1e-9)


def test_aggregators():
    logits = torch.tensor([[-2.0, 0.5, 1.0, 9.0], [0.0, -1.0, -3.0, 9.0]])
    ids = torch.tensor([0, 1, 2])  # column 3 is not a condition token
    s = torch.sigmoid(logits[:, :3].double())
    assert torch.allclose(aggregate(logits, ids, "sum_logits"), torch.sigmoid(logits[:, :3].double().sum(1)))
    assert torch.allclose(aggregate(logits, ids, "noisy_or"), 1 - (1 - s).prod(1))
    assert torch.allclose(aggregate(logits, ids, "max"), s.max(1).values)
    assert torch.allclose(aggregate(logits, ids, "logsumexp"), torch.sigmoid(torch.logsumexp(logits[:, :3].double(), 1)))
    # noisy-OR is at least the largest single-token probability
    assert torch.all(aggregate(logits, ids, "noisy_or") >= aggregate(logits, ids, "max"))
    assert query_horizons(1825, True) == [365, 730, 1095, 1460, 1825]


def test_multi_horizon_is_the_mean_of_the_yearly_queries(world):
    labels = read_labels(world["labels"]).filter(pl.col("boolean_value").is_not_null() & (pl.col("horizon_days") == 730))
    multi = run_forecast(world, labels=labels, multi_horizon=True)
    single = {}
    for h in (365, 730):
        single[h] = run_forecast(world, labels=labels.with_columns(horizon_days=pl.lit(h, dtype=pl.Int32)))[PROBABILITY]
    assert np.allclose(multi[PROBABILITY], (single[365] + single[730]) / 2, rtol=1e-6)


def test_query_sees_the_horizon(world):
    """One subject's history, queried at different horizons through the sequence builder, gives different
    risks: the query SEP's day carries the horizon."""
    subject = next(world["tokenizer"].subjects(pl.read_parquet(world["meds"] / "data").filter(pl.col("subject_id") == 3)))
    ids = torch.from_numpy(TASK.condition.token_ids(world["vocab"]))
    risks = score_queries(world["model"], [subject] * 3, [30, 730, 1825], ids, "sum_logits", 63, 8, "cpu")
    assert len(set(np.round(risks, 12))) == 3


def test_query_day_is_the_prediction_day_plus_h_when_that_day_left_no_visit(world):
    """A landmark day that held only removed codes leaves the history's last visit earlier; the label still
    counts onsets in (t, t + H], so the query stays at t + H, not at (last visit + H)."""
    labels = read_labels(world["labels"]).filter(pl.col("boolean_value").is_not_null() & (pl.col("horizon_days") == 730))
    row = labels.sort("subject_id", "prediction_time").head(1)
    sid, t = row["subject_id"][0], row["prediction_time"][0]
    later = t + timedelta(days=10)  # visits are at least 150 days apart: a day of its own
    meds = with_extra_events(world, "removed_only_landmark", [(sid, later - END_OF_DAY + timedelta(hours=9), "ICD10CM//R41.1")])
    # float32: a 10-day shift of the query moves this random model's logits by ~1e-4, below bfloat16's resolution
    fp32 = {"precision": "fp32"}
    moved = run_forecast(world, meds=meds, labels=row.with_columns(prediction_time=pl.lit(later, dtype=pl.Datetime("us"))),
                         **fp32)
    same_day = run_forecast(world, meds=meds, labels=row, **fp32)
    longer = run_forecast(world, meds=meds, labels=row.with_columns(horizon_days=pl.lit(740, dtype=pl.Int32)), **fp32)
    assert moved[PROBABILITY][0] == pytest.approx(longer[PROBABILITY][0], rel=1e-9)
    assert moved[PROBABILITY][0] != pytest.approx(same_day[PROBABILITY][0], rel=1e-9)


def test_a_row_with_no_visit_before_its_prediction_time_is_kept_unscored_and_counted(world):
    """Labels from elsewhere (an ACES task) may predict before a subject's first visit: such a row has no history
    to forecast from, so it keeps its place with a null probability, counted in the info, and nothing else moves."""
    labels = read_labels(world["labels"])
    first = min(r[1] for r in world["rows"] if r[0] == 1 and r[2] == "VISIT//OUTPATIENT")
    early = labels.filter(pl.col("boolean_value").is_not_null()).head(1).with_columns(
        subject_id=pl.lit(1, dtype=pl.Int64), prediction_time=pl.lit(first - timedelta(days=30), dtype=pl.Datetime("us")))
    result = forecast(world["model"], world["vocab"], world["tokenizer"], world["config"].data.query_max_tokens,
                      world["meds"], pl.concat([labels, early]), TASK, ForecastConfig(), model_name="test", progress=False)
    predictions = result.predictions
    unscored = predictions.filter(pl.col(PROBABILITY).is_null())
    assert unscored.select("subject_id", "prediction_time").rows() == early.select("subject_id", "prediction_time").rows()
    assert result.info["rows_without_history"]["rows"] == 1 and result.info["rows_without_history"]["histories"] == 1
    assert predictions.drop_nulls(PROBABILITY).sort("subject_id", "prediction_time", "horizon_days").equals(
        run_forecast(world).sort("subject_id", "prediction_time", "horizon_days"))


# -- bad input ---------------------------------------------------------------------------------------------


def test_labels_for_subjects_not_in_the_data(world):
    labels = read_labels(world["labels"])
    stranger = labels.head(1).with_columns(subject_id=pl.lit(999_999, dtype=pl.Int64))
    with pytest.raises(UserError, match="subject 999999 of the labels is not in the data"):
        run_forecast(world, labels=pl.concat([labels, stranger]))


def test_condition_without_tokens_in_the_vocabulary(world):
    task = Task.from_dict({**TASK.to_dict(), "condition": {"codes": ["SNOMED//26929004"]}})
    with pytest.raises(UserError, match="'condition'"):
        run_forecast(world, task=task)


def test_cli_forecast_and_errors(world, tmp_path, capsys):
    out = tmp_path / "pred"
    assert main(["forecast", str(world["run"]), str(world["meds"]), str(world["labels"]), "--out", str(out),
                 "--device", "cpu"]) == 0
    predictions = pl.read_parquet(out / "predictions.parquet")
    info = json.loads((out / "info.json").read_text())
    assert info["model"] == "run" and info["kind"] == "zero-shot" and info["task"] == "dementia_test"
    assert info["horizons_days"] == [730, 1825]
    assert info["config"]["run_config"]["loss"]["repeat_decay"] == 0.5
    assert predictions["model"].unique().to_list() == ["run"]
    keys = ["task", "horizon_days", "split", "subject_id", "prediction_time"]
    # the driver carries the labels' censoring columns; the scores are the forecast function's
    assert predictions.equals(run_forecast(world).with_columns(model=pl.lit("run")).sort(keys))
    # a run whose vocabulary does not match its tokenizer files
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in world["run"].iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    vocab = json.loads((broken / "vocab.json").read_text())
    vocab["tokens"][-1] = "ICD10CM//Z99.99"
    (broken / "vocab.json").write_text(json.dumps(vocab))
    store = tmp_path / "store"
    write_store(world, store)
    code = main(["occurrence", str(broken), str(store), str(world["labels"] / "task.yaml"), "--out", str(tmp_path / "o"),
                 "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "vocabulary does not match" in err and "Z99.99" in err


# -- occurrence --------------------------------------------------------------------------------------------


def write_store(world, path: Path) -> Path:
    """A token store of the cohort, tokenized with the run's vocabulary."""
    events = pl.read_parquet(world["meds"] / "data")
    splits = pl.DataFrame({"subject_id": list(SPLITS), "split": list(SPLITS.values())})
    sizes = {}
    for split in ("train", "tuning", "held_out"):
        ids = splits.filter(pl.col("split") == split)["subject_id"]
        writer = SplitWriter(path / split)
        part = events.filter(pl.col("subject_id").is_in(ids.implode()))
        if part.height:
            world["tokenizer"].tokenize_frame(part).write(writer)
        sizes[split] = writer.close()
    world["tokenizer"].save(path)
    write_store_info(path, sizes, len(world["vocab"]))
    return path


def test_occurrence_labels_and_prior_occurrence(world, tmp_path):
    store = TokenStore(write_store(world, tmp_path / "store"))
    result = occurrence(world["model"], world["vocab"], store, TASK, OccurrenceConfig(cohort="all"), max_window=64,
                        model_name="test", progress=False)
    p = result.predictions
    assert p["task"].unique().to_list() == ["dementia_test_next_visit"] and p["horizon_days"].unique().to_list() == [0]
    # every visit boundary of every subject once: visits - 1 rows per subject
    events = pl.read_parquet(world["meds"] / "data")
    visits = events.filter(pl.col("time").is_not_null() & (pl.col("code") != "MEDS_BIRTH")).select(
        "subject_id", day=pl.col("time").dt.date()).unique()
    per_subject = visits.group_by("subject_id").len().with_columns(rows=pl.col("len") - 1)
    got = p.group_by("subject_id").len()
    assert dict(got.iter_rows()) == dict(per_subject.select("subject_id", "rows").iter_rows())
    # label = the next visit holds F03; prior = F03 in an earlier visit (from the raw events)
    f03_days = events.filter(pl.col("code") == F03).select("subject_id", f03=pl.col("time").dt.date())
    for sid, f03 in f03_days.iter_rows():
        rows = p.filter(pl.col("subject_id") == sid).sort("prediction_time")
        days = rows["prediction_time"].dt.date().to_list()
        subject_visits = sorted(visits.filter(pl.col("subject_id") == sid)["day"].to_list())
        next_day = {day: subject_visits[i + 1] for i, day in enumerate(subject_visits[:-1])}
        assert rows["boolean_value"].to_list() == [next_day[day] == f03 for day in days]
        assert rows["prior_occurrence"].to_list() == [day >= f03 for day in days]
    assert p.filter(pl.col("prior_occurrence")).height > 0
    # demographics from the store: sex from the first visit's GENDER token, age from the birth day
    assert set(p["sex"].unique()) == {"F", "M"}
    assert p["age_years"].is_between(45, 90).all()
    assert (p.filter(pl.col("subject_id") == 1)["sex"] == "F").all() and (p.filter(pl.col("subject_id") == 2)["sex"] == "M").all()
    assert (p["prediction_time"].dt.time() == (datetime.min + END_OF_DAY).time()).all()
    recent = occurrence(world["model"], world["vocab"], store, TASK, OccurrenceConfig(cohort="all", mode="recent"), max_window=24,
                        model_name="test", progress=False).predictions
    assert 0 < recent.height < p.height


def test_cli_occurrence(world, tmp_path):
    store = write_store(world, tmp_path / "store")
    task_file = world["labels"] / "task.yaml"
    out = tmp_path / "occ"
    assert main(["occurrence", str(world["run"]), str(store), str(task_file), "--out", str(out), "--device", "cpu"]) == 0
    p = pl.read_parquet(out / "predictions.parquet")
    info = json.loads((out / "info.json").read_text())
    assert info["task"] == "dementia_test_next_visit" and "prior_occurrence" in p.columns
    assert p[PROBABILITY].is_between(0, 1).all()


def test_occurrence_drops_removed_codes_as_the_forecast_histories_do(world, tmp_path):
    """A visit that held only remove_from_inputs codes is no visit at all in a forecast history (the events are
    dropped before tokenizing), so occurrence scoring drops it too, and the demographics of a removed first
    visit move to the next one: a store with such visits scores exactly like one tokenized without the codes."""
    removed = "ICD10CM//R41.1"

    def first_visit(sid):
        return min(r[1] for r in world["rows"] if r[0] == sid and r[1] is not None and r[2] != "MEDS_BIRTH")

    extra = [(1, first_visit(1) - timedelta(days=40), removed), (1, first_visit(1) + timedelta(days=3), removed),
             (4, first_visit(4) + timedelta(days=5), removed)]
    with_codes = with_extra_events(world, "removed_only_visits", extra)
    without = write_meds(world["root"] / "no_removed_codes", [[r for r in world["rows"] if r[2] != removed]], SPLITS)
    scored = []
    for name, meds in (("with", with_codes), ("without", without)):
        store = TokenStore(write_store({**world, "meds": meds}, tmp_path / name))
        scored.append(occurrence(world["model"], world["vocab"], store, TASK, OccurrenceConfig(cohort="all"), max_window=64,
                                 model_name="test", progress=False))
    assert scored[0].info["visits_left_empty_by_remove_from_inputs"] == 3
    assert scored[1].info["visits_left_empty_by_remove_from_inputs"] == 0
    assert scored[0].predictions.filter(pl.col("subject_id") == 1).height > 0
    assert scored[0].predictions.equals(scored[1].predictions)


# -- an external cohort ------------------------------------------------------------------------------------


def test_external_cohort_mimic_demo(world, tmp_path):
    """A run fit on other data scores MIMIC-IV demo labels through the command line: codes it never saw
    become UNK, the 22nd-century shifted dates pass (the history is cut at each prediction time, so the
    tokenizer's future-date guard is off), and the condition's tokens come from the run's vocabulary."""
    meds = DATA / "mimic-iv-demo-meds"
    if not meds.is_dir():
        pytest.skip(f"{meds} is absent (third-party test data lives in ../shared/data)")
    from nextvisit.tasks import load_task

    run = tmp_path / "run"
    run.mkdir()
    for path in world["run"].iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    tokenizer_yaml = yaml.safe_load((run / "tokenizer.yaml").read_text())
    tokenizer_yaml["tokenizer"]["max_time"] = "2026-01-01T00:00:00"  # as a store tokenized today records it
    (run / "tokenizer.yaml").write_text(yaml.safe_dump(tokenizer_yaml))
    task = load_task("knee_oa")  # its ICD10CM//M17.1 prefix matches the run's ICD10CM//M17.11 token
    labels = make_labels(meds, task, progress=False)
    write_labels(tmp_path / "labels", labels, task)
    out = tmp_path / "pred"
    assert main(["forecast", str(run), str(meds), str(tmp_path / "labels"), "--out", str(out), "--splits", "all",
                 "--device", "cpu"]) == 0
    predictions = pl.read_parquet(out / "predictions.parquet")
    expected = labels.labels.filter(pl.col("boolean_value").is_not_null())
    assert predictions.height == expected.height > 20
    assert predictions[PROBABILITY].is_between(0, 1).all() and predictions[PROBABILITY].std() > 0


# -- the simulator's oracle writes the same schema from these labels ---------------------------------------


def test_oracle_scores_the_same_label_rows_in_the_same_schema(tmp_path):
    from nextvisit.data.simulate.dataset import simulate
    from nextvisit.baselines.oracle import write_oracle_predictions
    from nextvisit.data.simulate.oracle import OracleConfig
    from nextvisit.tasks import load_task

    meds = tmp_path / "meds"
    simulate(300, meds, seed=3, workers=1, progress=False)
    for name in ("dementia", "knee_oa"):
        task = load_task(name)
        labels = make_labels(meds, task, progress=False)
        write_labels(tmp_path / name, labels, task)
        out = tmp_path / f"{name}_oracle"
        write_oracle_predictions(meds, tmp_path / name, out, config=OracleConfig(n_samples=16), workers=1,
                                 progress=False)
        oracle = pl.read_parquet(out / "predictions.parquet")
        info = json.loads((out / "info.json").read_text())
        assert oracle.columns == ["subject_id", "prediction_time", "boolean_value", "task", "horizon_days", "split",
                                  "age_years", "sex", PROBABILITY, "model", *CARRIED_LABEL_COLUMNS]
        expected = labels.labels.filter(pl.col("boolean_value").is_not_null() & pl.col("split").is_in(["tuning", "held_out"]))
        assert oracle.select("subject_id", "prediction_time", "horizon_days").sort(pl.all()).equals(
            expected.select("subject_id", "prediction_time", "horizon_days").sort(pl.all()))
        # the task's code set and the simulator agree: no labelled landmark already has the condition
        assert info["prevalent_at_time"] == 0


def test_precision_auto_runs_bf16_where_supported_and_stays_near_float32(world):
    from nextvisit.model.run import bf16_supported

    exact = run_forecast(world, precision="fp32")
    fast = run_forecast(world, precision="auto")
    a, b = exact[PROBABILITY].to_numpy(), fast[PROBABILITY].to_numpy()
    if bf16_supported(torch.device("cpu")):
        assert not np.array_equal(a, b)  # the queries really ran in bf16
    np.testing.assert_allclose(b, a, rtol=0.05, atol=1e-3)
    ranks = np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
    assert ranks > 0.99
    with pytest.raises(UserError, match="precision 'half' is unknown"):
        run_forecast(world, precision="half")


def test_history_tokens_override_the_runs_history_length(world):
    from nextvisit.predict.horizon import HorizonQueryModel

    labels = read_labels(world["labels"])
    default = HorizonQueryModel(world["run"], ForecastConfig(), "cpu", progress=False)
    short = HorizonQueryModel(world["run"], ForecastConfig(history_tokens=4), "cpu", progress=False)
    assert short.name == default.name + "[history 4]"
    full = default.score(world["meds"], labels, TASK, ("held_out",)).predictions
    cut = short.score(world["meds"], labels, TASK, ("held_out",)).predictions
    assert cut.height == full.height > 0
    same = run_forecast(world, labels=labels, splits=("held_out",))  # the run's own query_max_tokens
    assert full[PROBABILITY].to_list() == same[PROBABILITY].to_list()
    assert not np.allclose(cut[PROBABILITY].to_numpy(), full[PROBABILITY].to_numpy())  # 4 tokens: the last visit
    with pytest.raises(UserError, match="history tokens 1: must be at least 2"):
        ForecastConfig(history_tokens=1).validate()
