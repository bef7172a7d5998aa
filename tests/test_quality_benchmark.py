"""The quality benchmark (benchmarks/quality.py): stages cached by their inputs, the two simulated populations
(and the simulate options they rest on), and the table's figures from hand-made predictions."""

import json
import sys
from datetime import datetime, timedelta
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the benchmarks package lives beside src/, not inside it
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import quality  # noqa: E402
from nextvisit.artifacts.predictions import COUNT_FEATURES, ORACLE, ZERO_SHOT, prediction_frame, write_predictions  # noqa: E402
from nextvisit.cli import main  # noqa: E402
from nextvisit.data.simulate.dataset import events_table, simulate_subjects  # noqa: E402
from nextvisit.data.simulate.engine import SimulationConfig  # noqa: E402
from nextvisit.data.simulate.oracle import Simulator, oracle_risks  # noqa: E402
from nextvisit.errors import UserError  # noqa: E402

TRAIN_SUBJECTS, EVAL_SUBJECTS = 300, 300


# -- stages -------------------------------------------------------------------------------------------------

def test_stage_hash_follows_arguments_and_upstream_stages_only(tmp_path):
    def stage(name, args, work=tmp_path, **inputs):
        return quality.Stage(name=name, args=args, inputs=inputs, work=work)

    sim = stage("simulate_train", {"subjects": 100, "seed": 0})
    assert sim.hash == stage("simulate_train", {"seed": 0, "subjects": 100}).hash  # key order is not an argument
    assert sim.hash == stage("simulate_train", {"subjects": 100, "seed": 0}, work=tmp_path / "elsewhere").hash
    assert sim.hash != stage("simulate_train", {"subjects": 101, "seed": 0}).hash
    assert sim.folder == tmp_path / f"simulate_train-{sim.hash}" and sim.out == sim.folder / "out"

    labels = stage("label_dementia", {"task": "dementia"}, meds=sim)
    same_upstream = stage("label_dementia", {"task": "dementia"}, meds=stage("simulate_train", {"subjects": 100, "seed": 0}))
    other_upstream = stage("label_dementia", {"task": "dementia"}, meds=stage("simulate_train", {"subjects": 100, "seed": 1}))
    assert labels.hash == same_upstream.hash
    assert labels.hash != other_upstream.hash
    assert labels.hash != stage("label_dementia", {"task": "knee_oa"}, meds=sim).hash
    # a change two stages up reaches the forecast through its inputs' hashes
    forecast = stage("forecast", {"aggregator": "sum_logits"}, labels=labels)
    assert forecast.hash != stage("forecast", {"aggregator": "sum_logits"}, labels=other_upstream).hash
    assert forecast.hash == stage("forecast", {"aggregator": "sum_logits"}, labels=same_upstream).hash


def test_a_finished_stage_is_skipped_and_an_unfinished_one_redone(tmp_path, capsys):
    runner = quality.Runner(tmp_path, rerun="python -m benchmarks.quality")
    calls = []

    def action(out):
        calls.append(out)
        out.mkdir()
        (out / "result.txt").write_text("done")

    stage = runner.stage("combine", {"rule": "x"})
    assert runner.python(stage, "combine", action, "combine") == stage.out
    assert len(calls) == 1 and stage.complete and (stage.folder / quality.STAGE_FILE).is_file()
    runner.python(stage, "combine", action, "combine")
    assert len(calls) == 1  # skipped
    assert "finished before, skipped" in capsys.readouterr().out
    assert runner.timings[-1][1] == "cached"

    # interrupted: the folder is there without the completion marker; it is removed and the stage redone
    (stage.folder / quality.COMPLETE).unlink()
    (stage.out / "half-written.tmp").write_text("")
    runner.python(stage, "combine", action, "combine")
    assert len(calls) == 2 and stage.complete and not (stage.out / "half-written.tmp").exists()
    assert "left unfinished" in capsys.readouterr().out

    # a failing stage names itself and how to rerun it, and stays unfinished
    def failing(out):
        raise UserError("no such input")

    broken = runner.stage("age_sex_dementia", {})
    with pytest.raises(UserError, match=r"(?s)age_sex_dementia-[0-9a-f]{12}.*no such input\s+rerun it with: python -m benchmarks.quality"):
        runner.python(broken, "age-sex reference dementia", failing, "age_sex")
    assert broken.folder.exists() and not broken.complete


