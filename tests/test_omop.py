"""`nextvisit convert omop`: OMOP CDM -> MEDS through meds_etl_omop (its own environment, `make omop-env`).

End to end on the Eunomia OMOP CDM 5.4 database of ../shared/data (convert -> tokenize -> pretrain -> label a
SNOMED task -> forecast -> evaluate, every input row accounted for), and on small OMOP folders written here:
standard vs source concepts, and bad input (one line naming the table, column or row; nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import polars as pl
import pytest

from nextvisit.cli import main
from nextvisit.data.omop import CONVERSION_FILE, TABLES, converter_python, find_converter
from nextvisit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path | None:
    for candidate in (os.environ.get("NEXTVISIT_SHARED_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _converter() -> Path:
    try:
        return find_converter(None)
    except UserError as exc:
        pytest.skip(f"the OMOP converter environment is absent ({exc}); `make test` creates it (make omop-env)")


def _nextvisit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nextvisit.cli", *args], capture_output=True, text=True)


TINY_MODEL = """model: {d_model: 32, n_layers: 2, n_heads: 2}
data: {context: 64}
train: {batch_contexts: 8, micro_batch: 4, warmup_steps: 2, eval_every: 5, eval_contexts: 8, checkpoint_every: 5,
        log_every: 1, precision: fp32, threads: 1}
