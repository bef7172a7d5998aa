"""The tokenizer: visit grouping, vocabulary and lab statistics fit on train only, bins, the manifest's balance,
streaming equivalence, re-tokenizing with a fitted vocabulary, and the real datasets in ../shared/data."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from nextvisit.errors import UserError
from nextvisit.tokenize.config import TokenizerConfig
from nextvisit.tokenize.dataset import tokenize_dataset
from nextvisit.tokenize.events import DROP_REASONS
from nextvisit.tokenize.store import NO_DAY, SPLITS, UNK, TokenStore
from nextvisit.tokenize.timeline import format_timeline
from nextvisit.tokenize.tokenizer import Tokenizer, balance_gap
from test_tasks import DATA

SHARED_DATA = DATA  # ../shared/data, resolved once in test_tasks
MIMIC = SHARED_DATA / "mimic-iv-demo-meds"
SYNTHEA = SHARED_DATA / "synthea-covid19-10k-meds"
EVENT_SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}


def T(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)


def events(rows) -> pl.DataFrame:
    """``(subject_id, time, code, value)`` tuples as a MEDS frame."""
    return pl.DataFrame(
        [(s, T(t), c, v) for s, t, c, v in rows], schema=list(EVENT_SCHEMA.items()), orient="row"
    )


def write_meds(root: Path, frame: pl.DataFrame, splits: dict, shards: int = 1, descriptions: dict | None = None,
               row_group_size: int | None = None) -> Path:
    """A MEDS dataset folder: ``frame`` sorted and cut into ``shards`` files by subject."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    frame = frame.with_row_index("order").sort("subject_id", "time", "order", nulls_last=False).drop("order")
    subjects = frame.get_column("subject_id").unique().sort().to_list()
    for i, chunk in enumerate(np.array_split(np.asarray(subjects), shards)):
        frame.filter(pl.col("subject_id").is_in(chunk.tolist())).write_parquet(
            root / "data" / f"{i}.parquet", row_group_size=row_group_size)
    pl.DataFrame({"subject_id": list(splits), "split": list(splits.values())},
                 schema={"subject_id": pl.Int64, "split": pl.String}).write_parquet(root / "metadata" / "subject_splits.parquet")
    descriptions = descriptions or {}
    pl.DataFrame({"code": list(descriptions), "description": list(descriptions.values())},
                 schema={"code": pl.String, "description": pl.String}).write_parquet(root / "metadata" / "codes.parquet")
    (root / "metadata" / "dataset.json").write_text(json.dumps({"dataset_name": "test", "meds_version": "0.4.1"}))
    return root


def cohort(n_subjects: int = 30, seed: int = 0, held_out_value_shift: float = 0.0) -> tuple[pl.DataFrame, dict]:
    """Small synthetic cohort: births, demographics, repeated diagnoses, a lab with values, splits 60/20/20."""
    rng = np.random.default_rng(seed)
    rows, splits = [], {}
    for s in range(1, n_subjects + 1):
        split = "train" if s % 5 < 3 else ("tuning" if s % 5 == 3 else "held_out")
        splits[s] = split
        born = dt.datetime(1940 + int(rng.integers(0, 40)), 1 + int(rng.integers(0, 12)), 1)
        rows.append((s, None, "GENDER//F" if s % 2 else "GENDER//M", None))
        rows.append((s, born.isoformat(), "MEDS_BIRTH", None))
        day = dt.datetime(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 300)))
        for _ in range(int(rng.integers(2, 6))):
            rows.append((s, day.isoformat(), "ICD10CM//I10", None))
            rows.append((s, (day + dt.timedelta(hours=3)).isoformat(), "ICD10CM//I10", None))  # same day: collapses
            value = float(rng.normal(100, 15)) + (held_out_value_shift if split == "held_out" else 0.0)
            rows.append((s, day.isoformat(), "LOINC//2345-7", value))
            if rng.random() < 0.5:
                rows.append((s, day.isoformat(), "RXNORM//6809", None))
            day += dt.timedelta(days=int(rng.integers(10, 400)))
    return events(rows), splits


def config(**overrides) -> TokenizerConfig:
    return TokenizerConfig(**{"min_count": 1, "max_time": None, **overrides})


