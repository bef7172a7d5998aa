"""held_out labels never steer a compared model: each model is run through its command twice on one simulated
cohort, once with the true labels and once with a labels folder whose held_out labels are permuted and
flipped (train and tuning rows unchanged). A model fit on train rows, its hyper-parameters (the count
model's C, the masked model's early-stopping step) chosen on tuning rows or within train, then gives the
same fit: every prediction, tuning and held_out alike, and the fit summary in info.json are identical. Zero-shot models and the oracle fit nothing,
so the same holds for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from safetensors.numpy import load_file

from nextvisit.artifacts.predictions import INFO_FILE, PREDICTIONS_FILE, PROBABILITY, SORT_KEYS
from nextvisit.cli import main
from nextvisit.data.simulate import simulate
from nextvisit.model.run import METRICS_FILE, WEIGHTS_FILE, read_tokenizer
from nextvisit.tasks import NEGATIVE, POSITIVE, labels_path
from test_forecast import make_run

TASK = "knee_oa"  # the more frequent of the simulator's conditions: positives in every split at this size
SUBJECTS = 800
TINY_MASKED = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "context": 64, "dropout": 0.0},
    "pretrain": {"batch_size": 16, "max_steps": 10, "eval_every": 5, "eval_batches": 1, "warmup_steps": 5,
                 "max_minutes": None, "threads": 1},
    # a few short epochs with frequent tuning evaluations, so early stopping has steps to choose between;
    # no time budget, so the steps taken do not depend on how busy the machine is
    "finetune": {"batch_size": 32, "max_epochs": 4, "patience": 100, "lr": 3e-3, "warmup_steps": 5,
                 "eval_every": 5, "eval_histories": 0, "max_minutes": None, "threads": 1, "seed": 0},
}
# C values far apart, so that choosing C on other rows than tuning's would likely change the fit
COUNTS_CONFIG = {"c_values": [0.001, 0.1, 10.0]}


def scrambled_labels(labels_dir: Path, out: Path, seed: int = 0) -> Path:
    """A copy of a labels folder whose labelled held_out rows have their labels permuted (within each task
    and horizon) and then flipped, reasons to match; train, tuning and censored rows are unchanged."""
    labels = pl.read_parquet(labels_path(labels_dir)).with_row_index("label_row")
    rng = np.random.default_rng(seed)
    held_out = labels.filter((pl.col("split") == "held_out") & pl.col("boolean_value").is_not_null())
    parts = []
    for _, group in held_out.group_by("task", "horizon_days", maintain_order=True):
        flipped = ~rng.permutation(group["boolean_value"].to_numpy())
        parts.append(group.select("label_row", pl.Series("scrambled", flipped, dtype=pl.Boolean)))
    scrambled = labels.join(pl.concat(parts), on="label_row", how="left").with_columns(
        boolean_value=pl.coalesce("scrambled", "boolean_value"),
        reason=pl.when(pl.col("scrambled").is_null()).then(pl.col("reason"))
        .when(pl.col("scrambled")).then(pl.lit(POSITIVE)).otherwise(pl.lit(NEGATIVE)),
    ).drop("scrambled", "label_row")
    out.mkdir(parents=True)
    scrambled.write_parquet(out / "labels.parquet")
    (out / "task.yaml").write_text((Path(labels_dir) / "task.yaml").read_text())
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A simulated cohort, its knee OA labels and their held_out-scrambled copy, a token store, a masked
    pretraining run and a random-init next-visit run (nothing in these reads a label)."""
    root = tmp_path_factory.mktemp("held_out_guard")
    meds = root / "meds"
    simulate(SUBJECTS, meds, seed=1, workers=1, progress=False)
    labels = root / "labels"
    assert main(["label", str(meds), TASK, "--out", str(labels)]) == 0
    scrambled = scrambled_labels(labels, root / "labels_scrambled")
    store = root / "store"
    assert main(["tokenize", str(meds), "--out", str(store), "--workers", "1"]) == 0
    masked_config = root / "masked.yaml"
    masked_config.write_text(yaml.safe_dump(TINY_MASKED))
    masked_run = root / "masked"
    assert main(["baseline", "masked", "pretrain", str(store), "--out", str(masked_run), "--preset", "tiny",
                 "--config", str(masked_config), "--device", "cpu"]) == 0
    next_visit_run = make_run(root / "nextvisit", read_tokenizer(store))
    return {"root": root, "meds": meds, "labels": labels, "scrambled": scrambled, "masked_config": masked_config,
            "masked_run": masked_run, "next_visit_run": next_visit_run}