"""


@pytest.fixture(scope="module")
def eunomia(tmp_path_factory):
    data = _shared_data()
    archive = data / "eunomia-synthea27nj-omop" / "Synthea27Nj_5.4.zip" if data else None
    if archive is None or not archive.exists():
        pytest.skip("../shared/data/eunomia-synthea27nj-omop is absent")
    _converter()
    folder = tmp_path_factory.mktemp("eunomia") / "omop"
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(folder)
    return folder


@pytest.mark.slow
def test_eunomia_end_to_end(eunomia, tmp_path, capsys):
    """Every stage on a real OMOP CDM 5.4 database, each timed; every input row accounted for."""
    meds_dir, store, run, labels, predictions, report = (tmp_path / n for n in
                                                        ("meds", "store", "run", "labels", "pred", "report"))
    (tmp_path / "tokenizer.yaml").write_text("min_count: 1\n")  # 22 training persons: keep every code
    (tmp_path / "model.yaml").write_text(TINY_MODEL)
    stages = [
        ("convert", ["convert", "omop", str(eunomia), "--out", str(meds_dir)]),
        ("tokenize", ["tokenize", str(meds_dir), "--out", str(store), "--config", str(tmp_path / "tokenizer.yaml")]),
        ("pretrain", ["pretrain", str(store), "--out", str(run), "--config", str(tmp_path / "model.yaml"),
                      "--max-steps", "8", "--device", "cpu"]),
        ("label", ["label", str(meds_dir), "knee_oa_snomed", "--out", str(labels)]),
        ("forecast", ["forecast", str(run), str(meds_dir), str(labels), "--out", str(predictions), "--splits", "all",
                      "--device", "cpu"]),
        ("evaluate", ["evaluate", str(predictions), "--out", str(report), "--bootstrap", "50"]),
    ]
    timings = {}
    for name, argv in stages:
        start = time.perf_counter()
        assert main(argv) == 0, name
        timings[name] = round(time.perf_counter() - start, 2)
    capsys.readouterr()
    with capsys.disabled():
        print(f"\nEunomia stage seconds: {timings}")

    # The conversion's accounting: per table, rows x events-per-row = events written + rows dropped, by field.
    summary = json.loads((meds_dir / "metadata" / CONVERSION_FILE).read_text())
    fields = {t.stem: len(t.fields) for t in TABLES}
    raw_rows = {}
    for table in summary["tables"]:
        dropped = sum(n for reasons in table["dropped"].values() for n in reasons.values())
        assert table["rows"] * fields[table["table"]] == table["events"] + dropped, table
        raw = pl.read_csv(eunomia / f"{table['table'].upper()}.csv", infer_schema=False)
        assert table["rows"] == raw.height, table["table"]
        raw_rows[table["table"]] = raw.height
    assert raw_rows["condition_occurrence"] == 470 and raw_rows["measurement"] == 10_040  # PROVENANCE.md counts
    data = pl.read_parquet(meds_dir / "data" / "*.parquet")
    by_table = dict(data.group_by("table").len().iter_rows())
    labels_of = {t.stem: t.label for t in TABLES}
    for table in summary["tables"]:
        assert by_table.get(labels_of[table["table"]], 0) == table["events"], table["table"]
    assert data.height == summary["events_out"] == sum(by_table.values())
    conditions = data.filter(pl.col("table") == "condition")
    assert conditions.height == 470 and conditions["code"].str.starts_with("SNOMED//").all()
    assert data.filter(pl.col("table") == "drug_exposure")["code"].str.starts_with("RxNorm//").all()
    measured = data.filter(pl.col("table") == "measurement")["code"]
    assert measured.str.starts_with("LOINC//").mean() > 0.9  # Eunomia also files some SNOMED tests there
    assert measured.str.contains(r"^(LOINC|SNOMED)//").all()
    assert not data["code"].str.contains(r"^[^/]+/[^/]").any()  # no single-slash spelling left
    assert data.filter(pl.col("code").str.starts_with("GENDER//")).height == 28  # one sex per person
    assert data.filter(pl.col("code") == "SNOMED//239873007")["subject_id"].n_unique() == 3  # knee OA: PROVENANCE.md
    splits = pl.read_parquet(meds_dir / "metadata" / "subject_splits.parquet")
    assert sorted(splits["subject_id"]) == sorted(data["subject_id"].unique()) and splits.height == 28
    assert set(splits["split"]) == {"train", "tuning", "held_out"}

    # The tokenizer's manifest balances against the converter's output.
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["events_in"] == summary["events_out"]
    assert all(s["balance_gap"] == 0 for s in manifest["splits"].values())
    # Forecast scored the labelled rows, and evaluation wrote its report.
    label_rows = pl.read_parquet(labels / "labels.parquet")
    assert label_rows.filter(pl.col("boolean_value") == True)["subject_id"].n_unique() >= 1  # noqa: E712
    scored = pl.read_parquet(predictions / "predictions.parquet")
    decided = label_rows.filter(pl.col("boolean_value").is_not_null())  # censored rows carry no label
    keys = ["subject_id", "prediction_time", "horizon_days"]
    assert scored.height == decided.height and scored.select(keys).sort(keys).equals(decided.select(keys).sort(keys))
    probability = scored["predicted_boolean_probability"]
    assert probability.is_finite().all() and probability.min() >= 0 and probability.max() <= 1
    assert (report / "metrics.json").exists() and (report / "report.html").exists()


def _write_omop(folder: Path, *, condition_columns: dict | None = None, person: dict | None = None,
                concept: bool = True) -> Path:
    """A small OMOP folder: 4 persons, one condition each with a SNOMED standard and an ICD10CM source concept."""
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(person or {
        "person_id": ["1", "2", "3", "4"], "gender_concept_id": ["8507", "8532", "8532", "8507"],
        "year_of_birth": ["1950", "1960", "1970", "1980"], "month_of_birth": ["1", "2", "3", "4"],
        "day_of_birth": ["1", "1", "1", "1"], "race_concept_id": ["0", "0", "0", "0"],
        "ethnicity_concept_id": ["0", "0", "0", "0"]}).write_csv(folder / "PERSON.csv")
    if concept:
        pl.DataFrame({"concept_id": ["378419", "45605480", "999"],
                      "concept_name": ["Alzheimer's disease", "Alzheimer's disease, unspecified", "unused"],
                      "vocabulary_id": ["SNOMED", "ICD10CM", "SNOMED"],
                      "concept_code": ["26929004", "G30.9", "1"]}).write_csv(folder / "concept.csv")
    pl.DataFrame(condition_columns or {
        "condition_occurrence_id": ["1", "2", "3", "4", "5"], "person_id": ["1", "2", "3", "4", "4"],
        "condition_concept_id": ["378419", "378419", "378419", "378419", "123456"],
        "condition_start_date": ["2010-01-01", "2011-02-03", "2012-03-04", "2013-04-05", "2014-05-06"],
        "condition_source_concept_id": ["45605480", "45605480", "0", "45605480", "0"]}
    ).write_csv(folder / "condition_occurrence.csv")
    return folder


def test_standard_and_source_concepts(tmp_path):
    _converter()
    omop = _write_omop(tmp_path / "omop")
    assert main(["convert", "omop", str(omop), "--out", str(tmp_path / "standard")]) == 0
    assert main(["convert", "omop", str(omop), "--out", str(tmp_path / "source"), "--concepts", "source"]) == 0
    standard = pl.read_parquet(tmp_path / "standard" / "data" / "*.parquet").filter(pl.col("table") == "condition")
    source = pl.read_parquet(tmp_path / "source" / "data" / "*.parquet").filter(pl.col("table") == "condition")
    assert standard["code"].to_list() == ["SNOMED//26929004"] * 4  # row 5's concept 123456 is unknown: dropped
    # source: the ICD10CM source concept where given, else the standard one (row 3)
    assert sorted(source["code"].to_list()) == sorted(["ICD10CM//G30.9"] * 3 + ["SNOMED//26929004"])
    summary = json.loads((tmp_path / "standard" / "metadata" / CONVERSION_FILE).read_text())
    condition = next(t for t in summary["tables"] if t["table"] == "condition_occurrence")
    assert condition["rows"] == 5 and condition["events"] == 4
    assert condition["dropped"] == {"condition_concept_id": {"concept id not in the concept table": 1}}
    person = next(t for t in summary["tables"] if t["table"] == "person")
    assert person["dropped"]["race_concept_id"] == {"no concept (0 or empty, no fallback)": 4}
    assert summary["concepts_added"] == ["Gender//M (8507)", "Gender//F (8532)"]  # absent from this concept table
    codes = pl.read_parquet(tmp_path / "standard" / "metadata" / "codes.parquet")
    described = dict(zip(codes["code"], codes["description"]))
    assert described["SNOMED//26929004"] == "Alzheimer's disease" and described["GENDER//F"] == "FEMALE"
    # A seeded split draw: the same seed gives the same splits, another seed (with 4 persons) may differ.
    assert pl.read_parquet(tmp_path / "standard" / "metadata" / "subject_splits.parquet").equals(
        pl.read_parquet(tmp_path / "source" / "metadata" / "subject_splits.parquet"))


@pytest.mark.parametrize("case, expected", [
    ("no_person", "the required table 'person' is missing"),
    ("no_concept", "the required table 'concept' is missing"),
    ("no_concept_column", "condition_occurrence.csv: column 'condition_concept_id' missing"),
    ("bad_date", "condition_occurrence.csv: column 'condition_start_date' row 2 holds '2011-13-45', not a date"),
    ("bad_year", "PERSON.csv: column 'year_of_birth' row 3 holds 'unknown', not a year"),
    ("no_date_column", "condition_occurrence.csv: no date column"),
])
def test_bad_omop_input_one_clear_line(tmp_path, case, expected):
    _converter()
    omop = tmp_path / "omop"
    conditions = {"condition_occurrence_id": ["1", "2"], "person_id": ["1", "2"],
                  "condition_concept_id": ["378419", "378419"], "condition_start_date": ["2010-01-01", "2011-02-03"]}
    if case == "no_concept_column":
        conditions.pop("condition_concept_id")
        conditions["condition_concept"] = ["378419", "378419"]
    if case == "bad_date":
        conditions["condition_start_date"] = ["2010-01-01", "2011-13-45"]
    if case == "no_date_column":
        conditions.pop("condition_start_date")
    person = None
    if case == "bad_year":
        person = {"person_id": ["1", "2", "3"], "gender_concept_id": ["8507"] * 3,
                  "year_of_birth": ["1950", "1960", "unknown"]}
    _write_omop(omop, condition_columns=conditions, person=person, concept=case != "no_concept")
    if case == "no_person":
        (omop / "PERSON.csv").unlink()
    out = tmp_path / "meds"
    result = _nextvisit("convert", "omop", str(omop), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0], lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".meds") for p in tmp_path.iterdir())  # no staging folder left behind


def test_missing_converter_names_the_fix(tmp_path):
    omop = _write_omop(tmp_path / "omop")
    result = _nextvisit("convert", "omop", str(omop), "--out", str(tmp_path / "meds"),
                        "--converter", str(tmp_path / "no-such-bin" / "meds_etl_omop"))
    assert result.returncode == 2 and "make omop-env" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "meds").exists()


def test_every_environment_passes_pip_check():
    """`pip check` in nextvisit's environment and in the converter's (meds 0.3.3 stays over there)."""
    converter = _converter()
    for python in (Path(sys.executable), converter_python(converter)):
        result = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
        assert result.returncode == 0, (python, result.stdout + result.stderr)
    versions = subprocess.run([str(converter_python(converter)), "-c", "import meds; print(meds.__version__)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert versions == "0.3.3"


def test_a_converter_that_loses_an_event_is_caught(tmp_path):
    """The balance check can fail: a converter that drops one event stops the conversion, nothing written."""
    real = _converter()
    fake = tmp_path / "bin" / "meds_etl_omop"
    fake.parent.mkdir()
    fake.write_text(f"""#!{real.parent / 'python'}
import subprocess, sys, glob
import polars as pl
subprocess.run([{str(real)!r}, *sys.argv[1:]], check=True)
shard = sorted(glob.glob(sys.argv[2] + "/data/*.parquet"))[0]
frame = pl.read_parquet(shard)
frame.filter(pl.int_range(pl.len()) != frame.height - 1).write_parquet(shard)
""")
    fake.chmod(0o755)
    omop = _write_omop(tmp_path / "omop")
    result = _nextvisit("convert", "omop", str(omop), "--out", str(tmp_path / "meds"), "--converter", str(fake))
    assert result.returncode == 2 and "does not balance" in result.stderr, result.stderr
    assert not (tmp_path / "meds").exists()