def names(tokenizer_or_store, ids) -> list[str]:
    return [tokenizer_or_store.vocab.tokens[int(i)] for i in ids]


# -- visits, order, age, demographics ------------------------------------------------------------------------
def test_day_grouping_dedup_and_visit_order():
    frame = events([
        (1, "1950-06-01", "MEDS_BIRTH", None),
        (1, None, "GENDER//F", None),
        (1, "2020-03-01T08:00", "B", None),
        (1, "2020-03-01T23:59", "A", None),
        (1, "2020-03-01T12:00", "A", None),  # same code, same day: one token
        (1, "2020-03-02T00:00", "A", None),  # next calendar day: a new visit
        (1, "2020-04-15T09:30", "MEDS_DEATH", None),
    ])
    tokenizer = Tokenizer.fit(frame, config())
    (subject,) = list(tokenizer.subjects(frame))
    epoch = dt.date(1970, 1, 1)
    assert [epoch + dt.timedelta(days=int(d)) for d in subject.visit_days] == [
        dt.date(2020, 3, 1), dt.date(2020, 3, 2), dt.date(2020, 4, 15)]
    assert subject.birth_day == (dt.date(1950, 6, 1) - epoch).days
    assert names(tokenizer, subject.visit(0)) == ["AGE//65-70", "GENDER//F", "A", "B"]
    assert names(tokenizer, subject.visit(1)) == ["AGE//65-70", "A"]  # demographics on the first visit only
    assert names(tokenizer, subject.visit(2)) == ["AGE//65-70", "MEDS_DEATH"]  # death is a code on its day
    counts = tokenizer.last_counts
    assert counts["duplicates_collapsed"] == 1 and counts["dropped"]["birth_record"] == 1
    assert counts["age_tokens"] == 3 and counts["visits"] == 3 and balance_gap(counts) == 0


def test_sep_day_semantics_on_store_arrays(tmp_path):
    """The store keeps each visit's calendar day, so the SEP after visit i can be given visit i+1's day: days
    strictly increase within a subject and the gaps are the true gaps between visit dates."""
    frame = events([
        (1, "2019-12-31T23:00", "A", None), (1, "2020-01-01T01:00", "B", None), (1, "2020-01-31", "A", None),
        (2, "2021-05-05", "A", None), (2, "2021-05-05T18:00", "B", None),
    ])
    meds_dir = write_meds(tmp_path / "meds", frame, {1: "train", 2: "train"})
    tokenize_dataset(meds_dir, tmp_path / "store", config(), workers=1, progress=False)
    view = TokenStore(tmp_path / "store").split("train")
    first, second = view.subject(view.index_of(1)), view.subject(view.index_of(2))
    assert np.diff(first.visit_days).tolist() == [1, 30]  # 23:00 and 01:00 are different calendar days
    assert first.visit_days[0] == (dt.date(2019, 12, 31) - dt.date(1970, 1, 1)).days
    assert second.n_visits == 1 and len(second.visit(0)) == 3  # unknown age, A, B on one day
    assert view.visit_days.dtype == np.int32


def test_age_buckets_and_unknown_birth():
    frame = events([
        (1, "2000-01-01", "MEDS_BIRTH", None), (1, "2000-06-01", "A", None), (1, "2003-01-01", "A", None),
        (1, "2062-01-02", "A", None), (1, "2101-01-01", "A", None),
        (2, "2020-01-01", "A", None),  # no MEDS_BIRTH
    ])
    tokenizer = Tokenizer.fit(frame, config())
    first, second = list(tokenizer.subjects(frame))
    ages = [names(tokenizer, first.visit(i))[0] for i in range(first.n_visits)]
    assert ages == ["AGE//0-1", "AGE//1-5", "AGE//60-65", "AGE//100+"]
    assert names(tokenizer, second.visit(0))[0] == "AGE//unknown" and second.birth_day == NO_DAY