def test_a_failing_command_stage_names_the_command_to_rerun_it(tmp_path):
    runner = quality.Runner(tmp_path, rerun="unused")
    stage = runner.stage("label_dementia", {"task": "dementia"})
    with pytest.raises(UserError, match=r"(?s)label_dementia-[0-9a-f]{12}.*failed \(exit 2\).*nextvisit label .*missing-meds dementia --out"):
        runner.cli(stage, "label dementia", ["label", tmp_path / "missing-meds", "dementia", "--out", stage.out],
                   files={"note.yaml": "a: 1\n"})
    assert not stage.complete and (stage.folder / "note.yaml").read_text() == "a: 1\n"


# -- populations and the simulate options they use ---------------------------------------------------------

@pytest.fixture(scope="module")
def populations(tmp_path_factory):
    root = tmp_path_factory.mktemp("populations")
    train, evaluation = root / "train", root / "eval"
    assert main(["simulate", "--subjects", str(TRAIN_SUBJECTS), "--seed", "0", "--out", str(train), "--workers", "1"]) == 0
    assert main(["simulate", "--subjects", str(EVAL_SUBJECTS), "--seed", "1", "--first-subject-id",
                 str(TRAIN_SUBJECTS + 1), "--split", "held_out", "--out", str(evaluation), "--workers", "1"]) == 0
    combined = root / "combined"
    summary = quality.combine_populations(train, evaluation, combined)
    return train, evaluation, combined, summary


def test_simulate_first_subject_id_and_split(populations):
    _, evaluation, _, _ = populations
    data = pl.read_parquet(evaluation / "data" / "0.parquet")
    ids = data["subject_id"].unique().sort().to_list()
    assert ids == list(range(TRAIN_SUBJECTS + 1, TRAIN_SUBJECTS + EVAL_SUBJECTS + 1))
    splits = pl.read_parquet(evaluation / "metadata" / "subject_splits.parquet")
    assert splits.height == EVAL_SUBJECTS and set(splits["split"]) == {meds.held_out_split}
    simulator = json.loads((evaluation / "metadata" / "simulator.json").read_text())
    assert simulator["subject_ids"] == [TRAIN_SUBJECTS + 1, TRAIN_SUBJECTS + EVAL_SUBJECTS]
    assert simulator["split"] == meds.held_out_split and simulator["n_subjects"] == EVAL_SUBJECTS
    # a subject's record depends only on (seed, id): the same as simulating those ids directly
    first_ids = np.arange(TRAIN_SUBJECTS + 1, TRAIN_SUBJECTS + 6)
    events, _ = simulate_subjects(first_ids, 1, SimulationConfig())
    expected = pl.from_arrow(events_table(events))
    assert data.filter(pl.col("subject_id").is_in(first_ids.tolist())).equals(expected)


