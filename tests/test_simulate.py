"""The synthetic health system: valid MEDS, reproducible, clinically shaped (recurrence, risk factors in the
published directions), and an oracle whose risks match the simulated outcomes within sampling error."""

import json
from datetime import timedelta

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from nextvisit.cli import main
from nextvisit.errors import UserError
from nextvisit.data.simulate import WriteOptions, simulate, simulate_subjects
from nextvisit.data.simulate import dataset as sim_dataset
from nextvisit.data.simulate import engine
from nextvisit.data.simulate.catalog import CONDITIONS
from nextvisit.data.simulate.engine import COND, DAYS_PER_YEAR, TABLES, SimulationConfig
from nextvisit.data.simulate.oracle import OracleConfig, Simulator, oracle_risk, oracle_risks

SMALL = WriteOptions(shard_size=70, chunk_size=35)  # several shards and chunks from a small cohort
NO_LOSS = SimulationConfig(loss_rate=0.0, loss_rate_young=0.0)  # every outcome observed until death or data end


@pytest.fixture(scope="module")
def small_meds(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "meds"
    stats = simulate(160, out, seed=3, workers=1, options=SMALL, progress=False)
    return out, stats


@pytest.fixture(scope="module")
def cohort():
    """3,000 subjects in memory, no loss to follow-up: events as a polars frame."""
    events, final = simulate_subjects(np.arange(1, 3001), 11, NO_LOSS)
    frame = pl.DataFrame({
        "subject_id": events["subject_id"], "day": events["day"],
        "code": np.array(TABLES.book.codes, dtype=object)[events["code"]], "value": events["value"],
    }).with_columns(pl.when(pl.col("day") == sim_dataset.NO_TIME).then(None).otherwise(pl.col("day")).alias("day"))
    return frame, final


def _birth_days(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", pl.col("day").alias("birth_day"))


def _condition_codes(name: str) -> list[str]:
    c = COND[name]
    codes = {TABLES.book.codes[i] for i in TABLES.dx_code[c]}
    codes |= {TABLES.book.codes[i] for i in TABLES.drug_code[TABLES.event_drugs[c]]}
    return sorted(codes)


# -- MEDS validity -------------------------------------------------------------------------------------------

def test_dataset_is_valid_meds(small_meds):
    out, stats = small_meds
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 3  # 160 subjects in shards of at most 70
    seen_subjects = []
    all_codes = set()
    for shard in shards:
        table = pq.read_table(shard)
        meds.DataSchema.validate(table)
        frame = pl.from_arrow(table)
        assert frame["subject_id"].n_unique() <= SMALL.shard_size
        seen_subjects += frame["subject_id"].unique().to_list()
        # contiguous subjects, sorted by time with static rows first
        assert frame["subject_id"].is_sorted()
        key = frame.with_columns(pl.col("time").dt.epoch("us").fill_null(-(2**62)).alias("t"))
        assert key.group_by("subject_id", maintain_order=True).agg(pl.col("t").is_sorted().alias("ok"))["ok"].all()
        timed = frame.filter(pl.col("time").is_not_null())
        assert (timed["time"].dt.epoch("us") % sim_dataset.US_PER_DAY == 0).all()  # midnight
        static = frame.filter(pl.col("time").is_null())["code"]
        assert static.str.contains(r"^(GENDER|RACE|ETHNICITY)//").all()
        per_subject = frame.filter(pl.col("time").is_null()).group_by("subject_id").len()["len"]
        assert (per_subject == 3).all()
        assert (frame.filter(pl.col("code") == "MEDS_BIRTH").group_by("subject_id").len()["len"] == 1).all()
        labs = frame.filter(pl.col("code").str.starts_with("LOINC//"))
        assert labs["numeric_value"].null_count() == 0
        assert frame.filter(~pl.col("code").str.starts_with("LOINC//"))["numeric_value"].null_count() == \
            frame.filter(~pl.col("code").str.starts_with("LOINC//")).height
        assert frame["code"].str.contains(
            r"^(MEDS_BIRTH|MEDS_DEATH|GENDER//|RACE//|ETHNICITY//|VISIT//(OUTPATIENT|EMERGENCY|INPATIENT)$|"
            r"ICD10CM//[A-Z][0-9]|RXNORM//[0-9]+$|LOINC//[0-9]+-[0-9]$|CPT//[0-9]{5}$)").all()
        all_codes |= set(frame["code"].unique().to_list())
        # follow-up never passes the end of data
        assert timed["time"].max().date() <= SimulationConfig().data_end
    assert sorted(seen_subjects) == list(range(1, 161))  # each subject in exactly one shard
    codes = pq.read_table(out / "metadata" / "codes.parquet")
    meds.CodeMetadataSchema.validate(codes)
    described = pl.from_arrow(codes)
    assert all_codes <= set(described["code"].to_list())
    assert described["description"].str.len_chars().min() > 3
    splits = pq.read_table(out / "metadata" / "subject_splits.parquet")
    meds.SubjectSplitSchema.validate(splits)
    split_frame = pl.from_arrow(splits)
    assert sorted(split_frame["subject_id"].to_list()) == list(range(1, 161))
    shares = split_frame["split"].value_counts(normalize=True)
    share = dict(zip(shares["split"], shares["proportion"]))
    assert set(share) == {"train", "tuning", "held_out"} and 0.7 < share["train"] < 0.9
    dataset = json.loads((out / "metadata" / "dataset.json").read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    simulator = json.loads((out / "metadata" / "simulator.json").read_text())
    assert simulator["seed"] == 3 and simulator["simulator_version"] == sim_dataset.SIMULATOR_VERSION
    assert stats["subjects"] == 160


def test_splits_are_80_10_10_on_a_large_cohort():
    u = np.random.default_rng(0).random(100_000)
    names, counts = np.unique(sim_dataset.split_of(u), return_counts=True)
    share = dict(zip(names, counts / counts.sum()))
    assert abs(share["train"] - 0.8) < 0.01 and abs(share["tuning"] - 0.1) < 0.01


# -- reproducibility ------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes_whatever_the_workers(small_meds, tmp_path):
    out, _ = small_meds
    again = tmp_path / "again"
    simulate(160, again, seed=3, workers=2, options=SMALL, progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    simulate(160, other, seed=4, workers=1, options=SMALL, progress=False)
    assert (other / "data" / "0.parquet").read_bytes() != (out / "data" / "0.parquet").read_bytes()


def test_a_subject_does_not_depend_on_its_batch(small_meds):
    out, _ = small_meds
    data = pl.read_parquet(out / "data" / "1.parquet").filter(pl.col("subject_id") == 100)
    events, _ = simulate_subjects(np.array([100]), 3, SimulationConfig())
    alone = pl.from_arrow(sim_dataset.events_table(events))
    assert alone.equals(data)


# -- clinical shape -------------------------------------------------------------------------------------------

def test_scale_visits_and_codes_per_visit(cohort):
    frame, _ = cohort
    visits = frame.filter(pl.col("code").str.starts_with("VISIT//"))
    per_subject = visits.group_by("subject_id").len()["len"]
    assert 10 <= per_subject.median() <= 40
    codes = frame.filter(pl.col("day").is_not_null() & ~pl.col("code").is_in(["MEDS_BIRTH", "MEDS_DEATH"]))
    per_visit = codes.unique(["subject_id", "day", "code"]).height / visits.height
    assert 8 <= per_visit <= 16
    kinds = visits["code"].value_counts(normalize=True)
    share = dict(zip(kinds["code"], kinds["proportion"]))
    assert share["VISIT//OUTPATIENT"] > 0.8 and share["VISIT//EMERGENCY"] > 0.02 and share["VISIT//INPATIENT"] > 0.005


def test_chronic_codes_recur_at_later_visits(cohort):
    frame, _ = cohort
    chronic = {TABLES.book.codes[i] for c in range(len(CONDITIONS)) for i in TABLES.dx_code[c]}
    occurrences = frame.filter(pl.col("code").is_in(sorted(chronic))).unique(["subject_id", "day", "code"])
    first = occurrences.group_by("subject_id", "code").agg(pl.len().alias("n"))
    repeat_share = 1 - first.height / occurrences.height
    assert repeat_share > 0.6, repeat_share  # most chronic-code occurrences are repeats, not onsets
    # after a hypertension diagnosis, I10 is coded at most later outpatient visits
    dx = occurrences.filter(pl.col("code") == "ICD10CM//I10").group_by("subject_id").agg(pl.col("day").min().alias("dx"))
    later = (frame.filter(pl.col("code") == "VISIT//OUTPATIENT").join(dx, on="subject_id")
             .filter(pl.col("day") > pl.col("dx")))
    coded = later.join(occurrences.filter(pl.col("code") == "ICD10CM//I10").select("subject_id", "day"),
                       on=["subject_id", "day"], how="semi")
    assert coded.height / later.height > 0.5
    # drugs repeat too
    metformin = frame.filter(pl.col("code") == "RXNORM//6809").group_by("subject_id").len()["len"]
    assert metformin.mean() > 3


def test_labs_follow_the_latent_state(cohort):
    frame, _ = cohort
    hba1c = frame.filter(pl.col("code") == "LOINC//4548-4")
    diabetic = frame.filter(pl.col("code").is_in(["ICD10CM//E11.9", "ICD10CM//E11.65"]))["subject_id"].unique()
    with_dm = hba1c.filter(pl.col("subject_id").is_in(diabetic.implode()))["value"].mean()
    without = hba1c.filter(~pl.col("subject_id").is_in(diabetic.implode()))["value"].mean()
    assert with_dm > without + 1.0
    egfr = frame.filter(pl.col("code") == "LOINC//33914-3").join(_birth_days(frame), on="subject_id")
    egfr = egfr.with_columns(((pl.col("day") - pl.col("birth_day")) / 365.25).alias("age"))
    assert egfr.filter(pl.col("age") > 75)["value"].mean() < egfr.filter(pl.col("age") < 45)["value"].mean() - 20


def test_hazards_move_in_the_published_directions():
    st, _ = engine.new_subjects(np.arange(1, 3), 0, SimulationConfig())
    base = st.take([0, 0])
    base.stage[:] = 0
    base.bmi[:] = 25.0
    base.frailty[:] = base.cognitive[:] = base.knee[:] = 0.0
    base.male[:] = False
    cfg = SimulationConfig()

    def rate(condition, age=70.0, **change):
        s = base.copy()
        for name, value in change.items():
            if name in COND:
                s.stage[:, COND[name]] = value
            else:
                getattr(s, name)[:] = value
        s.base_log_hazard = engine._base_log_hazard(s, cfg)
        return engine._onset_rates(s, np.full(2, age), cfg)[0, COND[condition]]

    assert rate("dementia", 85) > rate("dementia", 75) > rate("dementia", 65)
    for factor in ("hypertension", "type2_diabetes", "depression", "hearing_loss", "stroke", "atrial_fibrillation", "mci"):
        assert rate("dementia", **{factor: 3}) > rate("dementia"), factor
    assert rate("knee_oa", 70) > rate("knee_oa", 50)
    assert rate("knee_oa", bmi=35.0) > 1.5 * rate("knee_oa")
    assert rate("knee_oa", male=True) < rate("knee_oa")
    assert rate("knee_oa", knee_injury=3) > 2 * rate("knee_oa")


def _incidence(frame: pl.DataFrame, condition: str) -> pl.DataFrame:
    """Per subject: first visit day, follow-up end, first condition day (if any), age and BMI at first visit."""
    visits = frame.filter(pl.col("code").str.starts_with("VISIT//"))
    span = visits.group_by("subject_id").agg(pl.col("day").min().alias("start"))
    end = frame.filter(pl.col("day").is_not_null() & (pl.col("code") != "MEDS_BIRTH")).group_by("subject_id").agg(
        pl.col("day").max().alias("end"))
    onset = frame.filter(pl.col("code").is_in(_condition_codes(condition))).group_by("subject_id").agg(
        pl.col("day").min().alias("onset"))
    bmi = frame.filter(pl.col("code") == "LOINC//39156-5").sort("day").group_by("subject_id").agg(
        pl.col("value").first().alias("bmi"))
    out = (span.join(end, on="subject_id").join(onset, on="subject_id", how="left").join(_birth_days(frame), on="subject_id")
           .join(bmi, on="subject_id", how="left")
           .with_columns(((pl.col("start") - pl.col("birth_day")) / 365.25).alias("age"))
           .filter(pl.col("onset").is_null() | (pl.col("onset") > pl.col("start"))))  # incident only
    return out.with_columns(
        ((pl.col("onset").fill_null(pl.col("end")) - pl.col("start")) / 365.25).alias("years"),
        pl.col("onset").is_not_null().alias("case"))


def test_incidence_rises_with_age_for_dementia_and_with_obesity_for_knee_oa(cohort):
    frame, _ = cohort
    dementia = _incidence(frame, "dementia")
    rates = []
    for low, high in ((50, 65), (65, 80), (80, 120)):
        band = dementia.filter((pl.col("age") >= low) & (pl.col("age") < high))
        rates.append(band["case"].sum() / band["years"].sum())
    assert rates[0] < rates[1] < rates[2], rates
    knee = _incidence(frame, "knee_oa").filter(pl.col("age") >= 45)
    obese = knee.filter(pl.col("bmi") >= 30)
    lean = knee.filter(pl.col("bmi") < 30)
    obese_rate = obese["case"].sum() / obese["years"].sum()
    lean_rate = lean["case"].sum() / lean["years"].sum()
    assert obese_rate > 1.4 * lean_rate, (obese_rate, lean_rate)
    # enough incident cases to learn from: several per thousand subjects
    assert dementia["case"].sum() >= 40 and knee["case"].sum() >= 50


def test_prodromes_precede_dementia(cohort):
    frame, _ = cohort
    dementia = _incidence(frame, "dementia").filter(pl.col("case"))
    memory = frame.filter(pl.col("code").is_in(["ICD10CM//R41.3", "ICD10CM//R41.81", "ICD10CM//F06.70"]))
    before = memory.join(dementia.select("subject_id", "onset"), on="subject_id").filter(pl.col("day") < pl.col("onset"))
    share_cases = before["subject_id"].n_unique() / dementia.height
    others = frame.filter(~pl.col("subject_id").is_in(dementia["subject_id"].implode()))
    share_others = memory.filter(pl.col("subject_id").is_in(others["subject_id"].unique().implode()))[
        "subject_id"].n_unique() / others["subject_id"].n_unique()
    assert share_cases > 3 * share_others  # learnable ...
    assert share_cases < 0.9  # ... but far from trivial


# -- the oracle -----------------------------------------------------------------------------------------------

def _subject_times(frame: pl.DataFrame, horizon: int, seed: int = 0) -> pl.DataFrame:
    """One landmark visit per subject aged 55+, chosen causally: a day drawn independently of the record (between
    age 55 and the end of data less the horizon), then the subject's first visit on or after it. Choosing among
    all of a subject's visits instead would look ahead: subjects whose later diagnosis brings more visits have
    each earlier visit chosen less often, which leaves too few onsets after the landmarks (observed 345 against
    the oracle's 415 over 15,000 subjects, while this choice gave 241 vs 229 and 363 vs 370)."""
    end = engine.day_of(SimulationConfig().data_end)
    births = _birth_days(frame).sort("subject_id")
    earliest = births["birth_day"].to_numpy() + int(55 * DAYS_PER_YEAR)
    latest = end - horizon
    u = np.random.default_rng(seed).random(births.height)
    cut = births.with_columns(pl.Series("cut", (earliest + u * np.maximum(latest - earliest, 0)).astype(np.int64)))
    cut = cut.filter(pl.Series(earliest < latest))
    visits = frame.filter(pl.col("code").str.starts_with("VISIT//")).select("subject_id", "day").unique()
    first_after = (visits.join(cut, on="subject_id").filter(pl.col("day") >= pl.col("cut"))
                   .group_by("subject_id").agg(pl.col("day").min()))
    return first_after.filter(pl.col("day") <= latest).sort("subject_id")


def _outcomes(frame: pl.DataFrame, times: pl.DataFrame, condition: str, horizon: int) -> pl.DataFrame:
    """Label each (subject, day): prevalent, or first code within (day, day + horizon]."""
    codes = frame.filter(pl.col("code").is_in(_condition_codes(condition))).group_by("subject_id").agg(
        pl.col("day").min().alias("first"))
    return (times.join(codes, on="subject_id", how="left")
            .with_columns((pl.col("first") <= pl.col("day")).fill_null(False).alias("prevalent"),
                          ((pl.col("first") > pl.col("day")) & (pl.col("first") <= pl.col("day") + horizon))
                          .fill_null(False).alias("outcome")))


def test_oracle_is_calibrated_against_simulated_outcomes(cohort):
    """Bins of predicted risk vs observed first-onset frequency (dementia and knee OA, 2 years), on the
    simulated record itself. Bins are formed from one Monte Carlo estimate and compared with an independent
    one, so the Monte Carlo noise does not bias the bins."""
    frame, _ = cohort
    horizon = 730
    times = _subject_times(frame, horizon)
    sim = Simulator(seed=11, config=NO_LOSS)
    rows = []
    for condition in ("dementia", "knee_oa"):
        labelled = _outcomes(frame, times, condition, horizon).filter(~pl.col("prevalent"))
        rows.append(labelled.with_columns(pl.lit(condition).alias("condition")))
    rows = pl.concat(rows)
    assert rows.height > 1500
    args = (rows["subject_id"].to_numpy(), rows["day"].to_numpy(), rows["condition"].to_list(), [horizon] * rows.height)
    binning, prevalent = oracle_risks(sim, *args, config=OracleConfig(n_samples=24), progress=False)
    assert not prevalent.any()  # the oracle and the record agree on who already has the condition
    risk, _ = oracle_risks(sim, *args, config=OracleConfig(n_samples=24, stream=1), progress=False)
    observed = rows["outcome"].to_numpy().astype(float)
    assert observed.sum() >= 40
    # calibration in the large
    z = (observed.sum() - risk.sum()) / np.sqrt(np.sum(risk * (1 - risk)) + 1e-9)
    assert abs(z) < 3.5, z
    # by bins of predicted risk
    edges = np.quantile(binning, [0.5, 0.8, 0.95])
    bins = np.searchsorted(edges, binning, side="right")
    for b in range(len(edges) + 1):
        inside = bins == b
        if inside.sum() < 30:
            continue
        expected = risk[inside].sum()
        se = np.sqrt(np.sum(risk[inside] * (1 - risk[inside])) + np.sum(risk[inside] * (1 - risk[inside])) / 24 + 1e-9)
        assert abs(observed[inside].sum() - expected) < 3.5 * se + 1, (b, observed[inside].sum(), expected, se)
    # and it discriminates far better than chance
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(observed, risk) > 0.7


def test_oracle_agrees_with_the_record_on_prevalence_and_death(cohort):
    frame, final = cohort
    sim = Simulator(seed=11, config=NO_LOSS)
    cases = frame.filter(pl.col("code").is_in(_condition_codes("dementia"))).group_by("subject_id").agg(
        pl.col("day").min().alias("first")).sort("subject_id")
    subject, first = cases.row(0)
    config = OracleConfig(n_samples=16)
    assert oracle_risk(sim, subject, first, "dementia", 365, config=config) == 0.0  # recorded at that day
    # the day before the first record, the onset is underway: the risk is high
    visits = frame.filter((pl.col("subject_id") == subject) & pl.col("code").str.starts_with("VISIT//")
                          & (pl.col("day") < first))["day"]
    if len(visits):
        assert oracle_risk(sim, subject, int(visits.max()), "dementia", 3650, config=config) > 0.0
    dead = frame.filter(pl.col("code") == "MEDS_DEATH").row(0, named=True)
    with pytest.raises(UserError, match="died"):
        oracle_risk(sim, dead["subject_id"], dead["day"] + 1, "dementia", 365, config=config)
    with pytest.raises(UserError, match="condition"):
        oracle_risk(sim, 1, 17000, "influenza", 365, config=config)


# -- command line and bad input -------------------------------------------------------------------------------

def test_refuses_non_empty_out_and_leaves_it_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["simulate", "--subjects", "5", "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only a folder nextvisit wrote: the user's own files are never deleted
    assert main(["simulate", "--subjects", "5", "--out", str(out), "--workers", "1", "--overwrite"]) == 2
    assert "not a folder nextvisit wrote" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(["simulate", "--subjects", "5", "--out", str(out), "--workers", "1"]) == 0
    (out / "metadata" / "codes.parquet").unlink()
    assert main(["simulate", "--subjects", "5", "--out", str(out), "--workers", "1", "--overwrite"]) == 0
    assert (out / "metadata" / "codes.parquet").exists()  # a new dataset in place of the one nextvisit wrote
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_refuses_unwritable_out_and_bad_numbers(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["simulate", "--subjects", "5", "--out", str(blocker / "sub"), "--workers", "1"]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["simulate", "--subjects", "5", "--out", str(blocker), "--workers", "1"]) == 2
    assert "file" in capsys.readouterr().err
    assert main(["simulate", "--subjects", "5", "--out", str(tmp_path / "x"), "--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            main(["simulate", "--subjects", bad, "--out", str(tmp_path / "y")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(job)

    original = sim_dataset._chunk_job
    monkeypatch.setattr(sim_dataset, "_chunk_job", failing)
    with pytest.raises(KeyboardInterrupt):
        simulate(80, tmp_path / "out", workers=1, options=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def _labels(meds_dir, task: str) -> pl.DataFrame:
    frame = pl.read_parquet(meds_dir / "data").filter(pl.col("code").str.starts_with("VISIT//"))
    picked = frame.group_by("subject_id").agg(pl.col("time").min()).sort("subject_id").head(12)
    splits = pl.read_parquet(meds_dir / "metadata" / "subject_splits.parquet")
    n = picked.height
    return picked.join(splits, on="subject_id").select(
        "subject_id", (pl.col("time") + timedelta(days=1) - timedelta(microseconds=1)).alias("prediction_time"),
        pl.Series("boolean_value", [None if i % 4 == 0 else i % 3 == 0 for i in range(n)], dtype=pl.Boolean),
        pl.Series("reason", ["censored_lost_to_followup" if i % 4 == 0 else "negative" for i in range(n)]),
        pl.lit(task).alias("task"), pl.lit(730, dtype=pl.Int32).alias("horizon_days"),
        pl.lit("held_out").alias("split"), pl.lit(70.0).alias("age_years"), pl.lit("F").alias("sex"))


def test_oracle_command_writes_predictions_for_labelled_rows(small_meds, tmp_path):
    meds_dir, _ = small_meds
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    labels = _labels(meds_dir, "knee_oa")
    labels.write_parquet(labels_dir / "labels.parquet")
    pred = tmp_path / "pred"
    assert main(["oracle", str(meds_dir), str(labels_dir), "--out", str(pred), "--samples", "8"]) == 0
    predictions = pl.read_parquet(pred / "predictions.parquet")
    assert predictions.height == labels["boolean_value"].is_not_null().sum()
    assert predictions["predicted_boolean_probability"].dtype == pl.Float64
    assert predictions["predicted_boolean_probability"].is_between(0, 1).all()
    assert set(predictions["model"]) == {"oracle"}
    info = json.loads((pred / "info.json").read_text())
    assert info["kind"] == "oracle" and info["model"] == "oracle" and info["task"] == "knee_oa"
    censored = sum(split["censored"] for horizons in info["label_counts"].values() for split in horizons.values())
    assert censored == labels["boolean_value"].null_count()
    # a non-empty --out is refused without --overwrite
    assert main(["oracle", str(meds_dir), str(labels_dir), "--out", str(pred)]) == 2


def test_oracle_refuses_unknown_tasks_and_foreign_datasets(small_meds, tmp_path, capsys):
    meds_dir, _ = small_meds
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    _labels(meds_dir, "copd").write_parquet(labels_dir / "labels.parquet")
    assert main(["oracle", str(meds_dir), str(labels_dir), "--out", str(tmp_path / "p")]) == 2
    assert "copd" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    (foreign / "metadata").mkdir(parents=True)
    assert main(["oracle", str(foreign), str(labels_dir), "--out", str(tmp_path / "p")]) == 2
    assert "nextvisit simulate" in capsys.readouterr().err
    (labels_dir / "labels.parquet").write_bytes(b"damaged")
    assert main(["oracle", str(meds_dir), str(labels_dir), "--out", str(tmp_path / "p")]) == 2
    assert "labels.parquet: not a readable parquet file" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