def test_events_before_birth_after_death_and_excluded_prefixes_are_counted():
    frame = events([
        (1, "1950-01-01", "MEDS_BIRTH", None),
        (1, "1949-12-31", "A", None),  # before birth
        (1, "2020-01-01", "ICD10CM//R41.1", None),  # excluded prefix
        (1, "2020-01-01", "A", None),
        (1, "2020-02-01T10:00", "MEDS_DEATH", None),
        (1, "2020-02-01T11:00", "B", None),  # on the death day: kept
        (1, "2020-02-02", "B", None),  # after death
        (2, None, "GENDER//M", None),  # only a static row: no visit
    ])
    cfg = config(exclude_prefixes=("ICD10CM//R41.1",))
    tokenizer = Tokenizer.fit(frame, cfg)
    subjects = list(tokenizer.subjects(frame))
    assert [s.n_visits for s in subjects] == [2, 0]
    dropped = tokenizer.last_counts["dropped"]
    assert dropped["before_birth"] == 1 and dropped["after_death"] == 1 and dropped["excluded_prefix"] == 1
    assert dropped["subject_without_visits"] == 1
    assert "ICD10CM//R41.1" not in tokenizer.vocab.index
    assert tokenizer.last_counts["subjects_without_visits"] == 1 and balance_gap(tokenizer.last_counts) == 0


# -- lab values -----------------------------------------------------------------------------------------------
def _unit_lab_tokenizer(**overrides) -> Tokenizer:
    """A tokenizer whose lab ``L`` has mean 0 and SD 1, so a value is its own z."""
    cfg = config(**overrides).validate()
    stats = pl.DataFrame({"code": ["L"], "n_events": [100], "n_values": [100], "mean": [0.0], "m2": [99.0],
                          "demographic": [False]})
    labs = pl.DataFrame({"code": ["L"], "count": [100], "mean": [0.0], "std": [1.0]})
    return Tokenizer.from_statistics(stats, labs, cfg)


def test_z_bin_edges_are_closed_on_the_left_and_outside_ten_is_dropped():
    tokenizer = _unit_lab_tokenizer()
    values = [-10.5, -10.0, -3.0, -2.99, -1.0, -0.5, 0.0, 0.4999, 0.5, 1.0, 2.999, 3.0, 10.0, 10.01]
    frame = events([(1, f"2020-01-{i + 1:02d}", "L", v) for i, v in enumerate(values)])
    (subject,) = list(tokenizer.subjects(frame))
    labels = [names(tokenizer, subject.visit(i))[1].split("|")[1] for i in range(subject.n_visits)]
    assert labels == ["z[-10,-3)", "z[-3,-1)", "z[-3,-1)", "z[-1,-0.5)", "z[-0.5,0.5)", "z[-0.5,0.5)",
                      "z[-0.5,0.5)", "z[0.5,1)", "z[1,3)", "z[1,3)", "z[3,10)", "z[3,10)"]
    assert tokenizer.last_counts["dropped"]["value_out_of_range"] == 2


def test_values_without_statistics_and_nonfinite_values_fall_back_to_the_code():
    frame = events([(1, "2020-01-01", "K", 5.0)] * 3 + [(1, "2020-01-02", "K", 5.0), (1, "2020-01-03", "L", float("nan"))])
    train = events([(1, "2020-01-01", "K", 5.0), (1, "2020-01-02", "K", 5.0), (1, "2020-01-03", "L", None)])
    tokenizer = Tokenizer.fit(train, config())  # K has SD 0: no lab statistics
    assert tokenizer.lab_stats.height == 0 and "K" in tokenizer.vocab.index
    (subject,) = list(tokenizer.subjects(frame))
    assert names(tokenizer, subject.tokens) == ["AGE//unknown", "K", "AGE//unknown", "K", "AGE//unknown", "L"]
    replaced = tokenizer.last_counts["replaced"]
    assert replaced["value_without_stats"] == 4 and replaced["nonfinite_value"] == 1