def test_oracle_agrees_on_a_folder_with_shifted_ids(populations, capsys):
    _, evaluation, _, _ = populations
    subject = TRAIN_SUBJECTS + 7
    data = pl.read_parquet(evaluation / "data" / "0.parquet").filter(pl.col("subject_id") == subject)
    day = int(data.filter(pl.col("code").str.starts_with("VISIT//"))["time"].min().timestamp() // 86_400) + 365
    from_folder, _ = oracle_risks(evaluation, [subject], [day], ["dementia"], [1825], progress=False)
    # the same subject re-created without the folder (no id range to check)
    direct, _ = oracle_risks(Simulator(seed=1, config=SimulationConfig()), [subject], [day], ["dementia"], [1825],
                             progress=False)
    assert from_folder[0] == direct[0]
    with pytest.raises(UserError, match=f"subject_id 5 is not in the simulated dataset \\(subjects {TRAIN_SUBJECTS + 1}\\.\\."):
        oracle_risks(evaluation, [5], [day], ["dementia"], [730], progress=False)
    with pytest.raises(SystemExit):
        main(["simulate", "--subjects", "10", "--first-subject-id", "0", "--out", "unused"])
    assert "--first-subject-id: must be at least 1" in capsys.readouterr().err


def test_combined_population_evaluates_only_the_evaluation_population(populations):
    train, evaluation, combined, summary = populations
    splits = pl.read_parquet(combined / "metadata" / "subject_splits.parquet")
    eval_ids = set(pl.read_parquet(evaluation / "metadata" / "subject_splits.parquet")["subject_id"])
    train_splits = pl.read_parquet(train / "metadata" / "subject_splits.parquet")
    held_out = set(splits.filter(pl.col("split") == meds.held_out_split)["subject_id"])
    assert held_out == eval_ids  # every evaluation subject, and no train-population subject
    assert splits.height == TRAIN_SUBJECTS + EVAL_SUBJECTS and splits["subject_id"].n_unique() == splits.height
    moved = train_splits.filter(pl.col("split") == meds.held_out_split)["subject_id"].to_list()
    assert moved and set(splits.filter(pl.col("subject_id").is_in(moved))["split"]) == {meds.tuning_split}
    assert summary[quality.TRAIN_POPULATION]["held_out_moved_to_tuning"] == len(moved)
    kept = train_splits.filter(pl.col("split") != meds.held_out_split)
    assert kept.join(splits, on="subject_id").filter(pl.col("split") != pl.col("split_right")).height == 0
    shards = sorted((combined / "data").rglob("*.parquet"))
    assert len(shards) == 2 and all(s.is_symlink() and s.resolve().is_file() for s in shards)
    assert not (combined / "metadata" / "simulator.json").exists()  # the oracle reads the evaluation folder
    codes = pl.read_parquet(combined / "metadata" / "codes.parquet")["code"]
    for part in (train, evaluation):
        assert set(pl.read_parquet(part / "metadata" / "codes.parquet")["code"]) <= set(codes)
    # the stages downstream read it as any MEDS folder; the held-out label rows are the evaluation population's
    labels = combined.parent / "labels"
    assert main(["label", str(combined), "knee_oa", "--out", str(labels)]) == 0
    rows = pl.read_parquet(labels / "labels.parquet")
    assert set(rows.filter(pl.col("split") == meds.held_out_split)["subject_id"]) <= eval_ids
    held = combined.parent / "held_out_labels"
    assert quality.write_held_out_labels(labels, held) == rows.filter(pl.col("split") == meds.held_out_split).height
    assert set(pl.read_parquet(held / "labels.parquet")["split"]) == {meds.held_out_split}


def test_combine_refuses_overlapping_or_split_populations(populations, tmp_path):
    train, _, _, _ = populations
    with pytest.raises(UserError, match="split 'train'|share"):
        quality.combine_populations(train, train, tmp_path / "out")


# -- the table ----------------------------------------------------------------------------------------------

def _predictions(tmp_path: Path, name: str, kind: str, scores: np.ndarray, rows: pl.DataFrame) -> quality.TableModel:
    out = tmp_path / name
    write_predictions(out, prediction_frame(rows, scores, name), {"model": name, "kind": kind})
    table_kind = {ZERO_SHOT: quality.ZERO_SHOT, ORACLE: quality.ORACLE, COUNT_FEATURES: quality.COUNT}[kind]
    return quality.TableModel(name, table_kind, out, {"steps": 10} if kind == ZERO_SHOT else {})


@pytest.fixture
def hand_made(tmp_path):
    rng = np.random.default_rng(0)
    n_subjects, per_subject = 400, 2
    subject = np.repeat(np.arange(1, n_subjects + 1), per_subject)
    n = len(subject)
    risk = rng.random(n)
    labels = rng.random(n) < 0.1 + 0.5 * risk * (risk > 0.7)
    base = datetime(2018, 1, 1)
    rows = pl.DataFrame({
        "subject_id": subject, "prediction_time": [base + timedelta(days=400 * (i % per_subject)) for i in range(n)],
        "boolean_value": labels, "task": ["dementia"] * n, "horizon_days": [730] * n,
        "split": ["held_out"] * n, "age_years": 50 + 40 * rng.random(n), "sex": rng.choice(["F", "M"], n),
    })
    zero_shot = risk + 0.3 * rng.standard_normal(n)
    models = [
        _predictions(tmp_path, "nextvisit", ZERO_SHOT, zero_shot, rows),
        _predictions(tmp_path, "same_as_nextvisit", COUNT_FEATURES, zero_shot.copy(), rows),
        _predictions(tmp_path, "noise", COUNT_FEATURES, rng.random(n), rows),
        _predictions(tmp_path, "oracle", ORACLE, risk, rows),
    ]
    return models, rows, {"zero_shot": zero_shot, "risk": risk}


def test_table_rows_have_the_required_keys_and_values(hand_made):
    models, rows, scores = hand_made
    table, warnings = quality.quality_rows(models, n_bootstrap=200, seed=0, zero_shot_reference="nextvisit")
    assert len(table) == 4
    required = {"model", "kind", "task", "horizon_days", "auroc", "auroc_low", "auroc_high", "age_sex_auroc",
                "positive_subjects", "budget", "oracle_share", "difference_vs_zero_shot"}
    assert all(required <= set(r) for r in table)
    by = {r["model"]: r for r in table}
    labels = rows["boolean_value"].to_numpy()
    zero_shot_auroc = roc_auc_score(labels, scores["zero_shot"])
    oracle_auroc = roc_auc_score(labels, scores["risk"])
    assert by["nextvisit"]["auroc"] == pytest.approx(zero_shot_auroc)
    assert by["nextvisit"]["auroc_low"] < zero_shot_auroc < by["nextvisit"]["auroc_high"]
    assert by["oracle"]["auroc"] == pytest.approx(oracle_auroc)
    assert by["nextvisit"]["oracle_share"] == pytest.approx((zero_shot_auroc - 0.5) / (oracle_auroc - 0.5))
    assert by["oracle"]["oracle_share"] is None  # the oracle is the reference
    assert by["nextvisit"]["kind"] == "zero-shot" and by["oracle"]["kind"] == "oracle"
    assert by["nextvisit"]["budget"] == {"steps": 10}
    positive_subjects = rows.filter(pl.col("boolean_value"))["subject_id"].n_unique()
    assert all(r["positive_subjects"] == positive_subjects for r in table)
    assert all(r["rows"] == rows.height for r in table)
    # paired differences: an identical model differs by exactly 0 in every resample
    same = by["same_as_nextvisit"]
    assert same["difference_vs_zero_shot"] == 0 and same["difference_vs_zero_shot_low"] == 0
    assert same["difference_vs_zero_shot_high"] == 0 and same["zero_shot_reference"] == "nextvisit"
    assert by["nextvisit"]["difference_vs_zero_shot"] is None  # the reference itself
    noise = by["noise"]
    assert noise["difference_vs_zero_shot"] == pytest.approx(zero_shot_auroc - noise["auroc"])
    assert noise["difference_vs_zero_shot_low"] > 0  # a real model beats noise on the same resamples
    # the interval is the one `nextvisit evaluate` gives: same resamples, same percentile rule
    assert 0.4 < by["nextvisit"]["age_sex_auroc"] < 1
    assert any("fewer than the 300" in w for w in warnings)
    text = quality.format_table(table, "fixed steps")
    assert "nextvisit" in text and "oracle" in text and "Budget rule: fixed steps" in text
    json.dumps(table)  # strict JSON: no NaN objects


def test_table_interval_matches_nextvisit_evaluate(hand_made, tmp_path):
    from nextvisit.evaluate.bootstrap import percentile_interval, rng_for, subject_bootstrap, View

    models, rows, scores = hand_made
    table, _ = quality.quality_rows(models[:1], n_bootstrap=200, seed=3)
    labels = rows["boolean_value"].to_numpy()
    boot = subject_bootstrap(labels, scores["zero_shot"], rows["subject_id"].to_numpy(), 200, 2_000_000,
                             rng_for(3, "dementia", 730, "all"), {"sample": View()})
    assert (table[0]["auroc_low"], table[0]["auroc_high"]) == percentile_interval(boot.get("sample.auroc"), 0.95)


def test_table_refuses_models_scored_on_different_rows(hand_made, tmp_path):
    models, rows, scores = hand_made
    fewer = _predictions(tmp_path, "fewer", COUNT_FEATURES, scores["risk"][:-2], rows.head(rows.height - 2))
    with pytest.raises(UserError, match="identical rows"):
        quality.quality_rows([models[0], fewer], n_bootstrap=20)


# -- options --------------------------------------------------------------------------------------------------

def test_variants_file_and_only(tmp_path):
    variants = quality.read_variants(REPO_ROOT / "benchmarks" / "quality_variants.yaml")
    assert list(variants)[0] == quality.DEFAULT_VARIANT and len(variants) > 2
    for name, spec in variants.items():
        quality.run_config_for(spec, "tiny")  # every override is a setting that exists
    owners = {name: quality.pretraining_owner(variants, name, "tiny") for name in variants}
    assert owners["multi_horizon"] == owners["noisy_or"] == quality.DEFAULT_VARIANT  # forecast-only: shared pretraining
    assert owners["no_repeat_reg"] == "no_repeat_reg"
    bad = tmp_path / "bad.yaml"
    bad.write_text("fast:\n  pretrain:\n    train: {max_steps: 10}\n")
    with pytest.raises(UserError, match="max_steps"):
        quality.read_variants(bad)
    bad.write_text("counts:\n  forecast: {aggregator: max}\n")
    with pytest.raises(UserError, match="taken"):
        quality.read_variants(bad)
    config = quality.QualityConfig(variants=variants, only=("nextvisit", "typo"))
    with pytest.raises(UserError, match="--only typo: unknown"):
        quality.selected_models(config)
    missing = quality.QualityConfig(dataset=quality.SYNTHEA, synthea_dir=tmp_path / "absent", device="cpu",
                                    work=tmp_path / "work", variants=variants, only=("counts",))
    with pytest.raises(UserError, match="absent is missing"):
        quality.run_benchmark(missing, rerun="unused")


def test_sampling_options_without_samples_are_refused():
    parser = quality.build_parser()
    for flags in (["--sample-rows", "300,300"], ["--sample-tasks", "knee_oa"]):
        with pytest.raises(UserError, match=f"{flags[0]} only apply to the sampling table: add --samples"):
            quality.config_from_args(parser.parse_args(flags))
        config = quality.config_from_args(parser.parse_args([*flags, "--samples", "4"]))
        assert config.samples == 4 and (config.sample_positive_rows == 300 or config.sample_tasks == ("knee_oa",))


def test_sampling_subset_keeps_whole_held_out_subjects_and_the_plot_draws(hand_made, tmp_path):
    """The sampling table's subset: every row of the chosen held_out subjects and nothing else, the same for
    every model (so quality_rows can pair them), and the AUROC-by-samples plot is written."""
    models, rows, scores = hand_made
    labels = tmp_path / "labels"
    labels.mkdir()
    rows.with_columns(pl.when(pl.col("boolean_value")).then(pl.lit("positive")).otherwise(pl.lit("negative"))
                      .alias("reason")).write_parquet(labels / "labels.parquet")
    (labels / "task.yaml").write_text("name: dementia\n")
    counts = quality.write_subject_subset_labels(labels, tmp_path / "subset", subjects=50, seed=0)
    subset = pl.read_parquet(tmp_path / "subset" / "labels.parquet")
    assert counts == {"subjects": 50, "of": 400, "rows": 100} and subset["subject_id"].n_unique() == 50
    chosen = set(subset["subject_id"].to_list())
    assert subset.height == rows.filter(pl.col("subject_id").is_in(list(chosen))).height
    cut = []
    for model in models:
        out = tmp_path / "cut" / model.name
        assert quality.write_prediction_subset(model.predictions, tmp_path / "subset", out) == 100
        cut.append(quality.TableModel(model.name, model.kind, out, model.budget))
    table, _ = quality.quality_rows(cut, n_bootstrap=50, seed=0, zero_shot_reference="nextvisit")
    assert all(r["rows"] == 100 for r in table)
    for r in table:
        r.update(samples=None, estimator=None)
    table.append({**table[0], "model": "monte_carlo x4", "samples": 4, "estimator": "monte_carlo"})
    assert quality.draw_sampling_plot(table, tmp_path).stat().st_size > 1000


def _labels_folder(rows: pl.DataFrame, folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows.with_columns(pl.when(pl.col("boolean_value").is_null()).then(pl.lit("censored_lost_to_followup"))
                      .when(pl.col("boolean_value")).then(pl.lit("positive")).otherwise(pl.lit("negative"))
                      .alias("reason")).write_parquet(folder / "labels.parquet")
    (folder / "task.yaml").write_text("name: dementia\n")
    return folder


def test_case_control_rows_sample_each_class_at_random_per_horizon(tmp_path):
    """--sample-rows: per horizon, P positive and N negative held_out rows drawn at random within each class
    (every one where there are fewer), censored and other splits left out; a (subject, time) drawn at both
    horizons is one history; the cut keeps exactly those (subject, time, horizon) rows of another model."""
    rng = np.random.default_rng(1)
    n_subjects, per_subject = 600, 3
    subject = np.repeat(np.arange(1, n_subjects + 1), per_subject)
    n = len(subject)
    base = datetime(2016, 1, 1)
    times = [base + timedelta(days=300 * (i % per_subject)) for i in range(n)]
    one = pl.DataFrame({"subject_id": subject, "prediction_time": times, "age_years": 50 + 40 * rng.random(n),
                        "sex": rng.choice(["F", "M"], n), "task": ["dementia"] * n,
                        "split": rng.choice(["held_out", "train"], n, p=[0.8, 0.2])})
    two_years = one.with_columns(pl.Series("boolean_value", rng.random(n) < 0.05).cast(pl.Boolean),
                                 pl.lit(730).alias("horizon_days"))
    five_years = one.with_columns(pl.Series("boolean_value", rng.random(n) < 0.1).cast(pl.Boolean),
                                  pl.lit(1825).alias("horizon_days"))
    censor = rng.random(n) < 0.1
    five_years = five_years.with_columns(pl.when(pl.Series(censor)).then(None).otherwise(pl.col("boolean_value"))
                                         .alias("boolean_value"))
    rows = pl.concat([two_years, five_years], how="diagonal_relaxed").with_columns(pl.col("horizon_days").cast(pl.Int32))
    labels = _labels_folder(rows, tmp_path / "labels")
    summary = quality.write_case_control_labels(labels, tmp_path / "subset", positives=40, negatives=100, seed=0)
    subset = pl.read_parquet(tmp_path / "subset" / "labels.parquet")
    assert set(subset["split"]) == {"held_out"} and subset["boolean_value"].null_count() == 0
    held = rows.filter(pl.col("split") == "held_out")
    for horizon in (730, 1825):
        mine = subset.filter(pl.col("horizon_days") == horizon)
        pool = held.filter(pl.col("horizon_days") == horizon)
        positives = pool.filter(pl.col("boolean_value")).height
        assert mine.filter(pl.col("boolean_value")).height == min(40, positives)
        assert mine.filter(~pl.col("boolean_value")).height == 100
        cell = summary[f"{horizon} d"]
        assert cell["positive_rows"] == f"{min(40, positives):,} of {positives:,}"
        assert cell["censored_rows_left_out"] == pool["boolean_value"].null_count()
        # the drawn rows are rows of that horizon and class, with their own columns
        assert mine.join(pool, on=["subject_id", "prediction_time", "boolean_value", "age_years"]).height == mine.height
    assert summary["histories"] == subset.select("subject_id", "prediction_time").unique().height < subset.height
    # seeded, and not simply the first rows of the file (the draw is spread over the subjects)
    again = quality.write_case_control_labels(labels, tmp_path / "again", positives=40, negatives=100, seed=0)
    assert again == summary and pl.read_parquet(tmp_path / "again" / "labels.parquet").equals(subset)
    negatives = subset.filter(~pl.col("boolean_value"))["subject_id"]
    assert negatives.max() > 0.8 * n_subjects and negatives.min() < 0.2 * n_subjects

    # a model scored on every row, cut to the drawn rows: one row per drawn (subject, time, horizon)
    scored = held.filter(pl.col("boolean_value").is_not_null())
    out = tmp_path / "model"
    write_predictions(out, prediction_frame(scored, rng.random(scored.height), "counts"),
                      {"model": "counts", "kind": COUNT_FEATURES})
    assert quality.write_prediction_subset(out, tmp_path / "subset", tmp_path / "cut") == subset.height


def test_case_control_auroc_is_unbiased_for_the_auroc_on_all_rows(tmp_path):
    """Drawing within each class leaves each class's score distribution as it is: over many draws the AUROC
    on the drawn rows averages to the AUROC on all rows, although the file is sorted by score."""
    rng = np.random.default_rng(2)
    n = 4000
    score = np.sort(rng.standard_normal(n))
    label = rng.random(n) < 1 / (1 + np.exp(-(score * 1.5 - 3)))
    base = datetime(2016, 1, 1)
    rows = pl.DataFrame({"subject_id": np.arange(1, n + 1), "prediction_time": [base] * n,
                         "boolean_value": label, "task": ["dementia"] * n, "horizon_days": [730] * n,
                         "split": ["held_out"] * n, "age_years": [60.0] * n, "sex": ["F"] * n}).with_columns(
        pl.col("horizon_days").cast(pl.Int32))
    labels = _labels_folder(rows, tmp_path / "labels")
    full = roc_auc_score(label, score)
    by_id = dict(zip(range(1, n + 1), score))
    draws = []
    for seed in range(40):
        quality.write_case_control_labels(labels, tmp_path / f"s{seed}", positives=60, negatives=60, seed=seed)
        subset = pl.read_parquet(tmp_path / f"s{seed}" / "labels.parquet")
        draws.append(roc_auc_score(subset["boolean_value"].to_numpy(), [by_id[s] for s in subset["subject_id"]]))
    assert abs(np.mean(draws) - full) < 0.015, (np.mean(draws), full)
    assert np.std(draws) > 0.005  # they are draws, not the same rows every time


def test_finetune_steps_replace_the_time_budget_and_are_recorded(tmp_path):
    parser = quality.build_parser()
    with pytest.raises(UserError, match="--finetune-steps 0: must be at least 1"):
        quality.config_from_args(parser.parse_args(["--finetune-steps", "0"]))
    with pytest.raises(UserError, match="give one"):
        quality.config_from_args(parser.parse_args(["--finetune-steps", "10", "--finetune-minutes", "2"]))
    default = quality.config_from_args(parser.parse_args([]))
    assert quality.finetune_budget(default)[:2] == ({"steps": 3000}, ["--max-steps", 3000])
    timed = quality.config_from_args(parser.parse_args(["--finetune-minutes", "2"]))
    assert quality.finetune_budget(timed) == ({"minutes": 2.0}, ["--max-minutes", "2"], "2 min per task")
    stepped = quality.config_from_args(parser.parse_args(["--finetune-steps", "1500"]))
    args, flags, rule = quality.finetune_budget(stepped)
    assert args == {"steps": 1500} and flags == ["--max-steps", 1500] and "1,500 steps" in rule
    runner = quality.Runner(tmp_path, rerun="x")  # the limit is part of the stage's hash
    assert (runner.stage("masked_finetune_dementia", {**args, "device": "cpu"}).hash
            != runner.stage("masked_finetune_dementia", {"minutes": 2.0, "device": "cpu"}).hash)
    (tmp_path / "info.json").write_text(json.dumps({"fit": {"steps": 700, "stop_reason": "early_stopping",
                                                            "best_step": 550, "run": "all"}}))
    assert quality.finetune_fit(tmp_path) == {"steps": 700, "stop_reason": "early_stopping", "best_step": 550}
    assert quality.finetune_fit(tmp_path / "absent") == {}


def test_two_runs_on_one_work_folder_run_a_stage_once(tmp_path):
    """A stage another run of the benchmark is running is waited for, then used: its action runs once."""
    import threading

    started, release, calls = threading.Event(), threading.Event(), []

    def slow(out):
        calls.append("first")
        started.set()
        assert release.wait(10)
        out.mkdir()
        (out / "result.txt").write_text("first")

    def second_action(out):
        calls.append("second")
        out.mkdir()

    first_runner, second_runner = quality.Runner(tmp_path, rerun="x"), quality.Runner(tmp_path, rerun="x")
    stage = first_runner.stage("counts_dementia", {"config": "defaults"})
    worker = threading.Thread(target=first_runner.python, args=(stage, "counts", slow, "counts"))
    worker.start()
    assert started.wait(10)
    waiter = threading.Thread(target=second_runner.python, args=(second_runner.stage("counts_dementia",
                                                                                     {"config": "defaults"}),
                                                                 "counts", second_action, "counts"))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # waiting on the lock, not running the stage again
    release.set()
    worker.join(10)
    waiter.join(10)
    assert calls == ["first"] and (stage.out / "result.txt").read_text() == "first"
    assert second_runner.timings[-1][1] == "cached"


def test_seed_mean_averages_logits_and_refuses_other_rows(hand_made, tmp_path, capsys):
    """benchmarks/seed_mean.py: the mean over runs is the sigmoid of the mean logit, row by row, whatever order the
    folders' rows are in; runs of other rows are refused by name; the table puts the mean first."""
    from benchmarks import seed_mean

    models, rows, scores = hand_made
    rng = np.random.default_rng(3)
    second = 1 / (1 + np.exp(-rng.standard_normal(rows.height)))
    shuffled = rows.with_columns(pl.Series("p", second)).sample(fraction=1.0, shuffle=True, seed=1)
    other = tmp_path / "second"
    write_predictions(other, prediction_frame(shuffled, "p", "second"), {"model": "second", "kind": ZERO_SHOT})
    first = pl.read_parquet(models[0].predictions / "predictions.parquet")
    path = seed_mean.mean_logit_predictions([models[0].predictions, other], tmp_path / "mean")
    mean = pl.read_parquet(path)
    p1 = np.clip(first["predicted_boolean_probability"].to_numpy(), 1e-7, 1 - 1e-7)
    joined = first.select("subject_id", "prediction_time").join(
        pl.read_parquet(other / "predictions.parquet").select("subject_id", "prediction_time", "predicted_boolean_probability"),
        on=["subject_id", "prediction_time"], how="left", maintain_order="left")
    p2 = joined["predicted_boolean_probability"].to_numpy()
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    expected = 1 / (1 + np.exp(-(logit(p1) + logit(p2)) / 2))
    got = mean.join(first.select("subject_id", "prediction_time"), on=["subject_id", "prediction_time"],
                    how="right", maintain_order="right")["predicted_boolean_probability"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert set(mean["model"]) == {"seed_mean"} and mean["boolean_value"].equals(first["boolean_value"])
    # a run of fewer rows is refused, naming its folder
    short = tmp_path / "short"
    write_predictions(short, prediction_frame(rows.head(100), rng.random(100), "short"), {"model": "short", "kind": ZERO_SHOT})
    with pytest.raises(UserError, match="short.*differ"):
        seed_mean.mean_logit_predictions([models[0].predictions, short], tmp_path / "mean2")
    # the command: the mean, each run, the other models, one table
    assert seed_mean.main(["--out", str(tmp_path / "cli"), "--mean", str(models[0].predictions), str(other),
                           "--names", "a,b", "--model", f"oracle:oracle={models[3].predictions}",
                           "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert "seed_mean minus the model" in text and "\n  a " in text and "\n  oracle " in text
    assert seed_mean.main(["--out", str(tmp_path / "cli2"), "--mean", str(models[0].predictions)]) == 2