def test_scrambled_labels_differ_on_held_out_only(cohort):
    """The second labels folder is the question the tests ask: the same train and tuning rows, held_out labels
    unrelated to the truth (most of them changed), the same rows censored."""
    true, scrambled = (pl.read_parquet(labels_path(cohort[k])) for k in ("labels", "scrambled"))
    fitted = pl.col("split").is_in(["train", "tuning"])
    assert true.filter(fitted).equals(scrambled.filter(fitted))
    assert true.filter(fitted)["boolean_value"].sum() > 0  # the fits have positives to learn from
    held_true, held_scrambled = true.filter(~fitted), scrambled.filter(~fitted)
    assert held_true.select(SORT_KEYS).equals(held_scrambled.select(SORT_KEYS))
    assert held_true["boolean_value"].is_null().equals(held_scrambled["boolean_value"].is_null())
    changed = (held_true["boolean_value"] != held_scrambled["boolean_value"]).sum()
    assert changed > 0.5 * held_true["boolean_value"].is_not_null().sum()


def _without(value, key: str):
    """``value`` with every dict entry named ``key`` removed, at any depth."""
    if isinstance(value, dict):
        return {k: _without(v, key) for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [_without(v, key) for v in value]
    return value


def fit_summary(folder: Path) -> dict:
    """info.json less what may differ between the two runs: wall-clock ``seconds``, the labels folder's path,
    and the held_out label counts. NaN reads as the text "NaN", so that two NaN AUROCs compare equal."""
    info = json.loads((folder / INFO_FILE).read_text(), parse_constant=str)
    info["inputs_from"].pop("labels")
    info["label_counts"] = {key: {split: n for split, n in by_split.items() if split != "held_out"}
                            for key, by_split in info["label_counts"].items()}
    return _without(info, "seconds")


def assert_same_fit(true_out: Path, scrambled_out: Path) -> None:
    """The same rows scored, every probability identical (tuning and held_out), the same fit summary."""
    a, b = (pl.read_parquet(folder / PREDICTIONS_FILE) for folder in (true_out, scrambled_out))
    assert a.select(SORT_KEYS).equals(b.select(SORT_KEYS))
    assert a.filter(pl.col("split") == "tuning").height > 0 and a.filter(pl.col("split") == "held_out").height > 0
    for split in ("tuning", "held_out"):
        p, q = (frame.filter(pl.col("split") == split)[PROBABILITY].to_numpy() for frame in (a, b))
        np.testing.assert_allclose(q, p, rtol=0, atol=1e-12, err_msg=f"{split} predictions moved with held_out labels")
    assert fit_summary(scrambled_out) == fit_summary(true_out)


def run_twice(cohort, tmp_path, argv) -> tuple[Path, Path]:
    """``argv(labels_dir, out)`` run with the true and with the scrambled labels."""
    outs = tmp_path / "true", tmp_path / "scrambled"
    for labels, out in zip((cohort["labels"], cohort["scrambled"]), outs):
        assert main([str(a) for a in argv(labels, out)]) == 0
    return outs


@pytest.mark.parametrize("features", [[], ["--observable"]], ids=["counts", "observable_reference"])
def test_count_model_fit_ignores_held_out_labels(cohort, tmp_path, features):
    config = tmp_path / "counts.yaml"
    config.write_text(yaml.safe_dump(COUNTS_CONFIG))
    outs = run_twice(cohort, tmp_path, lambda labels, out: [
        "baseline", "counts", cohort["meds"], labels, "--out", out, "--config", config, *features])
    assert_same_fit(*outs)
    fits = json.loads((outs[0] / INFO_FILE).read_text())["fits"]
    assert {fit["C"] for fit in fits.values()} <= set(COUNTS_CONFIG["c_values"])


def test_masked_fine_tuning_ignores_held_out_labels(cohort, tmp_path):
    outs = run_twice(cohort, tmp_path, lambda labels, out: [
        "baseline", "masked", "finetune", cohort["masked_run"], cohort["meds"], labels, "--out", out,
        "--config", cohort["masked_config"], "--device", "cpu"])
    assert_same_fit(*outs)
    # fine-tuning moved the weights (early stopping kept a later step than the untuned head), so the
    # weights below depend on which rows trained them and which rows chose the step
    assert json.loads((outs[0] / INFO_FILE).read_text())["fit"]["best_step"] > 0
    # the same tuning evaluations (early stopping's evidence) and bit for bit the same fine-tuned weights
    metrics = [pl.read_csv(out / METRICS_FILE).drop("seconds") for out in outs]
    assert metrics[0].height > 2 and metrics[0].equals(metrics[1])
    weights = [load_file(str(out / WEIGHTS_FILE)) for out in outs]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert np.array_equal(tensor, weights[1][name]), f"fine-tuned weight {name} moved with held_out labels"


def test_zero_shot_forecast_ignores_held_out_labels(cohort, tmp_path):
    outs = run_twice(cohort, tmp_path, lambda labels, out: [
        "forecast", cohort["next_visit_run"], cohort["meds"], labels, "--out", out, "--device", "cpu"])
    assert_same_fit(*outs)


def test_oracle_ignores_held_out_labels(cohort, tmp_path):
    outs = run_twice(cohort, tmp_path, lambda labels, out: [
        "oracle", cohort["meds"], labels, "--out", out, "--samples", "8", "--workers", "1"])
    assert_same_fit(*outs)