def test_quantile_bins_split_train_values_evenly():
    rng = np.random.default_rng(1)
    values = rng.lognormal(0, 0.5, 7000)  # skewed: z bins would be uneven, quantile bins even
    frame = events([(1 + i // 7, f"2020-01-{1 + i % 7:02d}", "L", float(v)) for i, v in enumerate(values)])
    tokenizer = Tokenizer.fit(frame, config(lab_binning="quantile"))
    assert [t for t in tokenizer.vocab.tokens if t.startswith("L|")] == [f"L|q{i}/7" for i in range(1, 8)]
    tokens = np.concatenate([s.tokens for s in tokenizer.subjects(frame)])
    lab_tokens = names(tokenizer, tokens[[tokenizer.vocab.kinds[t] == "lab" for t in tokens]])
    shares = pl.Series(lab_tokens).value_counts()["count"].to_numpy() / len(lab_tokens)
    assert len(shares) == 7 and np.all(np.abs(shares - 1 / 7) < 0.01)


# -- fit on train only ----------------------------------------------------------------------------------------
def test_code_seen_only_in_held_out_becomes_unk(tmp_path):
    frame, splits = cohort()
    held_out = [s for s, split in splits.items() if split == "held_out"][0]
    frame = pl.concat([frame, events([(held_out, "2016-06-01", "ICD10CM//Z99.HELDOUT", None)])])
    meds_dir = write_meds(tmp_path / "meds", frame, splits)
    manifest = tokenize_dataset(meds_dir, tmp_path / "store", config(), workers=1, progress=False)
    store = TokenStore(tmp_path / "store")
    assert "ICD10CM//Z99.HELDOUT" not in store.vocab.index
    view = store.split("held_out")
    subject = view.subject(view.index_of(held_out))
    day = (dt.date(2016, 6, 1) - dt.date(1970, 1, 1)).days
    visit = int(np.flatnonzero(subject.visit_days == day)[0])
    assert UNK in subject.visit(visit).tolist()
    assert manifest["splits"]["held_out"]["replaced"]["unknown_code"] == 1
    assert manifest["splits"]["train"]["replaced"]["unknown_code"] == 0


def test_lab_statistics_and_vocabulary_ignore_held_out_data(tmp_path):
    frame, splits = cohort(seed=3)
    shifted, _ = cohort(seed=3, held_out_value_shift=500.0)
    extra = [s for s, split in splits.items() if split != "train"][0]
    shifted = pl.concat([shifted, events([(extra, "2016-01-01", "RXNORM//NEWDRUG", None)] * 3)])
    for name, data in (("a", frame), ("b", shifted)):
        tokenize_dataset(write_meds(tmp_path / name, data, splits), tmp_path / f"store_{name}", config(),
                         workers=1, progress=False)
    stats_a = pl.read_parquet(tmp_path / "store_a" / "lab_stats.parquet")
    stats_b = pl.read_parquet(tmp_path / "store_b" / "lab_stats.parquet")
    assert stats_a.equals(stats_b) and stats_a.height == 1
    train_values = frame.join(pl.DataFrame({"subject_id": [s for s, x in splits.items() if x == "train"]}),
                              on="subject_id").filter(pl.col("code") == "LOINC//2345-7")["numeric_value"].cast(pl.Float64)
    assert stats_a["mean"][0] == pytest.approx(train_values.mean(), rel=1e-9)
    assert stats_a["std"][0] == pytest.approx(train_values.std(), rel=1e-9)
    vocab_a = json.loads((tmp_path / "store_a" / "vocab.json").read_text())
    assert vocab_a == json.loads((tmp_path / "store_b" / "vocab.json").read_text())


def test_quantile_edges_ignore_held_out_values(tmp_path):
    """The streaming quantile pass reads train values only: held-out values moved by one SD (still inside the
    z range, so they would land in the histogram) leave the bin edges unchanged."""
    frame, splits = cohort(seed=3)
    shifted, _ = cohort(seed=3, held_out_value_shift=15.0)
    stats = []
    for name, data in (("a", frame), ("b", shifted)):
        tokenize_dataset(write_meds(tmp_path / name, data, splits), tmp_path / f"store_{name}",
                         config(lab_binning="quantile"), workers=1, progress=False)
        stats.append(pl.read_parquet(tmp_path / f"store_{name}" / "lab_stats.parquet"))
    assert stats[0]["edges"].list.len().to_list() == [6]
    assert stats[0].equals(stats[1])


def test_min_count_sends_rare_train_codes_to_unk():
    frame = events([(1, f"2020-01-{d:02d}", "COMMON", None) for d in range(1, 6)] + [(1, "2020-02-01", "RARE", None)])
    tokenizer = Tokenizer.fit(frame, config(min_count=2))
    assert "COMMON" in tokenizer.vocab.index and "RARE" not in tokenizer.vocab.index
    assert "MEDS_DEATH" in tokenizer.vocab.index  # always included: a target even when train holds none
    list(tokenizer.subjects(frame))
    assert tokenizer.last_counts["replaced"]["unknown_code"] == 1


# -- the manifest -------------------------------------------------------------------------------------------
def test_manifest_balances_per_split_with_every_reason(tmp_path):
    frame, splits = cohort(n_subjects=40)
    frame = pl.concat([frame, events([
        (1, "1900-01-01", "ICD10CM//I10", None),  # before birth
        (3, "2016-01-01", "LOINC//2345-7", 1e6),  # value far out of range (tuning: not in the train stats)
        (2, "2016-01-01", "ICD10CM//R41.2", None),  # excluded prefix
        (3, "2030-01-01", "ICD10CM//I10", None),  # after max_time
        (4, "2017-01-01T10:00", "MEDS_DEATH", None), (4, "2019-01-01", "ICD10CM//I10", None),  # after death
        (99, None, "GENDER//F", None),  # only static rows
        (500, "2016-01-01", "ICD10CM//I10", None),  # subject without a split
    ])])
    splits[99] = "train"
    splits[1000] = "tuning"  # listed, but without events
    meds_dir = write_meds(tmp_path / "meds", frame, splits, shards=3)
    cfg = config(exclude_prefixes=("ICD10CM//R41",), max_time="2025-01-01", future_events="drop")
    manifest = tokenize_dataset(meds_dir, tmp_path / "store", cfg, workers=1, progress=False)
    store = TokenStore(tmp_path / "store")
    seen = {reason: 0 for reason in DROP_REASONS}
    for split in SPLITS:
        c = manifest["splits"][split]
        assert c["events_in"] == c["tokens_from_events"] + c["duplicates_collapsed"] + sum(c["dropped"].values())
        assert c["balance_gap"] == 0
        view = store.split(split)
        assert view.n_tokens == c["tokens_out"] == c["tokens_from_events"] + c["age_tokens"]
        assert len(view) == c["subjects_out"] and len(view.visit_days) == c["visits"]
        for reason, n in c["dropped"].items():
            seen[reason] += n
    assert all(n > 0 for n in seen.values()), seen
    assert manifest["splits"]["tuning"]["subjects_without_events"] == 1
    assert manifest["unassigned"] == {"events": 1, "subjects": 1}
    assert manifest["events_in"] == frame.height


# -- streaming: shards, workers and chunks give the same store --------------------------------------------------
def _store_arrays(path: Path) -> dict:
    store = TokenStore(path)
    return {(split, name): np.asarray(getattr(store.split(split), name)).copy()
            for split in SPLITS for name in ("subject_ids", "birth_days", "subject_visits", "visit_days", "visit_tokens", "tokens")}


def test_shards_workers_and_chunks_do_not_change_the_store(tmp_path):
    frame, splits = cohort(n_subjects=40, seed=5)
    one = write_meds(tmp_path / "one", frame, splits, shards=1)
    many = write_meds(tmp_path / "many", frame, splits, shards=3, row_group_size=5)  # groups cut subjects
    tokenize_dataset(one, tmp_path / "a", config(), workers=1, progress=False)
    reference = _store_arrays(tmp_path / "a")
    for name, chunk_rows, workers in (("b", 7, 2), ("c", 3, 1), ("d", 1000, 1)):
        tokenize_dataset(many, tmp_path / name, config(chunk_rows=chunk_rows), workers=workers, progress=False)
        arrays = _store_arrays(tmp_path / name)
        for key in reference:
            np.testing.assert_array_equal(reference[key], arrays[key], err_msg=f"{name} {key}")
        assert (tmp_path / "a" / "vocab.json").read_text() == (tmp_path / name / "vocab.json").read_text()


def test_wide_frames_sort_by_columns_with_the_same_result(monkeypatch):
    import nextvisit.tokenize.tokenizer as tokenizer_module

    frame, _ = cohort(n_subjects=12, seed=9)
    tokenizer = Tokenizer.fit(frame, config())
    packed = list(tokenizer.subjects(frame))
    monkeypatch.setattr(tokenizer_module, "_KEY_BITS", 0)
    by_columns = list(tokenizer.subjects(frame))
    assert tokenizer.last_counts["duplicates_collapsed"] > 0
    for a, b in zip(packed, by_columns, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.visit_offsets, b.visit_offsets)
        np.testing.assert_array_equal(a.visit_days, b.visit_days)


# -- re-tokenizing with a fitted vocabulary ---------------------------------------------------------------------
def test_subjects_matches_the_store_and_cuts_histories(tmp_path):
    frame, splits = cohort(n_subjects=20, seed=7)
    meds_dir = write_meds(tmp_path / "meds", frame, splits)
    tokenize_dataset(meds_dir, tmp_path / "store", config(), workers=1, progress=False)
    tokenizer = Tokenizer.load(tmp_path / "store")
    store = TokenStore(tmp_path / "store")
    subject_id = [s for s, x in splits.items() if x == "held_out"][0]
    stored = store.split("held_out").subject(store.split("held_out").index_of(subject_id))
    history = frame.filter(pl.col("subject_id") == subject_id).reverse()  # row order does not matter
    (again,) = list(tokenizer.subjects(history))
    np.testing.assert_array_equal(again.tokens, stored.tokens)
    np.testing.assert_array_equal(again.visit_days, stored.visit_days)
    # a history cut at a prediction time, under surrogate subject ids (label row numbers), in id order
    cut_day = stored.visit_days[1]
    cut = dt.datetime(1970, 1, 1) + dt.timedelta(days=int(cut_day))
    histories = pl.concat([
        history.filter(pl.col("time").is_null() | (pl.col("time") <= cut)).with_columns(subject_id=pl.lit(7, pl.Int64)),
        history.with_columns(subject_id=pl.lit(3, pl.Int64)),
    ])
    row3, row7 = list(tokenizer.subjects(histories))
    assert (row3.subject_id, row7.subject_id) == (3, 7)
    assert row7.n_visits == 2 and row7.visit_days[-1] == cut_day
    np.testing.assert_array_equal(row7.tokens, stored.tokens[: stored.visit_offsets[2]])


def test_vocab_from_reuses_vocabulary_and_reports_unk_share(tmp_path):
    frame, splits = cohort(n_subjects=20, seed=2)
    tokenize_dataset(write_meds(tmp_path / "a", frame, splits), tmp_path / "store_a", config(), workers=1, progress=False)
    run = tmp_path / "run"  # a model run folder carries the same three files
    run.mkdir()
    for name in ("vocab.json", "lab_stats.parquet", "tokenizer.yaml"):
        shutil.copy(tmp_path / "store_a" / name, run / name)
    other = frame.with_columns(code=pl.when(pl.col("code") == "RXNORM//6809").then(pl.lit("RXNORM//OTHER")).otherwise("code"))
    manifest = tokenize_dataset(write_meds(tmp_path / "b", other, splits), tmp_path / "store_b", vocab_from=run,
                                workers=1, progress=False)
    assert (tmp_path / "store_b" / "vocab.json").read_text() == (tmp_path / "store_a" / "vocab.json").read_text()
    n_other = other.filter(pl.col("code") == "RXNORM//OTHER").height
    unk = sum(c["replaced"]["unknown_code"] for c in manifest["splits"].values())
    assert unk == n_other and manifest["unk_share"] == pytest.approx(n_other / other.height)
    with pytest.raises(UserError, match="lab_binning"):
        tokenize_dataset(tmp_path / "b", tmp_path / "store_c", config(lab_binning="quantile"), vocab_from=run,
                         workers=1, progress=False)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="vocab.json"):
        Tokenizer.load(tmp_path)


# -- command line: tokenize and inspect --------------------------------------------------------------------------
def test_cli_tokenize_and_inspect(tmp_path, capsys):
    from nextvisit.cli import main

    frame = events([
        (1, "1950-01-01", "MEDS_BIRTH", None), (1, None, "GENDER//F", None),
        (1, "2020-01-01", "ICD10CM//F03.90", None), (1, "2020-01-01", "LOINC//4548-4", 6.0),
        (1, "2020-06-01", "LOINC//4548-4", 9.0), (2, "2020-01-01", "LOINC//4548-4", 7.0),
    ])
    meds_dir = write_meds(tmp_path / "meds", frame, {1: "train", 2: "train"},
                          descriptions={"ICD10CM//F03.90": "Unspecified dementia", "LOINC//4548-4": "Hemoglobin A1c"})
    (tmp_path / "cfg.yaml").write_text("tokenizer:\n  min_count: 1\n  max_time: null\n")
    assert main(["tokenize", str(meds_dir), "--out", str(tmp_path / "store"), "--config", str(tmp_path / "cfg.yaml"),
                 "--workers", "1"]) == 0
    assert "events/s" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "store"), "--subject", "1"]) == 0
    text = capsys.readouterr().out
    assert "2020-01-01  age 70.0" in text and "Unspecified dementia" in text and "Hemoglobin A1c (z[" in text
    assert "152 days after the previous visit" in text
    assert main(["inspect", str(tmp_path / "store"), "--subject", "5"]) == 2
    assert "subject 5" in capsys.readouterr().err
    # a second run refuses to overwrite silently
    assert main(["tokenize", str(meds_dir), "--out", str(tmp_path / "store")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_max_time_overrides_the_config_and_the_reused_store_and_is_recorded(tmp_path, capsys):
    """--max-time replaces max_time of the --config file (leaving its other fields) and of a --vocab-from store;
    the store's tokenizer.yaml records the value applied, and a later --vocab-from applies it again."""
    from nextvisit.cli import main

    frame, splits = cohort(n_subjects=10, seed=5)
    late = pl.concat([frame, events([(1, "2031-01-01", "ICD10CM//I10", None)])])
    meds_dir = write_meds(tmp_path / "meds", late, splits)
    (tmp_path / "cfg.yaml").write_text("tokenizer:\n  min_count: 1\n  max_time: '2030-06-01'\n")

    def tokenize(out, *options, meds=meds_dir):
        code = main(["tokenize", str(meds), "--out", str(tmp_path / out), "--workers", "1", *map(str, options)])
        recorded = yaml.safe_load((tmp_path / out / "tokenizer.yaml").read_text())["tokenizer"] if code == 0 else None
        return code, capsys.readouterr(), recorded

    code, printed, _ = tokenize("refused", "--config", tmp_path / "cfg.yaml")
    assert code == 2 and "after max_time 2030-06-01" in printed.err and "`--max-time none`" in printed.err
    assert not (tmp_path / "refused").exists()
    code, printed, recorded = tokenize("open", "--config", tmp_path / "cfg.yaml", "--max-time", "none")
    assert code == 0 and recorded["max_time"] is None and recorded["min_count"] == 1
    assert "max_time none: no check for future dates" in printed.out
    code, printed, recorded = tokenize("dated", "--config", tmp_path / "cfg.yaml", "--max-time", "2031-01-01T00:00")
    assert code == 0 and recorded["max_time"] == "2031-01-01T00:00" and recorded["min_count"] == 1
    # a store reused without the flag applies its recorded rule; with it, the flag's
    assert tokenize("reused", "--vocab-from", tmp_path / "open")[2]["max_time"] is None
    code, printed, _ = tokenize("reused_now", "--vocab-from", tmp_path / "open", "--max-time", "now")
    assert code == 2 and "has time 2031-01-01" in printed.err
    code, _, recorded = tokenize("reused_dated", "--vocab-from", tmp_path / "open", "--max-time", "2032-01-01")
    assert code == 0 and recorded["max_time"] == "2032-01-01"
    # now is recorded as the time of tokenizing (UTC), so a later --vocab-from applies the same cut-off
    recorded = tokenize("now", "--max-time", "now", meds=write_meds(tmp_path / "meds_past", frame, splits))[2]
    written = dt.datetime.fromisoformat(recorded["max_time"])
    assert abs((written - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)).total_seconds()) < 600


def test_max_time_with_a_time_zone_is_refused():
    with pytest.raises(UserError, match="has a time zone; MEDS times have none"):
        TokenizerConfig(max_time="2030-01-01T00:00:00+00:00").validate()

# -- real third-party data (skipped where ../shared is absent) ----------------------------------------------------
@pytest.mark.skipif(not MIMIC.exists(), reason=f"{MIMIC} absent (real MIMIC-IV demo in MEDS from ../shared/data)")
def test_mimic_demo_tokenizes_and_balances(tmp_path):
    with pytest.raises(UserError, match="max_time"):  # shifted dates lie in the future: stop, say what to set
        tokenize_dataset(MIMIC, tmp_path / "refused", TokenizerConfig(), workers=1, progress=False)
    manifest = tokenize_dataset(MIMIC, tmp_path / "store", TokenizerConfig(max_time=None), workers=1, progress=False)
    assert manifest["events_in"] == 916_166
    for c in manifest["splits"].values():
        assert c["balance_gap"] == 0
    store = TokenStore(tmp_path / "store")
    assert sum(len(store.split(s)) for s in SPLITS) == 100
    assert any(kind == "lab" for kind in store.vocab.kinds)
    assert manifest["splits"]["train"]["dropped"]["birth_record"] == 83
    assert "Creatinine" in format_timeline(store, 10000032)


@pytest.mark.skipif(not SYNTHEA.exists(), reason=f"{SYNTHEA} absent (Synthea population in MEDS from ../shared/data)")
def test_synthea_tokenizes_with_demographics_on_first_visits(tmp_path):
    manifest = tokenize_dataset(SYNTHEA, tmp_path / "store", TokenizerConfig(), workers=1, progress=False)
    store = TokenStore(tmp_path / "store")
    view = store.split("train")
    demographic = np.asarray([k == "demographic" for k in store.vocab.kinds])
    subject = view.subject(0)
    assert demographic[subject.visit(0)].sum() == 3  # gender, race, ethnicity
    assert all(demographic[subject.visit(i)].sum() == 0 for i in range(1, subject.n_visits))
    assert "SNOMED//26929004" in store.vocab.index  # Alzheimer's disease
    assert all(c["balance_gap"] == 0 for c in manifest["splits"].values())


def test_simulator_output_tokenizes_and_balances(tmp_path):
    simulate = pytest.importorskip("nextvisit.data.simulate").simulate
    simulate(60, tmp_path / "sim", seed=1, workers=1, progress=False)
    manifest = tokenize_dataset(tmp_path / "sim", tmp_path / "store", TokenizerConfig(min_count=2), workers=1,
                                progress=False)
    store = TokenStore(tmp_path / "store")
    assert all(c["balance_gap"] == 0 for c in manifest["splits"].values())
    assert manifest["splits"]["train"]["dropped"]["birth_record"] == manifest["splits"]["train"]["subjects_in"]
    kinds = set(store.vocab.kinds)
    assert {"special", "age", "demographic", "code", "lab"} <= kinds
    view = store.split("train")
    assert np.all(np.diff(view.visit_days[view.subject_visits[0]:view.subject_visits[1]]) > 0)


def test_vocab_from_config_overrides_the_reused_config_field_by_field(tmp_path):
    from nextvisit.cli import main

    frame, splits = cohort(n_subjects=10, seed=4)
    tokenize_dataset(write_meds(tmp_path / "a", frame, splits), tmp_path / "store_a",
                     config(exclude_prefixes=("RXNORM//",)), workers=1, progress=False)
    late = pl.concat([frame, events([(1, "2031-01-01", "ICD10CM//I10", None)])])
    (tmp_path / "late.yaml").write_text("max_time: '2030-06-01'\nfuture_events: drop\n")
    assert main(["tokenize", str(write_meds(tmp_path / "b", late, splits)), "--out", str(tmp_path / "store_b"),
                 "--vocab-from", str(tmp_path / "store_a"), "--config", str(tmp_path / "late.yaml"),
                 "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "store_b" / "manifest.json").read_text())
    dropped = {k: sum(c["dropped"][k] for c in manifest["splits"].values()) for k in ("after_max_time", "excluded_prefix")}
    assert dropped["after_max_time"] == 1  # the override applies
    assert dropped["excluded_prefix"] == late.filter(pl.col("code").str.starts_with("RXNORM//")).height  # kept
